"""Partition leases: which worker holds which partition of a built-in task's data.

The coordinator is the only writer (see coordinator/service/partitions.py): it
reads the workers' liveness keys and leases each worker that asks a partition
nobody else holds. A worker reads only its own key, which its Redis user may
read and nobody else's; it cannot take a partition for itself.
"""

from __future__ import annotations

from typing import cast

import redis

from fedq.common.store.keys import JobKeys


class PartitionLeases:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def of(self, worker_id: str) -> int | None:
        """The partition leased to ``worker_id`` (what the worker reads), or None."""
        value = self.redis.get(self.keys.partition(worker_id))
        return None if value is None else int(value)

    def table(self) -> dict[str, int]:
        """Every lease: worker id -> partition."""
        leases = cast("dict[bytes, bytes]", self.redis.hgetall(self.keys.partitions))
        return {worker.decode(): int(partition) for worker, partition in leases.items()}

    def lease(self, worker_id: str, partition: int) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.partitions, worker_id, partition)
        pipe.set(self.keys.partition(worker_id), partition)
        pipe.execute()

    def release(self, worker_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.partitions, worker_id)
        pipe.delete(self.keys.partition(worker_id))
        pipe.execute()
