"""TLS end to end: fedq's connections to RabbitMQ (amqps://), Redis (rediss://) and the management
API (https://) verify the server against --tls-ca and present --tls-cert/--tls-key, against
private servers that accept nothing else (tests/private_servers.py); the shared servers are
never touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

# pki, secure_rabbitmq and secure_redis: the session's (tests/integration/conftest.py), shared with
# test_private_servers.
from tests.private_servers import tls_flags  # noqa: F401 (a fixture)
from tests.support import ROOT

# Starting a RabbitMQ node counts toward the first test's timeout; a busy machine takes minutes.
pytestmark = pytest.mark.timeout(900)


def fedq(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_connections_verify_the_server_and_present_the_client_certificate(tls_flags, secure_rabbitmq, secure_redis):
    from fedq.broker.connection import connect
    from fedq.common.store import connect_redis

    connection = connect(secure_rabbitmq.amqps_url(), name="fedq-tls-test", attempts=1)
    assert connection.is_open
    connection.close()
    client = connect_redis(secure_redis.url(), attempts=1)
    assert client.ping()
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == tls_flags[1]


def test_a_server_signed_by_another_ca_is_refused_at_once_with_one_sentence(pki, secure_rabbitmq, secure_redis):
    from fedq.broker.connection import BrokerError, connect
    from fedq.common import tls
    from fedq.common.store import StoreError, connect_redis

    cert, key = pki.client("fedq-test")
    tls.configure(tls.TLSFiles(str(pki.wrong_ca_cert), str(cert), str(key)))
    try:
        # attempts=5: a TLS failure must not be retried, so the message says handshake, not "after 5 attempts".
        with pytest.raises(BrokerError, match="failed the TLS handshake") as refused:
            connect(secure_rabbitmq.amqps_url(), attempts=5)
        assert secure_rabbitmq.admin.password not in str(refused.value)
        with pytest.raises(StoreError, match="failed the TLS handshake") as refused:
            connect_redis(secure_redis.url(), attempts=5)
        assert secure_redis.admin.password not in str(refused.value)
    finally:
        tls.configure(tls.TLSFiles())


def test_without_a_client_certificate_the_broker_refuses(pki, secure_rabbitmq):
    from fedq.broker.connection import BrokerError, connect
    from fedq.common import tls

    tls.configure(tls.TLSFiles(str(pki.ca_cert)))
    try:
        with pytest.raises(BrokerError):
            connect(secure_rabbitmq.amqps_url(), attempts=1)
    finally:
        tls.configure(tls.TLSFiles())


def test_a_federation_trains_over_tls_and_status_reads_the_management_api_over_https(
    tls_flags, secure_rabbitmq, secure_redis, tmp_path
):
    job = f"tls-{uuid.uuid4().hex[:6]}"
    connection = [
        "--job",
        job,
        "--amqp-url",
        secure_rabbitmq.amqps_url(),
        "--redis-url",
        secure_redis.url(),
        *tls_flags,
    ]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("coordinator", "worker")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "fedq.common.cli", "worker", *connection, "--worker-id", "w0", "--partition", "0"],
        cwd=ROOT,
        stdout=logs["worker"],
        stderr=subprocess.STDOUT,
    )
    try:
        coordinator = fedq(
            "coordinator",
            *connection,
            "--task",
            "digits",
            "--task-params",
            json.dumps({"num_partitions": 1}),
            "--local-epochs",
            "1",
            "--max-versions",
            "3",
            "--max-seconds",
            "240",
            timeout=400,
        )
        assert coordinator.returncode == 0, coordinator.stdout[-3000:] + coordinator.stderr[-3000:]
        status = fedq("status", *connection, "--management-url", secure_rabbitmq.management_url, "--json")
        assert status.returncode == 0, status.stderr[-3000:]
        report = json.loads(status.stdout)
        assert report["head"] == 3
        assert report["depth_source"] == "management", "the management API over https answered"
    finally:
        worker.kill()
        worker.wait(timeout=30)
    for log in ((tmp_path / "worker.log").read_text(), coordinator.stdout + coordinator.stderr):
        assert secure_rabbitmq.admin.password not in log and secure_redis.admin.password not in log


def test_plain_tcp_to_the_tls_ports_is_refused(tls_flags, secure_rabbitmq, secure_redis):
    from fedq.broker.connection import BrokerError, connect
    from fedq.common.store import StoreError, connect_redis

    with pytest.raises(BrokerError):
        connect(secure_rabbitmq.amqps_url().replace("amqps://", "amqp://"), attempts=1)
    with pytest.raises(StoreError):
        connect_redis(secure_redis.url().replace("rediss://", "redis://"), attempts=1)
