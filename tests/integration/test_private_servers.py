"""The private, secured RabbitMQ and Redis of tests/private_servers.py, proved with pika and redis-py.

Each server starts once for the session (fixtures ``secure_rabbitmq`` and ``secure_redis``
of tests/integration/conftest.py, which test_tls and test_identities use too); the shared servers
are never touched.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import uuid

import pika
import pika.exceptions
import pytest
import redis
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.private_servers import PrivateRedis

# A RabbitMQ node takes seconds to start on a quiet machine and minutes on a busy one: the fixture's
# setup counts toward the first test's timeout.
pytestmark = pytest.mark.timeout(900)


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=10):
            return False
    except ConnectionRefusedError:
        return True


# -- PKI --------------------------------------------------------------------------------------------


def test_pki_writes_private_keys_and_the_right_names(pki):
    cert_path, key_path = pki.client("worker-7")
    for key in (pki.ca_key, pki.server_key, key_path, pki.wrong_ca_key, pki.wrong_client()[1]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert b"ENCRYPTED" not in key.read_bytes()
    client = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "worker-7"
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    ips = sans.get_values_for_type(x509.IPAddress)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.200.0.1")} <= set(
        ips
    )
    assert pki.client("worker-7") == (cert_path, key_path)  # made once


# -- RabbitMQ ---------------------------------------------------------------------------------------


def test_amqps_with_the_ca_and_a_client_certificate_works(secure_rabbitmq):
    connection = pika.BlockingConnection(secure_rabbitmq.pika_parameters(client="worker-1"))
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_publish("", queue, b"over tls")
        for _ in range(50):
            method, _properties, body = channel.basic_get(queue, auto_ack=True)
            if method:
                break
            connection.sleep(0.1)
        assert body == b"over tls"
    finally:
        connection.close()


def test_plain_amqp_is_refused(secure_rabbitmq):
    assert refused("127.0.0.1", secure_rabbitmq.amqp_port)
    plain = pika.URLParameters(f"amqp://admin:{secure_rabbitmq.admin.password}@127.0.0.1:{secure_rabbitmq.amqp_port}/")
    plain.connection_attempts = 1
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(plain)
    status, overview = secure_rabbitmq.management_request("/api/overview")
    assert status == 200
    assert {listener["protocol"] for listener in overview["listeners"]} >= {"amqp/ssl"}
    assert "amqp" not in {listener["protocol"] for listener in overview["listeners"]}


def test_a_client_without_a_certificate_is_refused(secure_rabbitmq, pki):
    parameters = secure_rabbitmq.pika_parameters(context=pki.client_context(None))
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(parameters)


def test_a_client_certificate_of_another_ca_is_refused(secure_rabbitmq, pki):
    parameters = secure_rabbitmq.pika_parameters(context=pki.client_context(wrong_client="intruder"))
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(parameters)


def test_a_client_trusting_the_wrong_ca_fails_verification(secure_rabbitmq, pki):
    context = pki.client_context("worker-1", ca=pki.wrong_ca_cert)
    with socket.create_connection(("127.0.0.1", secure_rabbitmq.amqps_port), timeout=15) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="localhost")
    with pytest.raises(ssl.SSLCertVerificationError):  # pika re-raises the handshake's own error
        pika.BlockingConnection(secure_rabbitmq.pika_parameters(context=context))


def test_a_wrong_password_is_refused_even_with_a_good_certificate(secure_rabbitmq):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(secure_rabbitmq.pika_parameters("admin", "not-the-password", client="worker-1"))


def test_login_by_client_certificate_common_name(secure_rabbitmq):
    name = f"worker-{uuid.uuid4().hex[:6]}"
    secure_rabbitmq.add_user(name, configure="^$", write="^$", read="^$")
    connection = pika.BlockingConnection(secure_rabbitmq.pika_parameters(client=name, external=True))
    try:
        assert connection.is_open
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as denied:
            channel.queue_declare(f"fedq.{name}")
        assert denied.value.reply_code == 403  # least privilege: no configure permission
    finally:
        if connection.is_open:
            connection.close()
    # A certificate of the right CA, but no user of that name.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(secure_rabbitmq.pika_parameters(client="nobody-here", external=True))


def test_the_management_api_answers_over_https_with_the_admin_credentials(secure_rabbitmq):
    assert secure_rabbitmq.management_url.startswith("https://")
    status, whoami = secure_rabbitmq.management_request("/api/whoami")
    assert status == 200 and whoami["name"] == "admin"
    status, users = secure_rabbitmq.management_request("/api/users")
    assert status == 200 and "guest" not in {user["name"] for user in users}
    status, _ = secure_rabbitmq.management_request("/api/whoami", user="admin", password="wrong")
    assert status == 401
    status, _ = secure_rabbitmq.management_request("/api/whoami", user="guest", password="guest")
    assert status == 401


def test_rabbitmqctl_talks_to_the_private_node_only(secure_rabbitmq):
    users = secure_rabbitmq.rabbitmqctl("list_users", "--formatter", "json").stdout
    assert '"admin"' in users and '"guest"' not in users
    status = secure_rabbitmq.rabbitmqctl("status").stdout
    assert secure_rabbitmq.node in status


# -- Redis ------------------------------------------------------------------------------------------


def test_redis_over_tls_with_a_client_certificate_works(secure_redis):
    assert secure_redis.url().startswith(f"rediss://admin:{secure_redis.admin.password}@")
    with secure_redis.client() as admin:
        admin.set("fedq:probe", b"over tls")
        assert admin.get("fedq:probe") == b"over tls"
        assert admin.config_get("port")["port"] == "0"
    assert refused("127.0.0.1", secure_redis.port)  # the plain port is off


def test_redis_without_a_client_certificate_is_refused(secure_redis):
    with secure_redis.client(client_cert=None) as client:
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()


def test_redis_client_certificate_of_another_ca_is_refused(secure_redis, pki):
    cert, key = pki.wrong_client("intruder")
    with secure_redis.client(client_cert=None, ssl_certfile=str(cert), ssl_keyfile=str(key)) as client:
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()


def test_redis_client_trusting_the_wrong_ca_fails_verification(secure_redis, pki):
    with secure_redis.client(ca=pki.wrong_ca_cert) as client:
        with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate verify failed"):
            client.ping()


def test_redis_default_user_is_off(secure_redis):
    with secure_redis.client(anonymous=True) as client:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()
    with secure_redis.client("default", "") as client:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()


def test_redis_wrong_password_is_refused(secure_redis):
    with secure_redis.client("admin", "not-the-password") as client:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()


def test_redis_least_privilege_user(secure_redis):
    worker = secure_redis.add_user("worker-1", rules=["~fedq:{job}:*", "+@read", "+@connection"])
    with secure_redis.client() as admin:
        admin.set("fedq:{job}:head", b"3")
        admin.set("other", b"x")
    with secure_redis.client(*worker) as client:
        assert client.get("fedq:{job}:head") == b"3"
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("other")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("fedq:{job}:head", b"4")


def test_redis_optional_client_certificates_and_a_plain_port(pki, tmp_path):
    with PrivateRedis(tmp_path, pki=pki, tls=True, plain=True, mutual_tls=False) as server:
        assert server.url(tls=False).startswith("redis://")
        with server.client(client_cert=None) as tls_without_cert, server.client(tls=False) as plain:
            assert tls_without_cert.ping() and plain.ping()
            from_url = redis.Redis.from_url(server.url(), ssl_ca_certs=str(pki.ca_cert))
            with from_url:
                assert from_url.ping()
