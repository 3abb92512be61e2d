"""Update blobs: the weight delta of one update, keyed by its worker and task id.

A worker writes its delta under its own claim-check key (``update:``), which its Redis user may
write at any time. The coordinator moves it to a key of its own (``delta:``) as it reads it, so
the bytes it verified are the bytes the history keeps: a worker rewriting its blob after its
update was applied cannot change what replay and the archive read.
"""

from __future__ import annotations

from typing import cast

import redis

from fedq.common.store.client import Replication
from fedq.common.store.keys import JobKeys


class UpdateBlobs:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys
        self.replication = Replication()

    def key(self, task_id: str, worker_id: str) -> str:
        """The only key an update of ``task_id`` from ``worker_id`` may claim."""
        return self.keys.update(worker_id, task_id)

    def verified_key(self, task_id: str, worker_id: str) -> str:
        """Where the coordinator keeps that update's delta once it has read it (no worker may write there)."""
        return self.keys.delta(worker_id, task_id)

    def take(self, task_id: str, worker_id: str, max_bytes: int) -> bytes:
        """Move the update's claim-checked blob to its verified key, unless a blob is there already,
        and read at most ``max_bytes + 1`` bytes of the verified key, in one round trip (b"" when
        there is neither).

        The first blob the coordinator reads for a task is the one it keeps: a redelivery (after a
        crash) reads the same bytes again, and a worker rewriting its claim key afterwards, even
        while an old message of its is read again, changes nothing. The move keeps the blob's TTL
        (the commit removes it once the update is applied). Raises ``redis.ResponseError``
        (WRONGTYPE) when the key holds no string.
        """
        verified = self.verified_key(task_id, worker_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.renamenx(self.key(task_id, worker_id), verified)
            pipe.getrange(verified, 0, max_bytes)
            moved, payload = pipe.execute(raise_on_error=False)
        if isinstance(moved, redis.ResponseError) and "no such key" not in str(moved).lower():
            raise moved
        if isinstance(payload, redis.ResponseError):
            raise payload
        return cast("bytes", payload)

    def put(self, task_id: str, worker_id: str, payload: bytes, ttl_seconds: int) -> str:
        """Write an update's blob under its claim-check key, held by the replicas required
        (``replication``) before it returns: its claim is published next."""
        key = self.key(task_id, worker_id)
        writes = self.redis.pipeline(transaction=False)
        writes.set(key, payload, ex=ttl_seconds)
        self.replication.wait_in(writes)
        _, *acknowledged = writes.execute()
        if acknowledged:
            self.replication.check(acknowledged[0], f"the update blob of task {task_id}")
        return key

    def get(self, key: str) -> bytes | None:
        return cast("bytes | None", self.redis.get(key))
