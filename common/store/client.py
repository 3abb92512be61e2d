"""Connecting to Redis, and the errors every part of the store raises."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis._parsers import Encoder

from fedq.common import tls
from fedq.common.retry import CONNECT_ATTEMPTS, backoff_delays
from fedq.common.settings import redact_url
from fedq.common.store.cluster import ServersURL, client_for, every_master, every_server

log = logging.getLogger("fedq.store")

# Errors after which waiting and retrying can succeed (Redis restarting, network blip).
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# Commands are packed by redis-py's own serializer, which hands a large value to the socket as
# it is; hiredis's packer (redis-py's choice when hiredis is installed) copies every argument
# first, at under 1 GB/s: a 4 MB SET took 9-10 ms of client CPU with it and 1.2-1.8 ms without,
# a 40 MB one 122-131 ms against 44-58 (one weights blob per version, one delta per update).
# Replies are still parsed by hiredis. One packer serves every connection: it keeps no state.
COMMAND_PACKER = redis.connection.PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


class NotReplicatedError(redis.ConnectionError):
    """Fewer replicas than required acknowledged a write in time (``WAIT``). Its callers treat it as a
    lost connection: they start over from what Redis holds, so that nothing is acknowledged on the
    strength of a write a failover could still lose."""


@dataclass
class Replication:
    """How many replicas must hold a write before fedq acts on it (``--redis-wait-replicas``).

    With 0, a write counts once the master has it, and a master that dies before its replica copied
    the last writes takes them along (Redis replicates asynchronously). With 1 or more, the commit of
    a version, a worker's update blob and a coordinator's (re)start each wait for that many replicas
    (``WAIT``, on the connection that wrote) before any message is acknowledged for them; while too
    few replicas are connected, the job waits rather than risk a version.
    """

    replicas: int = 0
    timeout_ms: int = 10_000

    def wait_in(self, pipe: redis.client.Pipeline) -> None:
        """Queue the ``WAIT`` behind ``pipe``'s writes (the same connection: WAIT counts its writes)."""
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)

    def check(self, acknowledged: int, what: str) -> None:
        if acknowledged < self.replicas:
            raise NotReplicatedError(
                f"{what} reached {acknowledged} of the {self.replicas} replica(s) required in {self.timeout_ms} ms"
            )


class StoreError(RuntimeError):
    """Redis is unreachable or holds something we cannot use; the message is for the user."""


class HeadMovedError(StoreError):
    """Another writer committed first: the compare-and-set of the head failed."""


class UnknownVersionError(StoreError):
    """The job has no such model version (never committed, or pruned)."""


class TamperedVersionError(StoreError):
    """A version's stored weights (or the head) do not match what was committed: tampering or corruption."""


def connect_redis(
    url: str, *, job: str | None = None, blocking: bool = False, attempts: int = CONNECT_ATTEMPTS
) -> redis.Redis:
    """A client for ``url``, once Redis answers; ``blocking`` clients have no socket timeout (for XREAD BLOCK).

    ``url`` names one Redis, a Redis Cluster or a master watched by Sentinel (``store/cluster.py``);
    a cluster client serves the keys of ``job`` alone. A Redis that is not up yet is retried with the
    same bounded backoff as RabbitMQ; a bad URL or refused credentials fail at once.
    """
    servers, arguments = _parse(url, blocking)
    if servers is None:
        try:
            client = redis.Redis.from_url(url, **arguments)
        except ValueError as error:
            raise StoreError(f"Redis URL {redact_url(url)!r} is not valid: {error}") from None
    elif servers.kind == "cluster" and job is None:
        raise StoreError(
            f"Redis at {redact_url(url)} is a Redis Cluster, which serves each job from the master of its "
            "slot: this command needs --job"
        )
    else:
        client = client_for(servers, job, arguments)
    return _answering(client, url, attempts)


def connect_every_master(url: str, *, attempts: int = CONNECT_ATTEMPTS) -> list[redis.Redis]:
    """A client of each master of the Redis Cluster ``url`` names; of the one master, for other URLs."""
    return _connect_each(url, attempts, every_master, kinds=("cluster",))


def connect_every_server(url: str, *, attempts: int = CONNECT_ATTEMPTS) -> list[redis.Redis]:
    """A client of every server behind ``url``, replicas included (for what each keeps of its own,
    like ACL users); of the one Redis, for a plain URL."""
    return _connect_each(url, attempts, every_server, kinds=("cluster", "sentinel"))


def _connect_each(
    url: str,
    attempts: int,
    servers_of: Callable[[ServersURL, dict[str, Any]], list[redis.Redis]],
    *,
    kinds: tuple[str, ...],
) -> list[redis.Redis]:
    servers, arguments = _parse(url, blocking=False)
    if servers is None or servers.kind not in kinds:
        return [connect_redis(url, attempts=attempts)]
    try:
        clients = servers_of(servers, arguments)
    except redis.RedisError as error:
        raise StoreError(f"cannot reach the servers of {redact_url(url)}: {error}") from None
    return [_answering(client, url, attempts) for client in clients]


def _parse(url: str, blocking: bool) -> tuple[ServersURL | None, dict[str, Any]]:
    try:
        servers = ServersURL.parse(url)
    except ValueError as error:
        raise StoreError(f"Redis URL {redact_url(url)!r} is not valid: {error}") from None
    # rediss://: verify the server against the configured CA, check its host name, send our certificate.
    secure = tls.configured().redis_arguments() if url.startswith("rediss") else {}
    arguments = dict(
        socket_timeout=None if blocking else 30,
        socket_connect_timeout=5,
        health_check_interval=30,
        command_packer=COMMAND_PACKER,
        **secure,
    )
    return servers, arguments


def _answering(client: redis.Redis, url: str, attempts: int) -> redis.Redis:
    """``client`` once its server answers a PING."""
    delays = backoff_delays(attempts)
    attempt = 1
    while True:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as error:  # a ConnectionError to redis-py, but final
            raise StoreError(f"Redis at {redact_url(url)} refused the connection: {error}") from None
        except TRANSIENT_REDIS_ERRORS as error:
            if isinstance(error.__context__, ssl.SSLError) or "SSL" in str(error):
                raise StoreError(f"Redis at {redact_url(url)} failed the TLS handshake: {error}") from None
            backoff = next(delays, None)
            if backoff is None:
                raise StoreError(
                    f"cannot reach Redis at {redact_url(url)} after {attempts} attempts: {error}"
                ) from None
            log.warning("event=redis_connect_retry attempt=%d backoff_s=%.1f error=%r", attempt, backoff, error)
            time.sleep(backoff)
            attempt += 1
        except redis.RedisError as error:  # authentication, ACL: retrying cannot help
            raise StoreError(f"Redis at {redact_url(url)} refused the connection: {error}") from None
