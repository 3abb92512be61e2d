"""Enrolled worker identities: who may send updates to a job, and who was revoked.

An identity is a worker or a site: replicas of a site (a Kubernetes Deployment scaled by
KEDA) share its credentials and name themselves ``<site>.<replica>`` (``site-a.pod-7f9c``);
their updates count as the site's, and its Redis user may write their blobs and liveness.

``fedq admin enroll`` writes one entry per worker id when it creates the worker's RabbitMQ
and Redis users; ``fedq admin revoke`` marks it revoked (the entry stays, for the audit
trail). Once a job has any enrolled identity (or its coordinator runs with
``--require-identity``), an update is accepted only from the RabbitMQ user enrolled for the
worker id it names, and never from a revoked one.

The coordinator judges arriving updates on a copy of the entries (:class:`IdentityCache`), and its
commit script reads the entries of the updates a version applies again, in the transaction that
applies them (``common/store/versions.py``): a stale copy may let a revoked worker's update into
the buffer, never into a version.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import cast, overload

import redis

from fedq.common.store.keys import JobKeys

# Worker ids that can be enrolled: they become parts of user names and of Redis ACL key
# patterns, so no glob characters, no separators.
ENROLLABLE_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# How old the coordinator's copy of the identities may be before the next update reads them all again.
IDENTITY_CACHE_SECONDS = 5.0


def identity_of(worker_id: str) -> str:
    """The enrolled identity a worker id belongs to: itself, or the site before the first '.'."""
    return worker_id.split(".", 1)[0]


def identity_user(job: str, worker_id: str) -> str:
    """The RabbitMQ and Redis user name of ``worker_id`` in ``job``."""
    return f"fedq.{job}.{worker_id}"


@dataclass(frozen=True)
class Identity:
    worker_id: str
    user: str
    enrolled_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class IdentityRegistry:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def enroll(self, worker_id: str, user: str) -> Identity:
        identity = Identity(worker_id, user, time.time())
        self.redis.hset(self.keys.identities, worker_id, json.dumps(asdict(identity)))
        return identity

    def revoke(self, worker_id: str) -> Identity | None:
        identity = self.get(worker_id)
        if identity is None:
            return None
        revoked = Identity(identity.worker_id, identity.user, identity.enrolled_at, time.time())
        self.redis.hset(self.keys.identities, worker_id, json.dumps(asdict(revoked)))
        return revoked

    def get(self, worker_id: str) -> Identity | None:
        return self._parse(cast("bytes | None", self.redis.hget(self.keys.identities, worker_id)))

    def lookup(self, worker_id: str) -> tuple[bool, Identity | None]:
        """(whether the job has any enrolled identity, ``worker_id``'s), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(self.keys.identities)
            pipe.hget(self.keys.identities, worker_id)
            count, value = pipe.execute()
        return bool(count), self._parse(value)

    def snapshot(self) -> dict[str, Identity]:
        """Every entry, by worker id, in one round trip."""
        values = cast("dict[bytes, bytes]", self.redis.hgetall(self.keys.identities))
        return {worker_id.decode(): self._parse(value) for worker_id, value in values.items()}

    def all(self) -> list[Identity]:
        return sorted(self.snapshot().values(), key=lambda identity: identity.worker_id)

    @overload
    @staticmethod
    def _parse(value: bytes) -> Identity: ...

    @overload
    @staticmethod
    def _parse(value: bytes | None) -> Identity | None: ...

    @staticmethod
    def _parse(value: bytes | None) -> Identity | None:
        return None if value is None else Identity(**json.loads(value))


class IdentityCache:
    """The registry's entries as of at most ``max_age`` seconds ago, for the coordinator's checks.

    The coordinator accepts a sender the copy accepts and judges anything else on what Redis holds
    now (``coordinator/service/validation.py``), so a newly enrolled worker is never refused for a
    stale copy. A revocation reaches the copy within ``max_age``; until then the commit script,
    which reads the entries of the updates it applies, keeps the revoked worker's updates out of versions.
    """

    def __init__(self, registry: IdentityRegistry, max_age: float = IDENTITY_CACHE_SECONDS):
        self.registry = registry
        self.max_age = max_age
        self._entries: dict[str, Identity] = {}
        self._read_at = -math.inf

    def cached(self, worker_id: str) -> tuple[bool, Identity | None]:
        """As :meth:`IdentityRegistry.lookup`, from the copy (read again first when it is too old)."""
        if time.monotonic() - self._read_at > self.max_age:
            self._entries, self._read_at = self.registry.snapshot(), time.monotonic()
        return bool(self._entries), self._entries.get(worker_id)

    def forget(self) -> None:
        """Read every entry again at the next lookup (after a refusal at commit, a reconnect)."""
        self._read_at = -math.inf
