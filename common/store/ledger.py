"""The task ledger: tasks dispatched and not yet answered, and the task ids already applied."""
from __future__ import annotations

import json
from typing import Any, Iterable

import redis

from fedq.common.store.keys import JobKeys


class TaskLedger:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def applied_version(self, task_id: str) -> int | None:
        """The version that applied ``task_id``'s update, if any (the idempotency record)."""
        raw = self.redis.hget(self.keys.applied, task_id)
        return None if raw is None else int(raw)

    def record_dispatch(self, task_id: str, version: int, issued_at: float) -> None:
        self.redis.hset(self.keys.inflight, task_id, json.dumps({"version": version, "issued_at": issued_at}))

    def in_flight(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(self.keys.inflight)
        return {task_id.decode(): json.loads(value) for task_id, value in raw.items()}

    def forget(self, task_ids: Iterable[str]) -> None:
        task_ids = list(task_ids)
        if task_ids:
            self.redis.hdel(self.keys.inflight, *task_ids)
