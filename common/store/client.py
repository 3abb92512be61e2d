"""Connecting to Redis, and the errors every part of the store raises."""
from __future__ import annotations

import redis

# Errors after which waiting and retrying can succeed (Redis restarting, network blip).
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class StoreError(RuntimeError):
    """Redis is unreachable or holds something we cannot use; the message is for the user."""


class HeadMovedError(StoreError):
    """Another writer committed first: the compare-and-set of the head failed."""


class UnknownVersionError(StoreError):
    """The job has no such model version (never committed, or pruned)."""


def connect_redis(url: str, *, blocking: bool = False) -> redis.Redis:
    """A client for ``url``; ``blocking`` clients have no socket timeout (for XREAD BLOCK)."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=None if blocking else 30,
                                      socket_connect_timeout=5, health_check_interval=30)
        client.ping()
    except ValueError as error:
        raise StoreError(f"Redis URL {url!r} is not valid: {error}") from None
    except redis.RedisError as error:
        raise StoreError(f"cannot reach Redis at {url}: {error}") from None
    return client
