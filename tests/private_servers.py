"""Private, secured RabbitMQ and Redis instances for integration tests, and a throwaway PKI.

Tests must never reconfigure the shared servers (RabbitMQ ``rabbit@localhost`` on
5672 and Redis on 6379), so tests of TLS and access control start servers of
their own here:

* :class:`ThrowawayPKI` writes a CA, a server certificate (``localhost``,
  ``127.0.0.1``, ``::1`` and any extra addresses), client certificates by name
  and a second, unrelated CA with a client certificate of its own, as PEM files
  (keys unencrypted, mode 0600), valid for a day.
* :class:`PrivateRabbitMQ` starts a separate RabbitMQ node (own node name,
  config, data and log directories, Erlang cookie, epmd and random ports) with
  optional AMQPS (mutual TLS by default), HTTPS management, no plain AMQP
  listener, an ``admin`` user with a generated password and no ``guest``, and
  optionally login by client certificate (``EXTERNAL``, user = certificate CN).
* :class:`PrivateRedis` starts ``redis-server`` on random ports without
  persistence, optionally with TLS (mutual or optional client certificates)
  and no plain port, the ``default`` user off and an ``admin`` user with a
  generated password.
* Fixtures ``pki``, ``secure_rabbitmq``, ``secure_redis``: module-scoped when imported into a
  test module (servers of that module alone, e.g. to reconfigure them); otherwise the session's,
  from ``tests/integration/conftest.py``: one PKI, node and Redis shared by every module that
  imports none of the three (starting a node takes 5-30 s), listening on every address (for the
  other hosts of tests/netns.py). Tests on the shared servers may add users and keys of their own,
  and must not reconfigure them.

How the private RabbitMQ node runs (the gotchas):

* It is started with ``/usr/lib/rabbitmq/bin/rabbitmq-server`` directly, as the
  current user (root here). The Debian wrapper ``/usr/sbin/rabbitmq-server``
  would ``su rabbitmq`` and ``cd /var/lib/rabbitmq``, and the rabbitmq user can't
  use root's private directories, so it is never used. ``rabbitmqctl`` likewise
  runs as ``/usr/lib/rabbitmq/bin/rabbitmqctl``.
* ``RABBITMQ_CONF_ENV_FILE`` points to a private (empty) file: the system's
  ``/etc/rabbitmq/rabbitmq-env.conf`` sets ``NODENAME=rabbit@localhost``, the
  shared node's name.
* The Erlang cookie: ``HOME`` is a private directory holding a fresh
  ``.erlang.cookie`` (mode 0400), for the node and for every ``rabbitmqctl``
  call made through :meth:`PrivateRabbitMQ.rabbitmqctl`. A bare ``rabbitmqctl``
  as root reads ``/root/.erlang.cookie`` (or goes through the Debian wrapper as
  the rabbitmq user) and can't talk to the private node; pass
  ``--erlang-cookie`` (see :attr:`PrivateRabbitMQ.cookie`) or use the helper.
* epmd: the node and its ``rabbitmqctl`` calls use an epmd of their own, started
  here on a random port (``ERL_EPMD_PORT``, loopback only), so the shared epmd
  on 4369 is never touched and the private one can be killed at stop.
* Every process of a private server carries ``FEDQ_PRIVATE_SERVER=<id>`` in its
  environment and runs in a session of its own; :meth:`stop` kills the session
  and then any process still carrying the id (e.g. a daemonised helper), and
  nothing else.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import wait_until

RABBITMQ_BIN = Path(os.environ.get("FEDQ_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
REDIS_SERVER = os.environ.get("FEDQ_TEST_REDIS_SERVER", shutil.which("redis-server") or "/usr/bin/redis-server")
EPMD = os.environ.get("FEDQ_TEST_EPMD", shutil.which("epmd") or "/usr/bin/epmd")
#: How long a RabbitMQ node may take to start: 10-30 s on a quiet machine, far longer on a busy one.
STARTUP_TIMEOUT = float(os.environ.get("FEDQ_TEST_SERVER_STARTUP_TIMEOUT", "600"))
MARKER = "FEDQ_PRIVATE_SERVER"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    def __iter__(self):
        return iter((self.user, self.password))


# --------------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


class ThrowawayPKI:
    """A CA, a server certificate, client certificates by name and an unrelated second CA, as PEM files.

    ``directory`` receives ``ca.pem``/``ca.key``, ``server.pem``/``server.key``,
    ``clients/<name>.pem|.key``, ``wrong-ca.pem``/``wrong-ca.key`` and
    ``wrong-clients/<name>.pem|.key``. Keys are unencrypted ECDSA P-256 keys with
    mode 0600; certificates are valid from 5 minutes ago for ``days`` days.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        extra_ips: Iterable[str] = (),
        extra_hostnames: Iterable[str] = (),
        days: float = 1.0,
    ):
        from cryptography import x509  # noqa: F401  (fail early if missing)

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.days = days
        self._ca = self._make_ca("fedq test CA", "ca")
        self._wrong_ca = self._make_ca("fedq unrelated CA", "wrong-ca")
        self.ca_cert, self.ca_key = self.directory / "ca.pem", self.directory / "ca.key"
        self.wrong_ca_cert, self.wrong_ca_key = self.directory / "wrong-ca.pem", self.directory / "wrong-ca.key"
        self.server_cert, self.server_key = self.server(
            "server", ["localhost", *extra_hostnames], ["127.0.0.1", "::1", *extra_ips]
        )
        self._clients: dict[tuple[str, str], tuple[Path, Path]] = {}

    # -- public API ---------------------------------------------------------------------------------

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert_path, key_path) of a client certificate with CN = ``name``, signed by the CA (made once)."""
        return self._client(name, self._ca, "clients")

    def wrong_client(self, name: str = "intruder") -> tuple[Path, Path]:
        """(cert_path, key_path) of a client certificate with CN = ``name`` signed by the unrelated CA."""
        return self._client(name, self._wrong_ca, "wrong-clients")

    def server(
        self, name: str, hostnames: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1", "::1")
    ) -> tuple[Path, Path]:
        """(cert_path, key_path) of another server certificate signed by the CA, with these SANs."""
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        sans = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        common_name = hostnames[0] if hostnames else ips[0]
        return self._issue(
            self._ca,
            common_name,
            self.directory / f"{_safe_name(name)}.pem",
            self.directory / f"{_safe_name(name)}.key",
            ExtendedKeyUsageOID.SERVER_AUTH,
            sans,
        )

    def client_context(
        self,
        client: str | None = None,
        *,
        ca: str | os.PathLike | None = None,
        wrong_client: str | None = None,
        check_hostname: bool = True,
    ) -> ssl.SSLContext:
        """A client-side SSLContext trusting ``ca`` (default: this PKI's CA), with the client certificate
        ``client`` (or ``wrong_client``, one of the unrelated CA) if given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = check_hostname
        context.load_verify_locations(cafile=str(ca or self.ca_cert))
        if client is not None:
            cert, key = self.client(client)
            context.load_cert_chain(str(cert), str(key))
        elif wrong_client is not None:
            cert, key = self.wrong_client(wrong_client)
            context.load_cert_chain(str(cert), str(key))
        return context

    # -- internals ----------------------------------------------------------------------------------

    def _validity(self):
        now = datetime.datetime.now(datetime.UTC)
        return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=self.days)

    @staticmethod
    def _write_key(path: Path, key) -> None:
        from cryptography.hazmat.primitives import serialization

        data = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(path, 0o600)

    @staticmethod
    def _write_cert(path: Path, cert) -> None:
        from cryptography.hazmat.primitives import serialization

        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(path, 0o644)

    def _make_ca(self, common_name: str, stem: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedq tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} {secrets.token_hex(4)}"),
            ]
        )
        not_before, not_after = self._validity()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self._write_key(self.directory / f"{stem}.key", key)
        self._write_cert(self.directory / f"{stem}.pem", cert)
        return key, cert

    def _client(self, name: str, ca, folder: str) -> tuple[Path, Path]:
        from cryptography.x509.oid import ExtendedKeyUsageOID

        cached = self._clients.get((folder, name))
        if cached:
            return cached
        directory = self.directory / folder
        directory.mkdir(exist_ok=True)
        paths = self._issue(
            ca,
            name,
            directory / f"{_safe_name(name)}.pem",
            directory / f"{_safe_name(name)}.key",
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [],
        )
        self._clients[(folder, name)] = paths
        return paths

    def _issue(self, ca, common_name: str, cert_path: Path, key_path: Path, usage, sans) -> tuple[Path, Path]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        ca_key, ca_cert = ca
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = self._validity()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedq tests"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        self._write_key(key_path, key)
        self._write_cert(cert_path, cert)
        return cert_path, key_path


# --------------------------------------------------------------------------------------------------
# Ports and processes
# --------------------------------------------------------------------------------------------------

_handed_out: set[int] = set()
# Below the kernel's ephemeral range (32768-60999 here), so outgoing connections never take them,
# and away from well-known ports of the shared servers.
_PORT_RANGE = (20000, 32000)
_AVOID = {25672, 15672, 15671, 5671, 5672, 6379, 4369}


def free_port(host: str = "127.0.0.1") -> int:
    """A random TCP port in 20000-31999 that is free now on ``host`` and on every interface."""
    for _ in range(500):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out or port in _AVOID:
            continue
        if _bindable(port, host) and _bindable(port, "0.0.0.0") and _bindable(port, "::"):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def _bindable(port: int, host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
        return True
    except OSError as error:
        # An address family this host lacks says nothing about the port.
        return error.errno in (97, 99)  # EAFNOSUPPORT, EADDRNOTAVAIL


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (from /proc/net/tcp{,6})."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    if not inodes:
        return False
    try:
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    return any(f"socket:[{inode}]" in links for inode in inodes)


def _clean_environment(**extra: str) -> dict[str, str]:
    """os.environ without RabbitMQ/Erlang settings of the caller, plus ``extra``."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RABBITMQ_", "ERL_", "REDISCLI_")) and key != MARKER
    }
    environment.setdefault("LANG", "C.UTF-8")
    environment["LC_ALL"] = "C.UTF-8"
    environment.update(extra)
    return environment


def _processes_marked(tag: str) -> list[int]:
    """Pids of processes whose environment carries ``FEDQ_PRIVATE_SERVER=tag`` (our own servers only)."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_everything_of(tag: str, session_leader: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM then SIGKILL the process group of ``session_leader`` and any other process tagged ``tag``."""

    def signal_all(sig: int) -> None:
        if session_leader is not None:
            try:
                os.killpg(session_leader.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in _processes_marked(tag):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    if session_leader is not None and session_leader.poll() is None or _processes_marked(tag):
        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if (session_leader is None or session_leader.poll() is not None) and not _processes_marked(tag):
                break
            time.sleep(0.2)
        signal_all(signal.SIGKILL)
    if session_leader is not None:
        try:
            session_leader.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    # Give the killed strays a moment to disappear.
    deadline = time.monotonic() + 10
    while _processes_marked(tag) and time.monotonic() < deadline:
        time.sleep(0.1)


class _Server:
    """Shared life cycle: context manager, stop at interpreter exit, log tail."""

    _live: set[_Server] = set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _tail(path: Path, characters: int = 4000) -> str:
        try:
            return path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_Server._live):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# --------------------------------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------------------------------


class PrivateRabbitMQ(_Server):
    """A RabbitMQ node of its own: node name, config, data/log dirs, Erlang cookie, epmd and random ports.

    ``tls`` adds an AMQPS listener using ``pki``'s server certificate and CA,
    with ``verify_peer`` and, when ``mutual_tls``, ``fail_if_no_peer_cert``.
    ``plain=False`` sets ``listeners.tcp = none``. ``management_tls`` (default:
    ``tls``) serves the management API over HTTPS only (client certificates
    required only with ``management_mutual_tls``). ``cert_login`` enables
    ``rabbitmq_auth_mechanism_ssl``: ``EXTERNAL`` login as the user named by the
    client certificate's CN (the user must exist; its password is irrelevant);
    PLAIN/AMQPLAIN password login stays available. Users: ``admin`` (tag
    administrator, all permissions on ``/``) with a generated password; no guest.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        pki: ThrowawayPKI | None = None,
        tls: bool = False,
        plain: bool = True,
        mutual_tls: bool = True,
        management: bool = True,
        management_tls: bool | None = None,
        management_mutual_tls: bool = False,
        cert_login: bool = False,
        bind: Sequence[str] = ("127.0.0.1",),
        node_name: str | None = None,
        extra_config: Sequence[str] = (),
        startup_timeout: float = STARTUP_TIMEOUT,
        cluster: _ClusterShare | None = None,
    ):
        if (tls or management_tls) and pki is None:
            raise ValueError("tls needs a pki")
        if not plain and not tls:
            raise ValueError("a node without plain and TLS listeners would be unreachable")
        self.directory = Path(directory)
        self.pki = pki
        self.tls = tls
        self.plain = plain
        self.mutual_tls = mutual_tls
        self.management = management
        self.management_tls = tls if management_tls is None else management_tls
        self.management_mutual_tls = management_mutual_tls
        self.cert_login = cert_login
        self.bind = tuple(bind)
        self.node = node_name or f"fedq-test-{secrets.token_hex(4)}@localhost"
        self.extra_config = tuple(extra_config)
        self.startup_timeout = startup_timeout
        self.tag = f"rabbitmq-{self.node}-{secrets.token_hex(4)}"
        # A cluster's nodes share the cookie, the admin user (a joining node takes the cluster's users)
        # and one epmd, through which they find each other.
        self.cluster = cluster
        self.admin = cluster.admin if cluster else Credentials("admin", secrets.token_hex(16))
        self.cookie = cluster.cookie if cluster else secrets.token_hex(20).upper()
        self.home = self.directory / "home"
        self.config_file = self.directory / "rabbitmq.conf"
        self.log_dir = self.directory / "log"
        self.mnesia_base = self.directory / "mnesia"
        self.pid_file = self.directory / "rabbitmq.pid"
        self.console_log = self.directory / "console.log"
        self.amqp_port = self.amqps_port = self.management_port = self.dist_port = self.epmd_port = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._epmd: subprocess.Popen | None = None

    # -- addresses ----------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address clients use: the first bind address (``localhost`` if bound to all)."""
        first = self.bind[0] if self.bind else "0.0.0.0"
        return "localhost" if first in ("0.0.0.0", "::") else first

    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def amqp_url(self, user: str | None = None, password: str | None = None, vhost: str = "/") -> str:
        """``amqp://user:password@host:port/vhost`` of the plain listener (admin by default)."""
        if not self.plain:
            raise RuntimeError("this node has no plain AMQP listener")
        return self._url("amqp", self.amqp_port, user, password, vhost)

    def amqps_url(self, user: str | None = None, password: str | None = None, vhost: str = "/") -> str:
        """``amqps://user:password@host:port/vhost`` of the TLS listener (admin by default)."""
        if not self.tls:
            raise RuntimeError("this node has no AMQPS listener")
        return self._url("amqps", self.amqps_port, user, password, vhost)

    def _url(self, scheme: str, port: int, user, password, vhost: str) -> str:
        from urllib.parse import quote

        user = self.admin.user if user is None else user
        password = self.admin.password if password is None and user == self.admin.user else (password or "")
        return (
            f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{self._url_host()}:{port}/"
            f"{quote(vhost, safe='')}"
        )

    @property
    def management_url(self) -> str:
        """``http(s)://host:port`` of the management API (no trailing slash)."""
        if not self.management:
            raise RuntimeError("management is disabled on this node")
        scheme = "https" if self.management_tls else "http"
        return f"{scheme}://{self._url_host()}:{self.management_port}"

    def pika_parameters(
        self,
        user: str | None = None,
        password: str | None = None,
        *,
        client: str | None = None,
        tls: bool | None = None,
        context: ssl.SSLContext | None = None,
        external: bool = False,
        **overrides,
    ):
        """pika ConnectionParameters for this node: AMQPS with the PKI's CA and client cert ``client`` when
        ``tls`` (default: the node has TLS), else plain AMQP. ``external`` logs in with EXTERNAL (cert CN)."""
        import pika

        tls = self.tls if tls is None else tls
        url = self.amqps_url(user, password) if tls else self.amqp_url(user, password)
        parameters = pika.URLParameters(url)
        if tls:
            if context is None:
                context = self.pki.client_context(client)
            parameters.ssl_options = pika.SSLOptions(context, self.host)
        if external:
            parameters.credentials = pika.credentials.ExternalCredentials()
        parameters.connection_attempts = 1
        parameters.socket_timeout = overrides.pop("socket_timeout", 15)
        parameters.blocked_connection_timeout = overrides.pop("blocked_connection_timeout", 30)
        for key, value in overrides.items():
            setattr(parameters, key, value)
        return parameters

    # -- management API -----------------------------------------------------------------------------

    def management_request(
        self,
        path: str,
        method: str = "GET",
        body=None,
        *,
        user: str | None = None,
        password: str | None = None,
        context: ssl.SSLContext | None = None,
        timeout: float = 30,
    ):
        """(status, decoded JSON or text) of a management API call (admin by default); HTTP errors are
        returned, not raised."""
        user = self.admin.user if user is None else user
        password = self.admin.password if password is None and user == self.admin.user else (password or "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.management_url + path, data=data, method=method)
        request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.management_tls and context is None:
            context = self.pki.client_context("management-client" if self.management_mutual_tls else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    # -- rabbitmqctl --------------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        return _clean_environment(
            **{
                MARKER: self.tag,
                "HOME": str(self.home),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.config_file),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(self.mnesia_base),
                "RABBITMQ_LOG_BASE": str(self.log_dir),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )

    def rabbitmqctl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node (its cookie and epmd); raise on failure if
        ``check``."""
        return self._cli("rabbitmqctl", *args, timeout=timeout, check=check)

    def _cli(self, tool: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(RABBITMQ_BIN / tool), "-n", self.node, *args]
        result = subprocess.run(
            command, env=self._environment(), cwd=self.directory, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command[1:])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def add_user(
        self,
        name: str,
        password: str | None = None,
        *,
        vhost: str = "/",
        configure: str = ".*",
        write: str = ".*",
        read: str = ".*",
        tags: Sequence[str] = (),
    ) -> Credentials:
        """Create a user (random password unless given) with these permissions on ``vhost``."""
        password = password or secrets.token_hex(16)
        self.rabbitmqctl("add_user", "--", name, password)
        self.rabbitmqctl("set_permissions", "-p", vhost, "--", name, configure, write, read)
        if tags:
            self.rabbitmqctl("set_user_tags", name, *tags)
        return Credentials(name, password)

    # -- life cycle ---------------------------------------------------------------------------------

    def _write_files(self) -> None:
        for folder in (self.home, self.log_dir, self.mnesia_base):
            folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        cookie = self.home / ".erlang.cookie"
        if cookie.exists():
            os.chmod(cookie, 0o600)
        cookie.write_text(self.cookie)
        os.chmod(cookie, 0o400)
        (self.directory / "rabbitmq-env.conf").write_text("# private node: nothing from /etc/rabbitmq\n")
        plugins = (["rabbitmq_management"] if self.management else []) + (
            ["rabbitmq_auth_mechanism_ssl"] if self.cert_login else []
        )
        (self.directory / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        self.config_file.write_text("\n".join(self._config_lines()) + "\n")
        os.chmod(self.config_file, 0o600)

    def _listener_lines(self, kind: str, port: int) -> list[str]:
        lines = []
        for index, address in enumerate(self.bind, 1):
            if address in ("0.0.0.0", "::"):
                return [f"listeners.{kind}.default = {port}"]
            lines.append(f"listeners.{kind}.{index} = {address}:{port}")
        return lines

    def _config_lines(self) -> list[str]:
        lines = [
            "# generated by tests/private_servers.py",
            f"default_user = {self.admin.user}",
            f"default_pass = {self.admin.password}",
            "default_vhost = /",
            "default_user_tags.administrator = true",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "loopback_users = none",
            "log.file.level = info",
            "log.console = false",
            "disk_free_limit.absolute = 50MB",
        ]
        lines += self._listener_lines("tcp", self.amqp_port) if self.plain else ["listeners.tcp = none"]
        if self.tls:
            lines += self._listener_lines("ssl", self.amqps_port)
            lines += [
                f"ssl_options.cacertfile = {self.pki.ca_cert}",
                f"ssl_options.certfile = {self.pki.server_cert}",
                f"ssl_options.keyfile = {self.pki.server_key}",
                "ssl_options.verify = verify_peer",
                f"ssl_options.fail_if_no_peer_cert = {str(self.mutual_tls).lower()}",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
                "ssl_options.depth = 2",
                "ssl_handshake_timeout = 15000",
            ]
        if self.cert_login:
            lines += [
                "auth_mechanisms.1 = EXTERNAL",
                "auth_mechanisms.2 = PLAIN",
                "auth_mechanisms.3 = AMQPLAIN",
                "ssl_cert_login_from = common_name",
            ]
        if self.management:
            address = self.bind[0] if self.bind else "0.0.0.0"
            if self.management_tls:
                lines += [
                    f"management.ssl.port = {self.management_port}",
                    f"management.ssl.ip = {address}",
                    f"management.ssl.cacertfile = {self.pki.ca_cert}",
                    f"management.ssl.certfile = {self.pki.server_cert}",
                    f"management.ssl.keyfile = {self.pki.server_key}",
                    "management.ssl.verify = verify_peer",
                    f"management.ssl.fail_if_no_peer_cert = {str(self.management_mutual_tls).lower()}",
                    "management.ssl.versions.1 = tlsv1.3",
                    "management.ssl.versions.2 = tlsv1.2",
                ]
            else:
                lines += [f"management.tcp.port = {self.management_port}", f"management.tcp.ip = {address}"]
        return lines + list(self.extra_config)

    def _choose_ports(self) -> None:
        # AMQP port is always set: RABBITMQ_NODE_PORT must be a number even when listeners.tcp = none.
        self.amqp_port, self.amqps_port = free_port(), free_port()
        self.management_port, self.dist_port = free_port(), free_port()
        self.epmd_port = self.cluster.epmd_port if self.cluster else free_port()

    def start(self, *, same_ports: bool = False) -> PrivateRabbitMQ:
        """Start the node and wait (by polling, up to ``startup_timeout``) until it and its management API
        answer. Retries with other ports if one was taken meanwhile. Stops everything on failure.

        ``same_ports`` starts a stopped node again where it was, on its data: clients' URLs still hold,
        and a cluster's node rejoins its cluster."""
        _Server._live.add(self)
        began = time.monotonic()
        try:
            for attempt in range(1 if same_ports else 3):
                if not same_ports:
                    self._choose_ports()
                self._write_files()
                for log in [self.console_log, *self.log_dir.glob("*.log")]:
                    if log.exists():  # keep a failed attempt's logs, out of the way of the next one's checks
                        log.rename(log.with_name(f"{log.name}.attempt{attempt}"))
                try:
                    if self.cluster is None:
                        self._start_epmd()
                    with open(self.console_log, "ab") as console:
                        self._process = subprocess.Popen(
                            [str(RABBITMQ_BIN / "rabbitmq-server")],
                            env=self._environment(),
                            cwd=self.directory,
                            stdin=subprocess.DEVNULL,
                            stdout=console,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    self._await_startup(began + self.startup_timeout)
                    break
                except _PortTaken:
                    if attempt == 2:
                        raise
                    self._kill()
            self.startup_seconds = time.monotonic() - began
            return self
        except BaseException:
            self.stop()
            raise

    def _start_epmd(self) -> None:
        with open(self.directory / "epmd.log", "ab") as log:
            self._epmd = subprocess.Popen(
                [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=self._environment(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        # Not just "the port accepts": someone else's listener would, while our epmd failed to bind.
        while not _listens(self._epmd.pid, self.epmd_port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise _PortTaken(f"epmd on {self.epmd_port} did not start: {self._tail(self.directory / 'epmd.log')}")
            time.sleep(0.05)

    def _logs(self) -> str:
        text = self._tail(self.console_log)
        for log in sorted(self.log_dir.glob("*.log")):
            text += f"\n--- {log.name}\n" + self._tail(log)
        return text

    def _await_startup(self, deadline: float) -> None:
        while True:
            if self._process.poll() is not None:
                logs = self._logs()
                if self._port_taken():
                    raise _PortTaken(logs)
                raise RuntimeError(f"RabbitMQ node {self.node} exited ({self._process.returncode}):\n{logs}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"RabbitMQ node {self.node} did not start in {self.startup_timeout} s:\n" + self._logs()
                )
            # Fails fast while the node isn't registered yet; then blocks until the app runs.
            wait = max(5, min(remaining, 300))
            try:
                result = self.rabbitmqctl("await_startup", "--timeout", str(int(wait)), timeout=wait + 60, check=False)
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0:
                break
            time.sleep(0.5)
        # await_startup can succeed just before a listener that failed (port taken) halts the node, and a
        # port taken by someone else accepts connections too: ask the node which listeners it runs.
        expected = set(self._listener_ports())
        while True:
            running = self._running_listener_ports()
            if running is not None and expected <= running and self._process.poll() is None:
                return
            if self._process.poll() is not None:
                break
            if self._port_taken():  # without the management plugin the node even stays up
                raise _PortTaken(self._logs())
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"listeners of {self.node} did not start (want {sorted(expected)}, have "
                    f"{sorted(running or ())}):\n" + self._logs()
                )
            time.sleep(0.3)
        if self._port_taken():
            raise _PortTaken(self._logs())
        raise RuntimeError(f"RabbitMQ node {self.node} exited ({self._process.returncode}):\n{self._logs()}")

    def _port_taken(self) -> bool:
        for log in [self.console_log, *self.log_dir.glob("*.log")]:
            try:
                text = log.read_text(errors="replace").lower()
                if "eaddrinuse" in text or "could not bind to distribution port" in text:
                    return True
            except OSError:
                pass
        return False

    def _listener_ports(self) -> list[int]:
        ports = ([self.amqp_port] if self.plain else []) + ([self.amqps_port] if self.tls else [])
        return ports + ([self.management_port] if self.management else [])

    def _running_listener_ports(self) -> set[int] | None:
        """Ports of the listeners the node runs (management API, else rabbitmqctl eval), None if it can't say."""
        if self.management:
            try:
                status, overview = self.management_request("/api/overview", timeout=10)
            except (OSError, ssl.SSLError):
                return None
            if status != 200 or not isinstance(overview, dict):
                return None
            return {int(listener["port"]) for listener in overview.get("listeners", [])}
        # #listener{node, protocol, host, ip_address, port, opts}: the port is element 6 of the tuple.
        result = self.rabbitmqctl("eval", "[element(6, L) || L <- rabbit_networking:active_listeners()].", check=False)
        if result.returncode != 0:
            return None
        return {int(port) for port in re.findall(r"\d+", result.stdout)}

    def stop(self, timeout: float = 120, *, clean: bool = False) -> None:
        """Kill the node, its helpers and its epmd at once (what the fixtures do: its data is thrown
        away, and a clean stop, or the SIGTERM that starts one, takes 5-10 s). With ``clean``, stop it
        with ``rabbitmqctl stop`` first and kill only what is left. Idempotent."""
        try:
            if clean and self._process is not None and self._process.poll() is None:
                try:
                    self.rabbitmqctl(
                        "stop", str(self.pid_file), "--timeout", str(int(timeout)), timeout=timeout + 30, check=False
                    )
                    self._process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._kill(grace=10 if clean else 0)
            _Server._live.discard(self)

    def _kill(self, grace: float = 10) -> None:
        _kill_everything_of(self.tag, self._process, grace=grace)
        if self._epmd is not None:
            _kill_everything_of(self.tag, self._epmd, grace=min(grace, 2))
        self._process = self._epmd = None


class _PortTaken(RuntimeError):
    pass


@dataclass(frozen=True)
class _ClusterShare:
    """What the nodes of one private cluster share."""

    cookie: str
    admin: Credentials
    epmd_port: int


class PrivateRabbitMQCluster(_Server):
    """``size`` private RabbitMQ nodes on loopback, clustered with ``rabbitmqctl join_cluster``.

    The nodes (``fedq-c<i>-<token>@localhost``) share an Erlang cookie, the ``admin`` user and an
    epmd of their own on a random port, through which they find each other; each has its own ports
    and data directory. :meth:`kill` and :meth:`restart` take a node down hard and bring it back on
    the same ports and data, so that clients' URL lists still name it and it rejoins.
    """

    def __init__(self, directory: str | os.PathLike, *, size: int = 3, startup_timeout: float = STARTUP_TIMEOUT):
        self.directory = Path(directory)
        self.tag = f"rabbitmq-cluster-{secrets.token_hex(4)}"
        token = secrets.token_hex(3)
        self.share = _ClusterShare(secrets.token_hex(20).upper(), Credentials("admin", secrets.token_hex(16)), 0)
        self.size = size
        self.startup_timeout = startup_timeout
        self.names = [f"fedq-c{index}-{token}@localhost" for index in range(size)]
        self.nodes: list[PrivateRabbitMQ] = []
        self._epmd: subprocess.Popen | None = None

    @property
    def admin(self) -> Credentials:
        return self.share.admin

    def amqp_urls(self, user: str | None = None, password: str | None = None, *, first: int = 0) -> str:
        """Every node's URL, comma-separated, starting with node ``first`` (for clients that should
        connect to that node and fail over to the others)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.amqp_url(user, password) for node in order)

    def start(self) -> PrivateRabbitMQCluster:
        _Server._live.add(self)
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._start_epmd()
            for name in self.names:
                node = PrivateRabbitMQ(
                    self.directory / name.split("@")[0],
                    node_name=name,
                    cluster=self.share,
                    startup_timeout=self.startup_timeout,
                )
                self.nodes.append(node)
                node.start()
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.rabbitmqctl("stop_app")
                node.rabbitmqctl("join_cluster", seed.node)
                node.rabbitmqctl("start_app")
            self.await_running(self.names)
            return self
        except BaseException:
            self.stop()
            raise

    def _start_epmd(self) -> None:
        for _ in range(3):
            port = free_port()
            self.share = _ClusterShare(self.share.cookie, self.share.admin, port)
            with open(self.directory / "epmd.log", "ab") as log:
                self._epmd = subprocess.Popen(
                    [EPMD, "-port", str(port), "-address", "127.0.0.1"],
                    env=_clean_environment(**{MARKER: self.tag}),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._epmd.poll() is None:
                if _listens(self._epmd.pid, port):
                    return
                time.sleep(0.05)
            _kill_everything_of(self.tag, self._epmd, grace=0)
        raise RuntimeError(f"the cluster's epmd did not start: {self._tail(self.directory / 'epmd.log')}")

    def running_nodes(self, asker: PrivateRabbitMQ | None = None) -> set[str]:
        """The nodes the cluster reports running, asked of ``asker`` (default: any node that answers)."""
        for node in [asker] if asker else self.nodes:
            result = node.rabbitmqctl("cluster_status", "--formatter", "json", check=False, timeout=60)
            if result.returncode == 0:
                return set(json.loads(result.stdout).get("running_nodes", []))
        return set()

    def await_running(self, names: Iterable[str], timeout: float | None = None) -> None:
        """Wait until every node of ``names`` runs in the cluster."""
        wanted = set(names)
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while not wanted <= self.running_nodes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster nodes {sorted(wanted - self.running_nodes())} are not running")
            time.sleep(1)

    def node_named(self, name: str) -> PrivateRabbitMQ:
        return next(node for node in self.nodes if node.node == name)

    def kill(self, node: PrivateRabbitMQ) -> None:
        """Kill ``node`` at once (SIGKILL to the node and its helpers)."""
        node.stop()

    def restart(self, node: PrivateRabbitMQ) -> None:
        """Start a killed node again on its ports and data, and wait until it runs in the cluster."""
        node.start(same_ports=True)
        self.await_running([node.node])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        _kill_everything_of(self.tag, self._epmd, grace=0)
        self._epmd = None
        _Server._live.discard(self)


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


class PrivateRedis(_Server):
    """A ``redis-server`` of its own on random ports, without persistence.

    ``tls`` adds a TLS port using ``pki`` (``tls-auth-clients yes`` when
    ``mutual_tls``, else ``optional``); ``plain=False`` disables the plain port
    (``port 0``). ACL: ``default`` is off, ``admin`` (``~* &* +@all``) has a
    generated password. Redis 7.0 can't map a client certificate to a user, so
    clients still AUTH with a password; the certificate only gets them through
    the TLS handshake.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        pki: ThrowawayPKI | None = None,
        tls: bool = False,
        plain: bool = True,
        mutual_tls: bool = True,
        bind: Sequence[str] = ("127.0.0.1",),
        extra_config: Sequence[str] = (),
        startup_timeout: float = 120,
        admin: Credentials | None = None,
        port_chooser: Callable[[], int] | None = None,
    ):
        if tls and pki is None:
            raise ValueError("tls needs a pki")
        if not plain and not tls:
            raise ValueError("a Redis without plain and TLS ports would be unreachable")
        self.directory = Path(directory)
        self.pki = pki
        self.tls = tls
        self.plain = plain
        self.mutual_tls = mutual_tls
        self.bind = tuple(bind)
        self.extra_config = tuple(extra_config)
        self.startup_timeout = startup_timeout
        self.tag = f"redis-{secrets.token_hex(6)}"
        self.admin = admin or Credentials("admin", secrets.token_hex(16))
        self.port_chooser = port_chooser or free_port
        self.config_file = self.directory / "redis.conf"
        self.log_file = self.directory / "redis.log"
        self.port: int | None = None
        self.tls_port: int | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        first = self.bind[0] if self.bind else "0.0.0.0"
        first = first.lstrip("-")
        return "localhost" if first in ("0.0.0.0", "::", "*") else first

    def url(self, user: str | None = None, password: str | None = None, db: int = 0, *, tls: bool | None = None) -> str:
        """``rediss://`` (the TLS port, default when TLS is on) or ``redis://`` URL for ``user`` (admin by default)."""
        from urllib.parse import quote

        tls = self.tls if tls is None else tls
        if tls and not self.tls or not tls and not self.plain:
            raise RuntimeError("this Redis has no such port")
        user = self.admin.user if user is None else user
        password = self.admin.password if password is None and user == self.admin.user else password
        credentials = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if tls else 'redis'}://{credentials}{host}:{self.tls_port if tls else self.port}/{db}"

    def client(
        self,
        user: str | None = None,
        password: str | None = None,
        *,
        client_cert: str | None | bool = True,
        ca: str | os.PathLike | None = None,
        tls: bool | None = None,
        anonymous: bool = False,
        **kwargs,
    ):
        """A redis-py client: over TLS (default when TLS is on) trusting ``ca`` (default: the PKI's CA) with
        the client certificate named ``client_cert`` (``True``: ``"redis-client"``; ``None``/``False``: none).
        ``anonymous`` sends no AUTH at all."""
        import redis

        tls = self.tls if tls is None else tls
        user = self.admin.user if user is None else user
        password = self.admin.password if password is None and user == self.admin.user else password
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: a refusal must surface at once (redis-py >= 6 retries 3 times with backoff by default).
        options = dict(
            host=self.host,
            port=self.tls_port if tls else self.port,
            socket_timeout=15,
            socket_connect_timeout=15,
            retry=Retry(NoBackoff(), 0),
        )
        if not anonymous:
            options.update(username=user, password=password)
        if tls:
            options.update(
                ssl=True, ssl_ca_certs=str(ca or self.pki.ca_cert), ssl_cert_reqs="required", ssl_check_hostname=True
            )
            if client_cert:
                name = "redis-client" if client_cert is True else client_cert
                cert, key = self.pki.client(name)
                options.update(ssl_certfile=str(cert), ssl_keyfile=str(key))
        options.update(kwargs)
        return redis.Redis(**options)

    def add_user(
        self, name: str, password: str | None = None, rules: Sequence[str] = ("~*", "&*", "+@all")
    ) -> Credentials:
        """``ACL SETUSER name on >password RULES`` through the admin connection."""
        password = password or secrets.token_hex(16)
        with self.client() as admin:
            admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
        return Credentials(name, password)

    def _config_lines(self) -> list[str]:
        lines = [
            "# generated by tests/private_servers.py",
            f"bind {' '.join(self.bind) if self.bind else '* -::*'}",
            "protected-mode no",
            f"port {self.port if self.plain else 0}",
            "daemonize no",
            f"dir {self.directory}",
            f"logfile {self.log_file}",
            f"pidfile {self.directory / 'redis.pid'}",
            'save ""',
            "appendonly no",
            "databases 16",
            f"user {self.admin.user} on >{self.admin.password} ~* &* +@all",
            "user default off",
        ]
        if self.tls:
            lines += [
                f"tls-port {self.tls_port}",
                f"tls-cert-file {self.pki.server_cert}",
                f"tls-key-file {self.pki.server_key}",
                f"tls-ca-cert-file {self.pki.ca_cert}",
                f"tls-auth-clients {'yes' if self.mutual_tls else 'optional'}",
                'tls-protocols "TLSv1.2 TLSv1.3"',
            ]
        return lines + list(self.extra_config)

    def start(self, *, same_ports: bool = False) -> PrivateRedis:
        """Start redis-server and wait until the admin user can PING. Stops everything on failure.
        ``same_ports`` starts a stopped server again where it was (a cluster's node rejoins)."""
        _Server._live.add(self)
        began = time.monotonic()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            for attempt in range(1 if same_ports else 3):
                if not same_ports:
                    self.port, self.tls_port = self.port_chooser(), free_port()
                self.config_file.write_text("\n".join(self._config_lines()) + "\n")
                os.chmod(self.config_file, 0o600)
                with open(self.directory / "stdout.log", "ab") as log:
                    self._process = subprocess.Popen(
                        [REDIS_SERVER, str(self.config_file)],
                        env=_clean_environment(**{MARKER: self.tag}),
                        cwd=self.directory,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                try:
                    self._await_startup(began + self.startup_timeout)
                    break
                except _PortTaken:
                    if attempt == 2:
                        raise
                    _kill_everything_of(self.tag, self._process, grace=5)
            self.startup_seconds = time.monotonic() - began
            return self
        except BaseException:
            self.stop()
            raise

    def _logs(self) -> str:
        return self._tail(self.directory / "stdout.log") + self._tail(self.log_file)

    def _await_startup(self, deadline: float) -> None:
        import redis

        while True:
            if self._process.poll() is not None:
                logs = self._logs()
                if "address already in use" in logs.lower():
                    raise _PortTaken(logs)
                raise RuntimeError(f"redis-server exited ({self._process.returncode}):\n{logs}")
            try:
                with self.client(socket_timeout=5, socket_connect_timeout=5) as admin:
                    if admin.ping():
                        return
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer in {self.startup_timeout} s:\n{self._logs()}")
            time.sleep(0.1)

    def stop(self, *, grace: float = 15) -> None:
        """Shut redis-server down (SIGTERM, then SIGKILL after ``grace`` seconds). Idempotent."""
        _kill_everything_of(self.tag, self._process, grace=grace)
        self._process = None
        _Server._live.discard(self)


def _port_with_cluster_bus() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    while True:
        port = free_port()
        if _bindable(port + 10000, "127.0.0.1") and _bindable(port + 10000, "0.0.0.0"):
            return port


class PrivateRedisCluster(_Server):
    """A Redis Cluster of its own on loopback: ``masters`` masters with ``replicas`` replicas each, made
    with ``redis-cli --cluster create``. The nodes share the ``admin`` user (replicas log in to their
    master with it) and keep no data on disk, only their cluster configuration (``nodes.conf``).

    :meth:`kill` takes a node down with SIGKILL and :meth:`restart` brings it back on its port, where
    it rejoins. Restart a killed master only after its replica took over (:meth:`await_master`): a
    master without persistence that came back first would serve its slots empty.
    """

    def __init__(self, directory: str | os.PathLike, *, masters: int = 3, replicas: int = 1, node_timeout_ms=2000):
        self.directory = Path(directory)
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.admin = Credentials("admin", secrets.token_hex(16))
        self.nodes: list[PrivateRedis] = []

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """``redis+cluster://user:password@<every node>/`` (admin by default)."""
        from urllib.parse import quote

        user = self.admin.user if user is None else user
        password = self.admin.password if password is None and user == self.admin.user else (password or "")
        nodes = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{quote(user, safe='')}:{quote(password, safe='')}@{nodes}/"

    def start(self) -> PrivateRedisCluster:
        _Server._live.add(self)
        try:
            cluster_config = [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.node_timeout_ms}",
                f"masteruser {self.admin.user}",
                f"masterauth {self.admin.password}",
            ]
            for index in range(self.masters * (1 + self.replicas)):
                node = PrivateRedis(
                    self.directory / f"node{index}",
                    admin=self.admin,
                    extra_config=cluster_config,
                    port_chooser=_port_with_cluster_bus,
                )
                self.nodes.append(node)
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            self.redis_cli("--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes")
            wait_until(lambda: all(self.cluster_state(node) == "ok" for node in self.nodes), 120, "cluster not ok")
            wait_until(self.replicated, 120, "the replicas did not finish their first sync")
            return self
        except BaseException:
            self.stop()
            raise

    def redis_cli(self, *args: str, timeout: float = 120) -> str:
        command = ["redis-cli", "--user", self.admin.user, "--pass", self.admin.password, "--no-auth-warning", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_clean_environment())
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def cluster_state(self, node: PrivateRedis) -> str | None:
        import redis

        try:
            with node.client(socket_timeout=5, socket_connect_timeout=5) as client:
                return client.execute_command("CLUSTER INFO").get("cluster_state")
        except (redis.exceptions.RedisError, OSError):
            return None

    def replicated(self) -> bool:
        """Whether every live replica is connected to its master (a master killed before that has no
        replica to take over)."""
        for node in self.nodes:
            if node._process is None:
                continue
            with node.client() as client:
                role = client.execute_command("ROLE")
            if _text(role[0]) == "slave" and _text(role[3]) != "connected":
                return False
        return True

    def master_of(self, job: str) -> PrivateRedis:
        """The node that serves ``job``'s keys now, as the live nodes see it."""
        from redis.crc import key_slot

        slot = key_slot(f"{{{job}}}".encode())
        for node in self.nodes:
            if node._process is None:
                continue
            try:
                with node.client(socket_timeout=5, socket_connect_timeout=5) as client:
                    for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                        if start <= slot <= end:
                            port = int(master[1])
                            return next(candidate for candidate in self.nodes if candidate.port == port)
            except Exception:  # noqa: BLE001 - ask the next node
                continue
        raise RuntimeError(f"no live node knows who serves {job!r}")

    def replicas_of(self, master: PrivateRedis) -> list[PrivateRedis]:
        with master.client() as client:
            ports = {int(replica[1]) for replica in client.execute_command("ROLE")[2]}
        return [node for node in self.nodes if node.port in ports]

    def kill(self, node: PrivateRedis) -> None:
        node.stop(grace=0)

    def await_master(self, job: str, other_than: PrivateRedis, timeout: float = 120) -> PrivateRedis:
        """Wait until a node other than ``other_than`` serves ``job`` and the cluster is ok; that node."""

        def promoted() -> PrivateRedis | None:
            try:
                master = self.master_of(job)
            except RuntimeError:
                return None
            live = [node for node in self.nodes if node._process is not None]
            if master is other_than or not all(self.cluster_state(node) == "ok" for node in live):
                return None
            return master

        return wait_until(promoted, timeout, f"no replica took over {job!r}'s slot")

    def restart(self, node: PrivateRedis) -> None:
        node.start(same_ports=True)
        wait_until(lambda: self.cluster_state(node) == "ok", 120, "the restarted node did not rejoin")
        wait_until(self.replicated, 120, "the restarted node did not finish its sync")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(grace=0)
        _Server._live.discard(self)


class PrivateRedisSentinel(_Server):
    """A Redis master with one replica, watched by three sentinels (quorum 2) under the name
    ``master_name``, all on loopback ports of their own and keeping no data. The servers share the
    ``admin`` user; the sentinels log in to them with it and take no credentials themselves.

    :meth:`kill` takes a server down with SIGKILL, :meth:`await_failover` waits until the sentinels
    name another master, and :meth:`restart` brings a server back on its port (the sentinels make
    a returning master a replica of the new one).
    """

    def __init__(self, directory: str | os.PathLike, *, master_name: str = "fedq", down_after_ms: int = 2000):
        self.directory = Path(directory)
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.admin = Credentials("admin", secrets.token_hex(16))
        self.servers: list[PrivateRedis] = []
        self.sentinel_ports: list[int] = []
        self.tag = f"sentinels-{secrets.token_hex(4)}"
        self._sentinels: list[subprocess.Popen] = []

    def url(self) -> str:
        from urllib.parse import quote

        sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return (
            f"redis+sentinel://{self.admin.user}:{quote(self.admin.password, safe='')}@{sentinels}/{self.master_name}"
        )

    def start(self) -> PrivateRedisSentinel:
        _Server._live.add(self)
        try:
            auth = [f"masteruser {self.admin.user}", f"masterauth {self.admin.password}"]
            master = PrivateRedis(self.directory / "server0", admin=self.admin, extra_config=auth).start()
            self.servers.append(master)
            replica = PrivateRedis(
                self.directory / "server1",
                admin=self.admin,
                extra_config=[*auth, f"replicaof 127.0.0.1 {master.port}"],
            ).start()
            self.servers.append(replica)
            wait_until(lambda: self.role(replica) == ("slave", "connected"), 120, "the replica did not sync")
            for index in range(3):
                self._start_sentinel(index, master.port)
            wait_until(lambda: self.sentinels_agree(master), 120, "the sentinels did not find the servers")
            return self
        except BaseException:
            self.stop()
            raise

    def _start_sentinel(self, index: int, master_port: int) -> None:
        folder = self.directory / f"sentinel{index}"
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = folder / "sentinel.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    "daemonize no",
                    f"dir {folder}",
                    f"logfile {folder / 'sentinel.log'}",
                    f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 2",
                    f"sentinel auth-user {self.master_name} {self.admin.user}",
                    f"sentinel auth-pass {self.master_name} {self.admin.password}",
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master_name} 10000",
                ]
            )
            + "\n"
        )
        self._sentinels.append(
            subprocess.Popen(
                [REDIS_SERVER, str(config), "--sentinel"],
                env=_clean_environment(**{MARKER: self.tag}),
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        self.sentinel_ports.append(port)

    def role(self, server: PrivateRedis) -> tuple[str, str] | None:
        """("master", "") or ("slave", link state) of a live server, None if it does not answer."""
        import redis

        try:
            with server.client(socket_timeout=5, socket_connect_timeout=5) as client:
                role = client.execute_command("ROLE")
        except (redis.exceptions.RedisError, OSError):
            return None
        return (_text(role[0]), _text(role[3]) if _text(role[0]) == "slave" else "")

    def named_master(self) -> int | None:
        """The master's port as a majority of the sentinels name it."""
        import redis

        answers = []
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5) as sentinel:
                    address = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                answers.append(int(address[1]) if address else None)
            except (redis.exceptions.RedisError, OSError):
                answers.append(None)
        for answer in set(answers):
            if answer is not None and answers.count(answer) >= 2:
                return answer
        return None

    def sentinels_agree(self, master: PrivateRedis) -> bool:
        import redis

        if self.named_master() != master.port:
            return False
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5) as sentinel:
                    state = sentinel.execute_command("SENTINEL", "MASTER", self.master_name)
            except (redis.exceptions.RedisError, OSError):
                return False
            fields = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
            fields = {_text(key): _text(value) for key, value in fields.items()}
            if int(fields.get("num-slaves", 0)) < 1 or int(fields.get("num-other-sentinels", 0)) < 2:
                return False
        return True

    def master(self) -> PrivateRedis:
        port = self.named_master()
        return next(server for server in self.servers if server.port == port)

    def kill(self, server: PrivateRedis) -> None:
        server.stop(grace=0)

    def await_failover(self, other_than: PrivateRedis, timeout: float = 120) -> PrivateRedis:
        def promoted() -> PrivateRedis | None:
            port = self.named_master()
            if port is None or port == other_than.port:
                return None
            server = next(server for server in self.servers if server.port == port)
            return server if self.role(server) == ("master", "") else None

        return wait_until(promoted, timeout, "the sentinels did not promote the replica")

    def restart(self, server: PrivateRedis) -> None:
        server.start(same_ports=True)
        wait_until(lambda: self.role(server) == ("slave", "connected"), 120, "the old master did not follow the new")

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=0)
        for sentinel in self._sentinels:
            _kill_everything_of(self.tag, sentinel, grace=0)
        self._sentinels = []
        _Server._live.discard(self)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


def _new_pki(tmp_path_factory) -> ThrowawayPKI:
    """Also valid for 10.200.0.1-10.200.0.9, for network namespaces."""
    return ThrowawayPKI(tmp_path_factory.mktemp("pki"), extra_ips=[f"10.200.0.{i}" for i in range(1, 10)])


def _secure_rabbitmq(pki: ThrowawayPKI, tmp_path_factory, bind: Sequence[str] = ("127.0.0.1",)):
    """AMQPS only (mutual TLS), HTTPS management, EXTERNAL cert login."""
    with PrivateRabbitMQ(
        tmp_path_factory.mktemp("rabbitmq"),
        pki=pki,
        tls=True,
        plain=False,
        mutual_tls=True,
        management_tls=True,
        cert_login=True,
        bind=bind,
    ) as server:
        yield server


def _secure_redis(pki: ThrowawayPKI, tmp_path_factory, bind: Sequence[str] = ("127.0.0.1",)):
    """TLS only with required client certificates, ACL default user off."""
    with PrivateRedis(
        tmp_path_factory.mktemp("redis"), pki=pki, tls=True, plain=False, mutual_tls=True, bind=bind
    ) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> ThrowawayPKI:
    """A fresh throwaway PKI per test module that imports it (see :func:`_new_pki`)."""
    return _new_pki(tmp_path_factory)


@pytest.fixture
def tls_flags(pki):
    """fedq's TLS files for this process (the PKI's CA and a client certificate), and the same
    as ``fedq`` flags for subprocesses; put back to none afterwards."""
    from fedq.common import tls

    cert, key = pki.client("fedq-test")
    tls.configure(tls.TLSFiles(str(pki.ca_cert), str(cert), str(key)))
    yield ["--tls-ca", str(pki.ca_cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    tls.configure(tls.TLSFiles())


@pytest.fixture(scope="module")
def secure_rabbitmq(pki, tmp_path_factory):
    """A private RabbitMQ node per test module that imports it (see :func:`_secure_rabbitmq`)."""
    yield from _secure_rabbitmq(pki, tmp_path_factory)


@pytest.fixture(scope="module")
def secure_redis(pki, tmp_path_factory):
    """A private Redis per test module that imports it (see :func:`_secure_redis`)."""
    yield from _secure_redis(pki, tmp_path_factory)


# The session's, for modules that import none of the above (tests/integration/conftest.py imports these).


@pytest.fixture(scope="session", name="pki")
def session_pki(tmp_path_factory) -> ThrowawayPKI:
    """The session's throwaway PKI (see :func:`_new_pki`)."""
    return _new_pki(tmp_path_factory)


# On every address, so that the other hosts of tests/netns.py reach them at the bridge's address too.


@pytest.fixture(scope="session", name="secure_rabbitmq")
def session_secure_rabbitmq(pki, tmp_path_factory):
    """The session's private RabbitMQ node, shared (see :func:`_secure_rabbitmq`), on every address;
    killed at the end."""
    yield from _secure_rabbitmq(pki, tmp_path_factory, bind=("0.0.0.0",))


@pytest.fixture(scope="session", name="secure_redis")
def session_secure_redis(pki, tmp_path_factory):
    """The session's private Redis, shared (see :func:`_secure_redis`), on every address."""
    yield from _secure_redis(pki, tmp_path_factory, bind=("0.0.0.0",))
