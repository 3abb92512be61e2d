"""Connecting to Redis, and the errors every part of the store raises."""

from __future__ import annotations

import logging
import ssl
import time

import redis
from redis._parsers import Encoder

from fedq.common import tls
from fedq.common.retry import CONNECT_ATTEMPTS, backoff_delays
from fedq.common.settings import redact_url

log = logging.getLogger("fedq.store")

# Errors after which waiting and retrying can succeed (Redis restarting, network blip).
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# Commands are packed by redis-py's own serializer, which hands a large value to the socket as
# it is; hiredis's packer (redis-py's choice when hiredis is installed) copies every argument
# first, at under 1 GB/s: a 4 MB SET took 9-10 ms of client CPU with it and 1.2-1.8 ms without,
# a 40 MB one 122-131 ms against 44-58 (one weights blob per version, one delta per update).
# Replies are still parsed by hiredis. One packer serves every connection: it keeps no state.
COMMAND_PACKER = redis.connection.PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


class StoreError(RuntimeError):
    """Redis is unreachable or holds something we cannot use; the message is for the user."""


class HeadMovedError(StoreError):
    """Another writer committed first: the compare-and-set of the head failed."""


class UnknownVersionError(StoreError):
    """The job has no such model version (never committed, or pruned)."""


class TamperedVersionError(StoreError):
    """A version's stored weights (or the head) do not match what was committed: tampering or corruption."""


def connect_redis(url: str, *, blocking: bool = False, attempts: int = CONNECT_ATTEMPTS) -> redis.Redis:
    """A client for ``url``, once Redis answers; ``blocking`` clients have no socket timeout (for XREAD BLOCK).

    A Redis that is not up yet is retried with the same bounded backoff as RabbitMQ;
    a bad URL or refused credentials fail at once.
    """
    try:
        # rediss://: verify the server against the configured CA, check its host name, send our certificate.
        secure = tls.configured().redis_arguments() if url.startswith("rediss://") else {}
        client = redis.Redis.from_url(
            url,
            socket_timeout=None if blocking else 30,
            socket_connect_timeout=5,
            health_check_interval=30,
            command_packer=COMMAND_PACKER,
            **secure,
        )
    except ValueError as error:
        raise StoreError(f"Redis URL {redact_url(url)!r} is not valid: {error}") from None
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
