"""Typed, schema-versioned history records, built and parsed here and nowhere else.

Every committed version has a :class:`VersionRecord`: stored as its metadata
(``meta:<v>``, without the update list) and as its entry in the history stream
(with the :class:`AppliedUpdate` list, in the order the server step applied
them). Replay, audit, reports and rollbacks read these records; they say how
each version came to be.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

VERSION_SCHEMA = "fedq.version/1"


class RecordError(ValueError):
    """A stored record this build cannot read."""


@dataclass(frozen=True)
class AppliedUpdate:
    """One update folded into a version: who sent it, from which version, with what weight."""

    task_id: str
    worker_id: str
    base_version: int
    staleness: int
    weight: float
    num_examples: int
    digest: str  # sha256 of the delta's safetensors bytes
    blob_key: str  # where the delta is kept for replay (until retention prunes it)
    # The delta's L2 norm: a restarted coordinator bounds new updates by it. None in records
    # written before it was kept.
    norm: float | None = None
    # What adaptive weighting used: the staleness its worker's measured speed predicted, and the
    # worker's share of the active workers' examples. None: not measured, or a record written
    # before they were kept.
    expected_staleness: float | None = None
    data_share: float | None = None
    update_interval: float | None = None  # versions between two updates of its worker
    local_steps: int = 0  # minibatch steps its worker reported (0: not reported)


@dataclass(frozen=True)
class VersionRecord:
    version: int
    parent: int | None
    digest: str  # sha256 of the version's safetensors weights
    created: float
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # the aggregation config the server step used
    config_digest: str | None = None
    mean_staleness: float = 0.0
    max_staleness: int = 0
    aggregation_seconds: float | None = None
    rollback_of: int | None = None  # set on a version made by `fedq rollback`
    # Differential privacy (common/privacy.py): the seed of this step's central noise (replay draws
    # the same), and the privacy the job had spent once this version existed: epsilon for the
    # config's dp_delta, over dp_steps noised steps (central) or updates of one worker (local).
    dp_seed: int | None = None
    epsilon: float | None = None
    dp_steps: int | None = None
    updates_applied: int = 0
    updates: tuple[AppliedUpdate, ...] = ()  # empty when read from the metadata alone

    @classmethod
    def build(
        cls, version: int, parent: int | None, digest: str, applied: tuple[AppliedUpdate, ...] = (), **fields: Any
    ) -> VersionRecord:
        """A new version's record; staleness summaries come from ``applied``."""
        stalenesses = [update.staleness for update in applied]
        summary = (
            {"mean_staleness": sum(stalenesses) / len(stalenesses), "max_staleness": max(stalenesses)}
            if stalenesses
            else {}
        )
        return cls(
            version=version,
            parent=parent,
            digest=digest,
            created=fields.pop("created", time.time()),
            updates_applied=len(applied),
            updates=tuple(applied),
            **(summary | fields),
        )

    def to_dict(self, *, with_updates: bool = True) -> dict[str, Any]:
        document = {"schema": VERSION_SCHEMA, **asdict(self)}
        document = {name: value for name, value in document.items() if value is not None or name == "parent"}
        if not with_updates:
            del document["updates"]
        return document

    def meta_json(self) -> str:
        return json.dumps(self.to_dict(with_updates=False), sort_keys=True)

    def entry_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> VersionRecord:
        document = json.loads(text)
        # Records written before the schema field existed have the same fields.
        schema = document.pop("schema", VERSION_SCHEMA)
        if schema != VERSION_SCHEMA:
            raise RecordError(f"version record schema {schema!r} is not supported (this build reads {VERSION_SCHEMA})")
        updates = tuple(AppliedUpdate(**update) for update in document.pop("updates", ()))
        known = cls.__dataclass_fields__
        return cls(**{name: value for name, value in document.items() if name in known}, updates=updates)

    def with_updates(self, updates: tuple[AppliedUpdate, ...]) -> VersionRecord:
        return replace(self, updates=tuple(updates))
