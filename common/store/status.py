"""The job's description (its spec), its run status, and the counters of updates not applied."""
from __future__ import annotations

import json
import time
from typing import Any

import redis

from fedq.common.store.keys import JobKeys


class JobStatus:
    """What the job trains (spec) and whether its coordinator is running, stopped or finished."""

    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def load_spec(self) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.spec)
        return None if raw is None else json.loads(raw)

    def save_spec(self, spec: dict[str, Any]) -> None:
        self.redis.set(self.keys.spec, json.dumps(spec, sort_keys=True))

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
        return {name.decode()[len(prefix):]: int(count)
                for name, count in self.redis.hgetall(self.keys.counters).items()
                if name.decode().startswith(prefix)}
