"""Parties with their own identities, on private RabbitMQ and Redis that accept only mutual TLS and
their own users (tests/private_servers.py): `fedq admin` enrolls a coordinator, two workers and a
monitor; the job trains over TLS, each worker on a host of its own (a network namespace behind a
bridge, tests/netns.py; the loopback where namespaces cannot be made); a worker's credentials
cannot do anything but its part; a revoked worker is cut off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
import uuid

import pika
import pika.exceptions
import pytest
import redis

from fedq.common.store.tiers import whole_history
from tests import netns

# pki, secure_rabbitmq and secure_redis: the session's (tests/integration/conftest.py), on every address
# so that the bridge reaches them too; shared with test_private_servers and test_tls.
from tests.private_servers import tls_flags  # noqa: F401 (a fixture)
from tests.support import ROOT, wait_until

pytestmark = pytest.mark.timeout(1200)

TRAINING = [
    "--task",
    "digits",
    "--task-params",
    json.dumps({"num_partitions": 2}),
    "--local-epochs",
    "1",
    "--algorithm",
    "fedbuff",
    "--buffer-size",
    "2",
    "--concurrency",
    "4",
    "--eval-every",
    "0",
]


@pytest.fixture(scope="module")
def hosts():
    """Two other hosts, alice's and bob's; None where network namespaces cannot be made."""
    if not netns.available():
        yield None
        return
    with netns.Hosts(["alice", "bob"]) as made:
        yield made


def reached_from(hosts, url: str) -> str:
    """``url`` as a worker on another host reaches the server: at the bridge's address."""
    if hosts is None:
        return url
    scheme, rest = url.split("://", 1)
    credentials, _, address = rest.rpartition("@")
    port_and_path = address.split(":", 1)[1]
    return f"{scheme}://{credentials + '@' if credentials else ''}{netns.SERVER_ADDRESS}:{port_and_path}"


class Site:
    """Someone holding a job file written by `fedq admin enroll`."""

    def __init__(self, path):
        self.path = path
        self.values = tomllib.loads(path.read_text())["job"]

    def redis(self, secure_redis) -> redis.Redis:
        parsed = redis.connection.parse_url(self.values["redis_url"])
        return secure_redis.client(parsed["username"], parsed["password"])

    def channel(self, secure_rabbitmq):
        params = pika.URLParameters(self.values["amqp_url"])
        connection = pika.BlockingConnection(
            secure_rabbitmq.pika_parameters(
                params.credentials.username, params.credentials.password, client="fedq-test"
            )
        )
        return connection, connection.channel()


def fedq(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def refused_by_broker(action) -> int:
    """The AMQP reply code with which the broker closed the channel over ``action``."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        action()
    return closed.value.reply_code


def test_enrolled_parties_train_over_tls_a_worker_can_do_only_its_part_and_revocation_cuts_it_off(
    tls_flags, secure_rabbitmq, secure_redis, hosts, tmp_path
):
    from fedq.common.store import ModelStore
    from fedq.common.store.keys import JobKeys
    from fedq.common.wire import codec
    from fedq.common.wire.messages import InlineDelta, ModelUpdate

    job = f"id-{uuid.uuid4().hex[:6]}"
    admin = [
        "--job",
        job,
        "--amqp-url",
        secure_rabbitmq.amqps_url(),
        "--redis-url",
        secure_redis.url(),
        "--management-url",
        secure_rabbitmq.management_url,
        *tls_flags,
    ]
    sites = {}
    for role, name in (("coordinator", "coordinator"), ("worker", "alice"), ("worker", "bob"), ("monitor", "ops")):
        out = tmp_path / f"{name}.toml"
        site = (
            []
            if role != "worker"
            else [
                "--site-amqp-url",
                reached_from(hosts, secure_rabbitmq.amqps_url()),
                "--site-redis-url",
                reached_from(hosts, secure_redis.url()),
            ]
        )
        enrolled = fedq("admin", *admin, "enroll", "--role", role, "--worker-id", name, "--out", str(out), *site)
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        sites[name] = Site(out)
    assert secure_rabbitmq.admin.password not in (tmp_path / "alice.toml").read_text()
    listed = fedq("admin", *admin, "list")
    assert "alice" in listed.stdout and "bob" in listed.stdout and "active" in listed.stdout, listed.stdout

    admin_store = ModelStore(secure_redis.client(), job)
    logs = {}
    processes = {}

    def start(name: str, *args: str, host: str | None = None) -> subprocess.Popen:
        logs[name] = open(tmp_path / f"{name}.log", "w")
        argv = [sys.executable, "-m", "fedq.common.cli", *args]
        if host is not None and hosts is not None:
            argv = hosts.command(host, argv)
        processes[name] = subprocess.Popen(argv, cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT)
        return processes[name]

    try:
        start(
            "coordinator",
            "coordinator",
            "--config",
            str(sites["coordinator"].path),
            *tls_flags,
            *TRAINING,
            "--max-seconds",
            "900",
        )
        # alice names her partition; bob is leased one by the coordinator, through his ACL.
        start("alice", "worker", "--config", str(sites["alice"].path), *tls_flags, "--partition", "0", host="alice")
        start("bob", "worker", "--config", str(sites["bob"].path), *tls_flags, host="bob")

        def head() -> int:
            return admin_store.versions.head() or 0

        def applied_by(worker: str) -> list[int]:
            return [
                entry.version
                for entry in whole_history(admin_store)
                for update in entry.updates
                if update.worker_id == worker
            ]

        wait_until(
            lambda: applied_by("alice") and applied_by("bob"),
            600,
            "both enrolled workers had updates applied: " + (tmp_path / "coordinator.log").read_text()[-3000:],
        )
        if hosts is not None:  # they did so from their own hosts: the broker saw their bridge addresses

            def peers() -> set:
                _, connections = secure_rabbitmq.management_request("/api/connections?columns=user,peer_host")
                return {(connection.get("user"), connection.get("peer_host")) for connection in connections}

            expected = {(f"fedq.{job}.alice", hosts.addresses["alice"]), (f"fedq.{job}.bob", hosts.addresses["bob"])}
            # The management API lists a connection once its statistics were emitted (every 5 s).
            wait_until(lambda: expected <= peers(), 120, f"connections not from the workers' hosts: {peers()}")

        # -- what alice's credentials cannot do, each refused by the server --------------------------
        alice = sites["alice"]
        connection, channel = alice.channel(secure_rabbitmq)
        topology_tasks, topology_updates = f"fedq.{job}.tasks", f"fedq.{job}.updates"
        channel.confirm_delivery()
        assert refused_by_broker(lambda: channel.basic_publish(topology_tasks, "fedq", b"{}")) == 403
        channel = connection.channel()
        assert refused_by_broker(lambda: channel.queue_declare("alice-owns-this")) == 403
        channel = connection.channel()
        assert refused_by_broker(lambda: channel.queue_delete(topology_tasks)) == 403
        channel = connection.channel()
        assert refused_by_broker(lambda: channel.basic_get(topology_updates)) == 403
        channel = connection.channel()
        channel.confirm_delivery()
        as_bob = ModelUpdate(
            job=job,
            task_id="t-forged",
            worker_id="bob",
            base_version=0,
            num_examples=1,
            delta=InlineDelta(codec.encode({})),
        )
        # Binding the update queue to the task exchange (its permissions allow that much, see
        # docs/security.md): the coordinator removes the binding within seconds.
        channel.queue_bind(topology_updates, topology_tasks, routing_key="fedq")

        def bound() -> list:
            _, bindings = secure_rabbitmq.management_request(
                f"/api/bindings/%2F/e/{topology_tasks}/q/{topology_updates}"
            )
            return bindings

        assert bound(), "the binding was made"
        wait_until(lambda: not bound(), 60, "the coordinator did not remove the stray binding")
        # Naming another user as the publisher: the broker refuses it.
        assert (
            refused_by_broker(
                lambda: channel.basic_publish(
                    topology_updates,
                    "fedq",
                    as_bob.to_bytes(),
                    properties=pika.BasicProperties(user_id=f"fedq.{job}.bob"),
                )
            )
            == 406
        )
        # Naming bob in the body, published as alice: the coordinator refuses it.
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            topology_updates, "fedq", as_bob.to_bytes(), properties=pika.BasicProperties(user_id=f"fedq.{job}.alice")
        )
        channel.basic_publish(topology_updates, "fedq", as_bob.to_bytes())  # no user_id at all
        wait_until(
            lambda: admin_store.counters.get("rejected").get("impersonation", 0) >= 2,
            120,
            "the coordinator did not refuse both impersonations",
        )
        connection.close()

        keys, other = JobKeys(job), JobKeys("another-job")
        secure_redis.client().set(other.head, 7)
        client = alice.redis(secure_redis)
        for action in (
            lambda: client.get(other.head),  # another job's keys
            lambda: client.get(keys.signing_key),  # the coordinator's key
            lambda: client.get(keys.head),  # not needed, not granted
            lambda: client.set(keys.head, 10**6),  # move the head
            lambda: client.set(keys.model(head() + 1), b"x"),  # write a version
            lambda: client.xadd(keys.history, {"v": "1"}),  # write the history
            lambda: client.hset(keys.applied, "t", 1),  # the ledger
            lambda: client.hset(keys.identities, "alice", "{}"),  # its own identity
            lambda: client.set(keys.update("bob", "t1"), b"x"),  # bob's blob
            lambda: client.set(keys.delta("alice", "t1"), b"x"),  # its own delta, once the coordinator read it
            lambda: client.set(keys.worker("bob"), b"{}"),  # bob's liveness
            lambda: client.get(keys.partition("bob")),  # bob's lease
            lambda: client.set(keys.partition("alice"), 5),  # a lease of its own making
            lambda: client.hset(keys.partitions, "alice", 5),
            lambda: client.flushall(),
            lambda: client.execute_command("CLIENT", "KILL", "TYPE", "normal"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                action()
        # (the head: older versions may have moved to the archive already)
        assert client.get(keys.model(head())) is not None and client.get(keys.spec) is not None, "what alice needs"
        client.set(keys.update("alice", "t1"), b"x", ex=60)  # its own blob: allowed
        assert admin_store.partitions.table() == {"bob": 1}, "bob leased the partition alice's flag leaves free"
        assert int(sites["bob"].redis(secure_redis).get(keys.partition("bob"))) == 1, "bob may read his lease"

        # -- the monitor reads, and writes nothing ----------------------------------------------------
        status = fedq(
            "status",
            "--config",
            str(sites["ops"].path),
            *tls_flags,
            "--management-url",
            secure_rabbitmq.management_url,
            "--json",
        )
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["head"] >= 1 and report["depth_source"] == "management"
        with pytest.raises(redis.exceptions.NoPermissionError):
            sites["ops"].redis(secure_redis).set(keys.head, 0)
        with pytest.raises(redis.exceptions.NoPermissionError):
            sites["ops"].redis(secure_redis).get(keys.signing_key)

        # -- the job kept training through all of it ------------------------------------------------
        before = head()
        wait_until(lambda: head() >= before + 3, 300, "training stopped after the attacks")

        # -- revocation ------------------------------------------------------------------------------
        started = time.monotonic()
        revoked = fedq("admin", *admin, "revoke", "--worker-id", "alice")
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        revoke_seconds = time.monotonic() - started
        cut_at = head()
        assert "connection(s) closed" in revoked.stdout
        wait_until(lambda: processes["alice"].poll() is not None, 120, "the revoked worker still runs")
        print(
            f"revocation: fedq admin revoke took {revoke_seconds:.1f} s; the worker had exited "
            f"{time.monotonic() - started:.1f} s after it began"
        )
        wait_until(
            lambda: head() >= cut_at + 5 and applied_by("bob")[-1] > cut_at, 300, "training did not go on with bob"
        )
        assert [version for version in applied_by("alice") if version > cut_at] == [], (
            "an update of alice was applied after her revocation"
        )
        assert revoke_seconds < 60
        with pytest.raises(redis.exceptions.AuthenticationError):
            alice.redis(secure_redis).ping()
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            alice.channel(secure_rabbitmq)
        assert processes["coordinator"].poll() is None and processes["bob"].poll() is None
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        for log in logs.values():
            log.close()
    for name in ("coordinator", "bob"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text(), name
