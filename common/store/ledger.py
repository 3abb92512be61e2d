"""The task ledger: tasks the coordinator issued and has not closed, and the task ids already applied.

An update is accepted only for an open task (``inflight``), and only once
(``applied``). A task is opened before it is published, stays open while its
update waits in the buffer, and is closed by the commit that applies its update
(in the commit script), or when its update is refused, its lease ends or the
job finishes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import redis

from fedq.common.store.keys import JobKeys


@dataclass(frozen=True)
class OpenTask:
    version: int  # the model version the task was issued at: its update's base version
    issued_at: float  # wall-clock seconds, for the lease


class TaskLedger:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def applied_version(self, task_id: str) -> int | None:
        """The version that applied ``task_id``'s update, if any (the idempotency record)."""
        raw = self.redis.hget(self.keys.applied, task_id)
        return None if raw is None else int(raw)

    def open(self, tasks: Mapping[str, OpenTask]) -> None:
        """Record tasks (task id -> its version and issue time) as issued, in one round trip."""
        self.redis.hset(
            self.keys.inflight,
            mapping={
                task_id: json.dumps({"version": task.version, "issued_at": task.issued_at})
                for task_id, task in tasks.items()
            },
        )

    def open_tasks(self) -> dict[str, OpenTask]:
        tasks = {}
        for task_id, value in cast("dict[bytes, bytes]", self.redis.hgetall(self.keys.inflight)).items():
            try:
                record = json.loads(value)
                tasks[task_id.decode()] = OpenTask(int(record["version"]), float(record["issued_at"]))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                continue  # not written by a coordinator: it opens nothing
        return tasks

    def close(self, task_ids: Iterable[str]) -> None:
        task_ids = list(task_ids)
        if task_ids:
            self.redis.hdel(self.keys.inflight, *task_ids)
