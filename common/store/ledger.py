"""The task ledger: tasks the coordinator issued and has not closed, and the task ids already applied.

An update is accepted only for an open task (``inflight``), and only once
(``applied``). A task is opened before it is published, stays open while its
update waits in the buffer, and is closed by the commit that applies its update
(in the commit script), or when its update is refused, its lease ends or the
job finishes.

A coordinator may also open tasks ahead of dispatch (``reserved``): with the commit of a version
it writes the ids of the next tasks it expects to hand out at that version, so that handing one
out is a publish and no Redis round trip. A reserved entry may never be published, so a
coordinator that finds one it did not write accepts its update but does not count it in flight;
its ``issued_at`` is the latest the task can have been published, so its lease is never cut short.
The next commit rewrites the reserved entries that went out as plain ones, with their real issue time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import redis
from redis.typing import EncodableT

from fedq.common.store.keys import JobKeys


@dataclass(frozen=True)
class OpenTask:
    version: int  # the model version the task was issued at: its update's base version
    issued_at: float  # wall-clock seconds, for the lease
    reserved: bool = False  # opened ahead of dispatch: perhaps never published (see the module's docstring)


def entries(tasks: Mapping[str, OpenTask]) -> dict[EncodableT, EncodableT]:
    """The ledger's hash fields for ``tasks``."""
    return {
        task_id: json.dumps(
            {"version": task.version, "issued_at": task.issued_at} | ({"reserved": True} if task.reserved else {})
        )
        for task_id, task in tasks.items()
    }


def write_changes(
    pipe: redis.client.Pipeline, keys: JobKeys, opened: Mapping[str, OpenTask], closed: Iterable[str]
) -> None:
    """Queue, on ``pipe``, the opening (or rewriting) of ``opened`` and the closing of ``closed``."""
    closed = list(closed)
    if opened:
        pipe.hset(keys.inflight, mapping=entries(opened))
    if closed:
        pipe.hdel(keys.inflight, *closed)


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
        if not tasks:
            return
        self.redis.hset(self.keys.inflight, mapping=entries(tasks))

    def open_tasks(self) -> dict[str, OpenTask]:
        """Every open entry, reserved ones included."""
        tasks = {}
        for task_id, value in cast("dict[bytes, bytes]", self.redis.hgetall(self.keys.inflight)).items():
            try:
                record = json.loads(value)
                tasks[task_id.decode()] = OpenTask(
                    int(record["version"]), float(record["issued_at"]), reserved=record.get("reserved") is True
                )
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                continue  # not written by a coordinator: it opens nothing
        return tasks

    def close(self, task_ids: Iterable[str]) -> None:
        task_ids = list(task_ids)
        if task_ids:
            self.redis.hdel(self.keys.inflight, *task_ids)
