"""The job's signed description and signing key, its run status, and the counters of updates not applied."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from fedq.common.store.keys import JobKeys
from fedq.common.wire.description import JobDescription
from fedq.common.wire.signing import SigningKey


class JobStatus:
    """What the job trains (its signed description), the coordinator's signing key, and whether
    the coordinator is running, stopped or finished."""

    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def load_description_text(self) -> bytes | None:
        """The description as stored (parse it with ``JobDescription.from_json``)."""
        return cast("bytes | None", self.redis.get(self.keys.spec))

    def load_description(self) -> JobDescription | None:
        raw = self.load_description_text()
        return None if raw is None else JobDescription.from_json(raw)

    def previous_task(self) -> tuple[str, dict[str, Any]] | None:
        """(task, parameters) the job was started with, read leniently: also from older fedq's spec."""
        raw = self.load_description_text()
        if raw is None:
            return None
        try:
            document = json.loads(raw)
            return str(document["task"]), dict(document.get("task_params") or {})
        except (ValueError, KeyError, TypeError):
            return None

    def save_description(self, description: JobDescription) -> None:
        self.redis.set(self.keys.spec, description.to_json())

    def signing_key(self) -> SigningKey:
        """The job's private key, created on first use. Only the coordinator calls this."""
        self.redis.set(self.keys.signing_key, SigningKey.generate().to_bytes(), nx=True)
        return SigningKey.from_bytes(cast(bytes, self.redis.get(self.keys.signing_key)))

    def archive_settings(self) -> dict[str, Any]:
        """How the coordinator keeps the job's history: {url (None: all in Redis), hot_versions,
        checkpoint_every, redis_budget_mb} ({} before a coordinator ran)."""
        raw = self.redis.get(self.keys.archive)
        try:
            return {} if raw is None else dict(json.loads(raw))
        except (ValueError, TypeError):
            return {}

    def archive_url(self) -> str | None:
        return self.archive_settings().get("url")

    def record_archive(
        self, url: str | None, hot_versions: int, checkpoint_every: int, redis_budget_mb: int | None = None
    ) -> None:
        self.redis.set(
            self.keys.archive,
            json.dumps(
                {
                    "url": url,
                    "hot_versions": hot_versions,
                    "checkpoint_every": checkpoint_every,
                    "redis_budget_mb": redis_budget_mb,
                }
            ),
        )

    def set(self, **state: Any) -> None:
        self.redis.set(self.keys.state, json.dumps({**state, "updated": time.time()}))

    def load(self) -> dict[str, Any]:
        raw = self.redis.get(self.keys.state)
        return {} if raw is None else json.loads(raw)


class OutcomeCounters:
    """Counts of updates that were not applied, by outcome ('rejected', 'skipped') and reason."""

    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def add(self, outcome: str, reason: str) -> None:
        self.redis.hincrby(self.keys.counters, f"{outcome}.{reason}", 1)

    def get(self, outcome: str) -> dict[str, int]:
        """reason -> count for one outcome."""
        prefix = outcome + "."
        return {
            name.decode()[len(prefix) :]: int(count)
            for name, count in cast("dict[bytes, bytes]", self.redis.hgetall(self.keys.counters)).items()
            if name.decode().startswith(prefix)
        }
