"""Versioned message schemas: the round task (coordinator -> worker) and the model
update (worker -> coordinator).

Messages are JSON objects whose ``schema`` field names the kind and version
(``fedq.task/2``). Parsing checks every field's type and raises
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

# /2: tasks carry the digest of their model version and the coordinator's signature.
TASK_SCHEMA = "fedq.task/2"
UPDATE_SCHEMA = "fedq.update/1"
REFUSAL_SCHEMA = "fedq.refusal/1"
# Bounds on what a task may ask and an update may claim.
MAX_TASK_SECONDS = 86_400
MAX_LOCAL_STEPS = 10**9


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
    # A time budget (device-sized tasks): train as many minibatch steps as fit in this many
    # seconds, at most ``epochs`` epochs and at least one step. 0: exactly ``epochs`` epochs.
    seconds: float = 0.0


@dataclass(frozen=True)
class RoundTask:
    """One round task. ``model_digest`` is the sha256 of the version's weights (workers verify
    what they load against it); ``signature`` is the coordinator's over everything else
    (:meth:`signed_document`), which makes the task a capability only the coordinator issues."""

    job: str
    task_id: str
    model_version: int
    train: TrainSettings
    issued_at: float
    model_digest: str = ""
    # A task of a synchronous round (the round is its model_version): a worker trains at most one
    # task per round, and hands others back for workers that have not trained in it yet.
    synchronous: bool = False
    # How the worker encodes its update (common/wire/compression.py: "none", "int8:block=256", ...),
    # whether it keeps what the encoding lost and adds it to its next update (error feedback), and
    # local differential privacy: clip the delta's L2 norm to dp_clip and add Gaussian noise of
    # standard deviation dp_noise * dp_clip (0: none). Signed like the rest: a forged task cannot
    # switch a worker's noise off.
    compression: str = "none"
    error_feedback: bool = False
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    signature: str = ""

    def signed_document(self) -> dict[str, Any]:
        """What the signature covers: the whole message but the signature. Update rules left at
        their defaults are left out, so a job without them signs what older fedq signed."""
        document = {"schema": TASK_SCHEMA, **asdict(self)}
        del document["signature"]
        for name, default in _UPDATE_RULE_DEFAULTS.items():
            if document[name] == default:
                del document[name]
        return document

    def to_bytes(self) -> bytes:
        body = {**self.signed_document(), "signature": self.signature}
        return json.dumps(body, separators=(",", ":")).encode()


_UPDATE_RULE_DEFAULTS: dict[str, Any] = {
    "compression": "none",
    "error_feedback": False,
    "dp_clip": 0.0,
    "dp_noise": 0.0,
}


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
    local_steps: int = 0  # minibatch steps the training took (0: not reported)
    encoding: str = "none"  # the delta's encoding (common/wire/compression.py); the task named it

    def to_bytes(self) -> bytes:
        if isinstance(self.delta, InlineDelta):
            delta: dict[str, Any] = {"inline": base64.b64encode(self.delta.payload).decode("ascii")}
        else:
            delta = {"key": self.delta.key, "sha256": self.delta.sha256, "nbytes": self.delta.nbytes}
        body = {
            "schema": UPDATE_SCHEMA,
            "job": self.job,
            "task_id": self.task_id,
            "worker_id": self.worker_id,
            "base_version": self.base_version,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "train_seconds": self.train_seconds,
            "local_steps": self.local_steps,
            "delta": delta,
        }
        if self.encoding != "none":  # left out otherwise: the message older fedq sent
            body["encoding"] = self.encoding
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class TaskRefusal:
    """A worker says it cannot train an issued task (its version is gone or tampered with, its
    training keeps failing): the coordinator closes the task at once instead of at its lease's end."""

    job: str
    task_id: str
    worker_id: str
    reason: str
    detail: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps({"schema": REFUSAL_SCHEMA, **asdict(self)}, separators=(",", ":")).encode()


def _load_json(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, bad UTF-8 and over-long integers;
        # RecursionError, absurdly deep nesting.
        raise MessageError("not_json", "the message body is not JSON") from None
    if not isinstance(document, dict):
        raise MessageError("bad_schema", "the message is not a JSON object")
    return document


def _check_schema(document: dict[str, Any], expected_schema: str) -> dict[str, Any]:
    schema = document.get("schema")
    kind = expected_schema.split("/")[0]
    if not isinstance(schema, str) or not schema.startswith(kind + "/"):
        raise MessageError("bad_schema", f"expected a {expected_schema} message, got schema {schema!r}")
    if schema != expected_schema:
        raise MessageError(
            "schema_version", f"schema {schema!r} is not supported (this build speaks {expected_schema})"
        )
    return document


def _load_object(body: bytes, expected_schema: str) -> dict[str, Any]:
    return _check_schema(_load_json(body), expected_schema)


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
    seconds = train.get("seconds", 0.0)
    if isinstance(seconds, bool) or not _finite_number(seconds) or not 0 <= seconds <= MAX_TASK_SECONDS:
        raise MessageError("bad_schema", f"train.seconds must be a number from 0 to {MAX_TASK_SECONDS}")
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, learning_rate=float(learning_rate), seed=seed, seconds=float(seconds)
    )
    version = _field(document, "model_version", int)
    if version < 0:
        raise MessageError("bad_schema", "model_version must be 0 or more")
    issued_at = _field(document, "issued_at", (int, float))
    if not _finite_number(issued_at):
        raise MessageError("bad_schema", "field 'issued_at' must be a finite number")
    model_digest = _field(document, "model_digest", str)
    if len(model_digest) != 64 or any(char not in "0123456789abcdef" for char in model_digest):
        raise MessageError("bad_schema", "field 'model_digest' must be a sha256 in hex")
    synchronous = document.get("synchronous", False)
    if not isinstance(synchronous, bool):
        raise MessageError("bad_schema", "field 'synchronous' must be true or false")
    compression = document.get("compression", "none")
    if not isinstance(compression, str) or not 1 <= len(compression) <= 64:
        raise MessageError("bad_schema", "field 'compression' must be a name of 1-64 characters")
    error_feedback = document.get("error_feedback", False)
    if not isinstance(error_feedback, bool):
        raise MessageError("bad_schema", "field 'error_feedback' must be true or false")
    dp_clip, dp_noise = document.get("dp_clip", 0.0), document.get("dp_noise", 0.0)
    if not all(_finite_number(value) and value >= 0 for value in (dp_clip, dp_noise)):
        raise MessageError("bad_schema", "fields 'dp_clip' and 'dp_noise' must be finite numbers >= 0")
    return RoundTask(
        job=_non_empty_text(document, "job"),
        task_id=_non_empty_text(document, "task_id"),
        model_version=version,
        train=settings,
        issued_at=issued_at,
        model_digest=model_digest,
        synchronous=synchronous,
        compression=compression,
        error_feedback=error_feedback,
        dp_clip=float(dp_clip),
        dp_noise=float(dp_noise),
        signature=_non_empty_text(document, "signature", 200),
    )


def parse_worker_message(body: bytes) -> ModelUpdate | TaskRefusal:
    """What a worker sends on the update exchange: an update, or the refusal of a task."""
    document = _load_json(body)
    schema = document.get("schema")
    if isinstance(schema, str) and schema.startswith(REFUSAL_SCHEMA.split("/")[0] + "/"):
        return _refusal(_check_schema(document, REFUSAL_SCHEMA))
    return _update(_check_schema(document, UPDATE_SCHEMA))


def _refusal(document: dict[str, Any]) -> TaskRefusal:
    return TaskRefusal(
        job=_non_empty_text(document, "job"),
        task_id=_non_empty_text(document, "task_id"),
        worker_id=_non_empty_text(document, "worker_id"),
        reason=_non_empty_text(document, "reason", 64),
        detail=str(document.get("detail", ""))[:500],
    )


def parse_update(body: bytes) -> ModelUpdate:
    return _update(_load_object(body, UPDATE_SCHEMA))


def _update(document: dict[str, Any]) -> ModelUpdate:
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
    local_steps = document.get("local_steps", 0)
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or not 0 <= local_steps <= MAX_LOCAL_STEPS:
        raise MessageError("bad_schema", f"field 'local_steps' must be an integer from 0 to {MAX_LOCAL_STEPS}")
    encoding = document.get("encoding", "none")
    if not isinstance(encoding, str) or not 1 <= len(encoding) <= 64:
        raise MessageError("bad_schema", "field 'encoding' must be a name of 1-64 characters")
    return ModelUpdate(
        job=_non_empty_text(document, "job"),
        task_id=_non_empty_text(document, "task_id"),
        worker_id=_non_empty_text(document, "worker_id"),
        base_version=base_version,
        num_examples=num_examples,
        delta=delta,
        metrics={str(name): float(value) for name, value in raw_metrics.items()},
        train_seconds=float(train_seconds),
        local_steps=local_steps,
        encoding=encoding,
    )
