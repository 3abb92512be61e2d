"""Enrolled worker identities: who may send updates to a job, and who was revoked.

An identity is a worker or a site: replicas of a site (a Kubernetes Deployment scaled by
KEDA) share its credentials and name themselves ``<site>.<replica>`` (``site-a.pod-7f9c``);
their updates count as the site's, and its Redis user may write their blobs and liveness.

``fedq admin enroll`` writes one entry per worker id when it creates the worker's RabbitMQ
and Redis users; ``fedq admin revoke`` marks it revoked (the entry stays, for the audit
trail). The coordinator reads the entry of every update's worker: once a job has any
enrolled identity (or runs with ``--require-identity``), an update is accepted only from
the RabbitMQ user enrolled for the worker id it names, and never from a revoked one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from typing import cast, overload

import redis

from fedq.common.store.keys import JobKeys

# Worker ids that can be enrolled: they become parts of user names and of Redis ACL key
# patterns, so no glob characters, no separators.
ENROLLABLE_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


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

    def all(self) -> list[Identity]:
        values = cast("dict[bytes, bytes]", self.redis.hgetall(self.keys.identities))
        return sorted((self._parse(value) for value in values.values()), key=lambda identity: identity.worker_id)

    @overload
    @staticmethod
    def _parse(value: bytes) -> Identity: ...

    @overload
    @staticmethod
    def _parse(value: bytes | None) -> Identity | None: ...

    @staticmethod
    def _parse(value: bytes | None) -> Identity | None:
        return None if value is None else Identity(**json.loads(value))
