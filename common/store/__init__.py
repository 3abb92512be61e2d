"""The Redis model store of one job: one facade over the parts, each with one concern.

    store.versions   head, weights, metadata, history stream, optimizer state, retention
    store.ledger     tasks in flight and task ids already applied (idempotency)
    store.blobs      claim-checked update deltas
    store.workers    worker liveness
    store.status     the job's spec and run status
    store.counters   updates rejected or skipped, by reason

Every key name is defined in :mod:`fedq.common.store.keys`. Methods raise
:class:`StoreError` subclasses, never KeyError.
"""

from __future__ import annotations

import redis

from fedq.common.store.blobs import UpdateBlobs
from fedq.common.store.client import (
    TRANSIENT_REDIS_ERRORS,
    HeadMovedError,
    StoreError,
    TamperedVersionError,
    UnknownVersionError,
    connect_every_master,
    connect_every_server,
    connect_redis,
)
from fedq.common.store.fleet import FleetRecords
from fedq.common.store.identities import IdentityRegistry
from fedq.common.store.keys import JobKeys
from fedq.common.store.ledger import TaskLedger
from fedq.common.store.partitions import PartitionLeases
from fedq.common.store.status import JobStatus, OutcomeCounters
from fedq.common.store.versions import VersionStore
from fedq.common.store.workers import WorkerRegistry

__all__ = [
    "TRANSIENT_REDIS_ERRORS",
    "HeadMovedError",
    "JobKeys",
    "ModelStore",
    "StoreError",
    "TamperedVersionError",
    "UnknownVersionError",
    "connect_every_master",
    "connect_every_server",
    "connect_redis",
]


class ModelStore:
    """All Redis state of one job."""

    @classmethod
    def open(cls, url: str, job: str) -> ModelStore:
        """The store of ``job`` on the Redis that ``url`` names: one server, a cluster, or Sentinel's master."""
        return cls(connect_redis(url, job=job), job)

    def require_replicas(self, replicas: int) -> None:
        """Writes that messages are acknowledged for wait until ``replicas`` replicas hold them
        (:class:`~fedq.common.store.client.Replication`)."""
        self.versions.replication.replicas = self.blobs.replication.replicas = replicas

    def __init__(self, client: redis.Redis, job: str):
        self.redis = client
        self.job = job
        self.keys = JobKeys(job)
        self.versions = VersionStore(client, self.keys)
        self.ledger = TaskLedger(client, self.keys)
        self.blobs = UpdateBlobs(client, self.keys)
        self.workers = WorkerRegistry(client, self.keys)
        self.partitions = PartitionLeases(client, self.keys)
        self.fleet = FleetRecords(client, self.keys)
        self.identities = IdentityRegistry(client, self.keys)
        self.status = JobStatus(client, self.keys)
        self.counters = OutcomeCounters(client, self.keys)

    def memory_usage(self) -> dict[str, int]:
        """Bytes Redis uses for this job, by kind of key (model, meta, update, history, ...)."""
        usage: dict[str, int] = {}
        keys = list(self.redis.scan_iter(match=self.keys.all(), count=1000))
        # One round trip per thousand keys, not one per key: the coordinator measures every
        # second, and a key at a time cost it 5 % of its loop on a job of a few hundred keys.
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            sizes = self.redis.pipeline(transaction=False)
            for key in batch:
                sizes.memory_usage(key, samples=0)
            for key, size in zip(batch, sizes.execute()):
                kind = self.keys.kind(key.decode())
                usage[kind] = usage.get(kind, 0) + int(size or 0)
        return usage

    def delete_job(self) -> int:
        """Remove every key of the job (tests, and `fedq demo` starting afresh)."""
        keys = list(self.redis.scan_iter(match=self.keys.all(), count=1000))
        return self.redis.delete(*keys) if keys else 0
