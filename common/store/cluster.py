"""Redis beyond one server: a Redis Cluster, or a master watched by Sentinel.

URLs (credentials and TLS as in ``redis://`` and ``rediss://``)::

    redis+cluster://user:password@host1:7000,host2:7001/          any nodes of the cluster (seeds)
    redis+sentinel://user:password@host1:26379,host2:26379/mymaster   the sentinels, and the master's name

**Cluster.** Every key of a job carries the hash tag ``{job}`` (``keys.py``), so the whole job lives in
one hash slot, on one master: its commit script, transactions, ``WAIT`` and ``SCAN`` all run on that
node, exactly as on a single Redis. A job's client is therefore an ordinary ``redis.Redis`` whose
connections go to whichever master serves the job's slot *now* (:class:`JobSlotConnection`): a
connection asks the cluster where the slot lives when it opens, and a reply that says the slot has
moved or the cluster is failing over (``MOVED``, ``CLUSTERDOWN``, ``READONLY``, ``TRYAGAIN``) drops it
as a lost connection, so that the caller's usual retry opens one to the new master. Many jobs spread
over the cluster's masters; one job is bounded by one master, which is what one slot allows.

**Sentinel.** redis-py's own :class:`redis.sentinel.Sentinel` finds the master and follows its
failovers. The sentinels themselves are reached without credentials (give them none, or protect them
by network), and database numbers work as on one server.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.exceptions
from redis.connection import SSLConnection
from redis.crc import key_slot
from redis.sentinel import Sentinel

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
# How long asking a cluster node or a sentinel where the master is may take.
LOOKUP_TIMEOUTS = {"socket_timeout": 10, "socket_connect_timeout": 5}
# Replies after which the job's slot is served elsewhere (or soon will be): the command did not run.
SLOT_ELSEWHERE = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
)


@dataclass(frozen=True)
class ServersURL:
    """A ``redis+cluster://`` or ``redis+sentinel://`` URL, taken apart."""

    kind: str  # "cluster" or "sentinel"
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    master_name: str = ""  # sentinel: the name the sentinels monitor
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> ServersURL | None:
        """The parts of ``url``, or None for a URL of one server (``redis://``, ``rediss://``, ``unix://``)."""
        scheme, _, rest = url.partition("://")
        if scheme not in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
            return None
        login, _, rest = rest.rpartition("@")
        hosts, _, path = rest.partition("/")
        username, _, password = login.partition(":")
        nodes = tuple(_host_and_port(node) for node in hosts.split(",") if node.strip())
        if not nodes:
            raise ValueError(f"it names no node, e.g. {scheme}://host1:7000,host2:7001/")
        segments = [segment for segment in path.split("?")[0].split("/") if segment]
        kind = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
        master_name, db = "", 0
        if kind == "sentinel":
            if not segments:
                raise ValueError(f"name the master the sentinels monitor, e.g. {scheme}://host:26379/mymaster")
            master_name = urllib.parse.unquote(segments[0])
            if len(segments) > 1:
                db = _number(segments[1], "the database")
        elif segments and segments != ["0"]:
            raise ValueError("a Redis Cluster has only database 0")
        return cls(
            kind,
            scheme.startswith("rediss"),
            nodes,
            urllib.parse.unquote(username) or None,
            urllib.parse.unquote(password) if login and ":" in login else None,
            master_name,
            db,
        )


def _host_and_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host:
        raise ValueError(f"node {text.strip()!r} has no port, e.g. host:7000")
    return host.strip("[]"), _number(port, f"the port of {text.strip()!r}")


def _number(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} is not a number: {text!r}")
    return int(text)


class SlotLocator:
    """Finds the master that serves one hash slot, asking the nodes it knows in turn."""

    def __init__(self, servers: ServersURL, slot: int, arguments: dict[str, Any]):
        self.servers = servers
        self.slot = slot
        # (a lookup never blocks for long, even for a client that may: XREAD BLOCK's)
        self.arguments = arguments | LOOKUP_TIMEOUTS
        self.known: list[tuple[str, int]] = list(servers.nodes)

    def master(self) -> tuple[str, int]:
        failures: list[str] = []
        for slots, asked_host in self._slot_tables(failures):
            for start, end, master, *_replicas in slots:
                if start <= self.slot <= end:
                    return _address(master, asked_host)
            failures.append(f"{asked_host}: no master serves slot {self.slot}")
        raise redis.exceptions.ConnectionError(
            f"no node of the Redis Cluster answered with the master of slot {self.slot}: {'; '.join(failures)}"
        )

    def masters(self) -> list[tuple[str, int]]:
        """Every master of the cluster, as the first node that answers sees them."""
        failures: list[str] = []
        for slots, asked_host in self._slot_tables(failures):
            return sorted({_address(master, asked_host) for _start, _end, master, *_ in slots})
        raise redis.exceptions.ConnectionError(f"no node of the Redis Cluster answered: {'; '.join(failures)}")

    def every_node(self) -> list[tuple[str, int]]:
        """Every node of the cluster that serves slots or replicates one that does."""
        failures: list[str] = []
        for slots, asked_host in self._slot_tables(failures):
            return sorted({_address(node, asked_host) for _start, _end, *nodes in slots for node in nodes})
        raise redis.exceptions.ConnectionError(f"no node of the Redis Cluster answered: {'; '.join(failures)}")

    def _slot_tables(self, failures: list[str]) -> Iterator[tuple[list, str]]:
        """``CLUSTER SLOTS`` of each node that answers, in turn, with the host it was asked at; why
        the others did not, into ``failures``. (The pool's connections share the locator, from
        several threads: nothing of one call is kept but the nodes learnt.)"""
        for host, port in list(self.known):
            asked = _node_client(self.servers, host, port, self.arguments)
            try:
                slots = asked.execute_command("CLUSTER SLOTS")
            except redis.exceptions.RedisError as error:
                failures.append(f"{host}:{port}: {error}")
                continue
            finally:
                asked.close()
            self._learn(slots, host)
            yield slots, host

    def _learn(self, slots: list, asked_host: str) -> None:
        """Remember every node of the cluster: the seeds given may be the ones that are down."""
        for _start, _end, *nodes in slots:
            for node in nodes:
                address = _address(node, asked_host)
                if address not in self.known:
                    self.known.append(address)


def _address(node: list, asked_host: str) -> tuple[str, int]:
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return host or asked_host, int(node[1])  # an empty host: the node we asked


class JobSlotConnection(redis.Connection):
    """A connection to the master that serves the job's slot when it opens (see the module's doc)."""

    def __init__(self, **kwargs: Any):
        self.locator: SlotLocator = kwargs.pop("locator")
        super().__init__(**kwargs)

    def connect(self) -> None:
        def open_to_master() -> None:
            if self._sock is not None:  # (already open)
                return  # type: ignore[unreachable]  # redis-py's stubs say _sock is always a socket
            self.host, self.port = self.locator.master()
            self.connect_check_health(check_health=True, retry_socket_connect=False)

        self.retry.call_with_retry(open_to_master, lambda error: self.disconnect(error))

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except SLOT_ELSEWHERE as error:
            self.disconnect()
            raise redis.exceptions.ConnectionError(
                f"the job's slot is no longer served by {self.host}:{self.port} ({error})"
            ) from error


class JobSlotSSLConnection(JobSlotConnection, SSLConnection):
    pass


def client_for(servers: ServersURL, job: str | None, arguments: dict[str, Any]) -> redis.Redis:
    """A client of ``job``'s keys on the servers ``servers`` names (``arguments``: redis-py's options)."""
    login: dict[str, Any] = {"username": servers.username, "password": servers.password}
    if servers.kind == "sentinel":
        return _sentinel(servers, arguments).master_for(
            servers.master_name, db=servers.db, ssl=servers.tls, **login, **arguments
        )
    if job is None:
        raise ValueError("a Redis Cluster serves each job from the master of its slot: name the job")
    pool = redis.ConnectionPool(
        connection_class=JobSlotSSLConnection if servers.tls else JobSlotConnection,
        locator=SlotLocator(servers, key_slot(f"{{{job}}}".encode()), arguments),
        **login,
        **arguments,
    )
    return redis.Redis(connection_pool=pool)


def every_server(servers: ServersURL, arguments: dict[str, Any]) -> list[redis.Redis]:
    """A client of every server that holds or may come to hold the data, replicas included: ACL
    users are each server's own, and a replica that takes over must know the job's users."""
    if servers.kind == "sentinel":
        sentinel = _sentinel(servers, arguments)
        master = sentinel.discover_master(servers.master_name)
        addresses = [master, *sentinel.discover_slaves(servers.master_name)]
    else:
        addresses = SlotLocator(servers, 0, arguments).every_node()
    return [_node_client(servers, host, port, arguments) for host, port in addresses]


def every_master(servers: ServersURL, arguments: dict[str, Any]) -> list[redis.Redis]:
    """A client of each master of a Redis Cluster (to find every job: each master holds the jobs of its slots)."""
    masters = SlotLocator(servers, 0, arguments).masters()
    return [_node_client(servers, host, port, arguments) for host, port in masters]


def _node_client(servers: ServersURL, host: str, port: int, arguments: dict[str, Any]) -> redis.Redis:
    """A client of one server, with the URL's login and TLS and fedq's options (as a pool: the
    command packer is a connection's option, not a client's)."""
    pool = redis.ConnectionPool(
        host=host,
        port=port,
        connection_class=SSLConnection if servers.tls else redis.Connection,
        username=servers.username,
        password=servers.password,
        **arguments,
    )
    return redis.Redis(connection_pool=pool)


def _sentinel(servers: ServersURL, arguments: dict[str, Any]) -> Sentinel:
    """The sentinels of a ``redis+sentinel://`` URL (no credentials; TLS as the URL says)."""
    to_sentinels: dict[str, Any] = dict(LOOKUP_TIMEOUTS)
    if servers.tls:
        to_sentinels |= {"ssl": True, **_ssl_only(arguments)}
    return Sentinel(list(servers.nodes), sentinel_kwargs=to_sentinels)


def _ssl_only(arguments: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in arguments.items() if key.startswith("ssl_")}
