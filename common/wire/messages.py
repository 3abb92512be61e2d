"""Versioned message schemas: the round task (coordinator -> worker) and the model
update (worker -> coordinator).

Messages are JSON objects whose ``schema`` field names the kind and version
(``fedq.task/1``). Parsing checks every field's type and raises
:class:`MessageError` with a short machine-readable ``reason`` (used as the
dead-letter reason and metric label) and a sentence for humans. Nothing is ever
unpickled.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

TASK_SCHEMA = "fedq.task/1"
UPDATE_SCHEMA = "fedq.update/1"


class MessageError(ValueError):
    """A message that cannot be used. ``reason`` is a stable label, ``detail`` a sentence."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TrainSettings:
    """Local-training settings a task hands to the worker's task plugin."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class RoundTask:
    job: str
    task_id: str
    model_version: int
    train: TrainSettings
    issued_at: float

    def to_bytes(self) -> bytes:
        body = {"schema": TASK_SCHEMA, **asdict(self)}
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class InlineDelta:
    """The weight delta travels in the message itself (small models)."""

    payload: bytes


@dataclass(frozen=True)
class ClaimCheck:
    """The weight delta lives in Redis under ``key``; the message carries only its claim."""

    key: str
    sha256: str
    nbytes: int


@dataclass(frozen=True)
class ModelUpdate:
    job: str
    task_id: str
    worker_id: str
    base_version: int
    num_examples: int
    delta: InlineDelta | ClaimCheck
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0

    def to_bytes(self) -> bytes:
        if isinstance(self.delta, InlineDelta):
            delta = {"inline": base64.b64encode(self.delta.payload).decode("ascii")}
        else:
            delta = {"key": self.delta.key, "sha256": self.delta.sha256, "nbytes": self.delta.nbytes}
        body = {
            "schema": UPDATE_SCHEMA, "job": self.job, "task_id": self.task_id,
            "worker_id": self.worker_id, "base_version": self.base_version,
            "num_examples": self.num_examples, "metrics": self.metrics,
            "train_seconds": self.train_seconds, "delta": delta,
        }
        return json.dumps(body, separators=(",", ":")).encode()


def _load_object(body: bytes, expected_schema: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, bad UTF-8 and over-long integers;
        # RecursionError, absurdly deep nesting.
        raise MessageError("not_json", "the message body is not JSON") from None
    if not isinstance(document, dict):
        raise MessageError("bad_schema", "the message is not a JSON object")
    schema = document.get("schema")
    kind = expected_schema.split("/")[0]
    if not isinstance(schema, str) or not schema.startswith(kind + "/"):
        raise MessageError("bad_schema", f"expected a {expected_schema} message, got schema {schema!r}")
    if schema != expected_schema:
        raise MessageError("schema_version", f"schema {schema!r} is not supported (this build speaks {expected_schema})")
    return document


def _field(document: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(name)
    # bool is an int in Python, but no field of ours is a boolean: true/false is a schema error.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MessageError("bad_schema", f"field {name!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _non_empty_text(document: dict[str, Any], name: str, limit: int = 200) -> str:
    value = _field(document, name, str)
    if not value or len(value) > limit:
        raise MessageError("bad_schema", f"field {name!r} must be 1-{limit} characters")
    return value


def parse_task(body: bytes) -> RoundTask:
    document = _load_object(body, TASK_SCHEMA)
    train = _field(document, "train", dict)
    epochs, batch_size, seed = (_field(train, name, int) for name in ("epochs", "batch_size", "seed"))
    learning_rate = _field(train, "learning_rate", (int, float))
    if epochs < 1 or batch_size < 1 or not _finite_number(learning_rate) or learning_rate <= 0:
        raise MessageError("bad_schema", "field 'train' needs epochs >= 1, batch_size >= 1, learning_rate > 0")
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, learning_rate=float(learning_rate), seed=seed)
    version = _field(document, "model_version", int)
    if version < 0:
        raise MessageError("bad_schema", "model_version must be 0 or more")
    return RoundTask(job=_non_empty_text(document, "job"), task_id=_non_empty_text(document, "task_id"),
                     model_version=version, train=settings,
                     issued_at=float(_field(document, "issued_at", (int, float))))


def parse_update(body: bytes) -> ModelUpdate:
    document = _load_object(body, UPDATE_SCHEMA)
    base_version = _field(document, "base_version", int)
    num_examples = _field(document, "num_examples", int)
    if base_version < 0:
        raise MessageError("bad_schema", "base_version must be 0 or more")
    if num_examples < 1:
        raise MessageError("bad_schema", "num_examples must be at least 1")
    raw_metrics = document.get("metrics", {})
    if not isinstance(raw_metrics, dict) or not all(_finite_number(value) for value in raw_metrics.values()):
        raise MessageError("bad_schema", "field 'metrics' must map names to finite numbers")
    delta_document = _field(document, "delta", dict)
    delta: InlineDelta | ClaimCheck
    if "inline" in delta_document:
        try:
            delta = InlineDelta(base64.b64decode(delta_document["inline"], validate=True))
        except (TypeError, ValueError):
            raise MessageError("bad_schema", "delta.inline is not base64") from None
    else:
        nbytes = _field(delta_document, "nbytes", int)
        if nbytes < 0:
            raise MessageError("bad_schema", "delta.nbytes must be 0 or more")
        sha256 = _non_empty_text(delta_document, "sha256", 64)
        delta = ClaimCheck(key=_non_empty_text(delta_document, "key", 300), sha256=sha256, nbytes=nbytes)
    train_seconds = document.get("train_seconds", 0.0)
    if not _finite_number(train_seconds) or train_seconds < 0:
        raise MessageError("bad_schema", "field 'train_seconds' must be a finite number >= 0")
    return ModelUpdate(
        job=_non_empty_text(document, "job"), task_id=_non_empty_text(document, "task_id"),
        worker_id=_non_empty_text(document, "worker_id"), base_version=base_version,
        num_examples=num_examples, delta=delta,
        metrics={str(name): float(value) for name, value in raw_metrics.items()},
        train_seconds=float(train_seconds),
    )
