"""Update blobs: the weight delta of one update, keyed by its worker and task id (the claim check)."""

from __future__ import annotations

from typing import cast

import redis

from fedq.common.store.keys import JobKeys


class UpdateBlobs:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def key(self, task_id: str, worker_id: str) -> str:
        """The only key an update of ``task_id`` from ``worker_id`` may claim."""
        return self.keys.update(worker_id, task_id)

    def put(self, task_id: str, worker_id: str, payload: bytes, ttl_seconds: int) -> str:
        key = self.key(task_id, worker_id)
        self.redis.set(key, payload, ex=ttl_seconds)
        return key

    def get(self, key: str) -> bytes | None:
        return cast("bytes | None", self.redis.get(key))

    def size(self, key: str) -> int:
        """The blob's length in bytes without reading it (0 when there is none).

        Raises ``redis.ResponseError`` (WRONGTYPE) when the key holds no string.
        """
        return int(self.redis.strlen(key))
