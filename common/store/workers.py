"""The worker registry: one short-lived liveness key per worker."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from fedq.common.store.keys import JobKeys


class WorkerRegistry:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def touch(self, worker_id: str, info: dict[str, Any], ttl_seconds: int) -> None:
        """Say that ``worker_id`` is alive; the key disappears ``ttl_seconds`` after the last call."""
        self.redis.set(self.keys.worker(worker_id), json.dumps({**info, "last_seen": time.time()}), ex=ttl_seconds)

    def forget(self, worker_id: str) -> None:
        self.redis.delete(self.keys.worker(worker_id))

    def live(self) -> list[dict[str, Any]]:
        """Workers seen within their liveness TTL, by id."""
        keys = sorted(self.redis.scan_iter(match=self.keys.worker_pattern(), count=1000))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(value) for value in values if value is not None]
