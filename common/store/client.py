"""Connecting to Redis, and the errors every part of the store raises."""
from __future__ import annotations

import logging
import time

import redis

from fedq.common.retry import CONNECT_ATTEMPTS, backoff_delays

log = logging.getLogger("fedq.store")

# Errors after which waiting and retrying can succeed (Redis restarting, network blip).
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


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
        client = redis.Redis.from_url(url, socket_timeout=None if blocking else 30,
                                      socket_connect_timeout=5, health_check_interval=30)
    except ValueError as error:
        raise StoreError(f"Redis URL {url!r} is not valid: {error}") from None
    delays = backoff_delays(attempts)
    attempt = 1
    while True:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as error:  # a ConnectionError to redis-py, but final
            raise StoreError(f"Redis at {url} refused the connection: {error}") from None
        except TRANSIENT_REDIS_ERRORS as error:
            backoff = next(delays, None)
            if backoff is None:
                raise StoreError(f"cannot reach Redis at {url} after {attempts} attempts: {error}") from None
            log.warning("event=redis_connect_retry attempt=%d backoff_s=%.1f error=%r", attempt, backoff, error)
            time.sleep(backoff)
            attempt += 1
        except redis.RedisError as error:  # authentication, ACL: retrying cannot help
            raise StoreError(f"Redis at {url} refused the connection: {error}") from None
