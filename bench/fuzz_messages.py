"""The hostile messages of ``bench/fuzz.py``: many kinds, each labelled with the outcome the
services must give it, so that the fuzzer can reconcile what it expected with what it observed.

An outcome is a dead-letter reason (``not_json``, ``unknown_task``, ``bad_signature``, ...: the
``x-fedq-reason`` header the coordinator or a worker puts on the message in ``fedq.<job>.dead``),
``duplicate`` (skipped quietly by the coordinator, counted in ``skipped.duplicate``) or
``refused:<reason>`` (a worker's refusal of an open task: accepted, counted in ``refused.<reason>``).

Three families of kinds (:data:`KINDS`):

- ``updates``: sent to the update exchange without any help: garbage, broken JSON, wrong schema,
  other jobs, made-up task ids, oversized bodies, replays of applied updates, weird AMQP headers.
- ``task``: answers to genuine round tasks taken off the task queue, as any hostile worker can:
  wrong base version, wrong tensors, NaN, huge values, bad safetensors, claim checks to missing,
  foreign or mistyped Redis keys, blobs that do not match their digest, refusals.
- ``tasks``: forged round tasks published to the task exchange, which honest workers must
  dead-letter (``bad_signature``, ``not_json``, ...) and never train.

Every builder takes a :class:`random.Random` of its own (seeded from the run's seed and the
message's index), so a run's choice of variants is reproducible.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
import random
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedq.common.store import ModelStore
from fedq.common.wire import codec
from fedq.common.wire.limits import MAX_TASK_MESSAGE_BYTES
from fedq.common.wire.messages import REFUSAL_SCHEMA, TASK_SCHEMA, UPDATE_SCHEMA, RoundTask, TrainSettings
from fedq.common.wire.signing import SigningKey

FUZZ_WORKER = "fz-mallory"
HONEST_WORKERS = ("w0", "w1")  # the ids bench/fuzz.py gives its honest workers (impersonated here)
UPDATES, TASKS = "updates", "tasks"
# Dead-letter reasons the coordinator gives before it looks at the task: a resend gets the same.
BEFORE_TASK = frozenset({"too_large", "not_json", "bad_schema", "schema_version", "unknown_job"})
DUPLICATE = "duplicate"


# -- AMQP header fields pika will not write --------------------------------------------------


class RawField(bytes):
    """An AMQP field-table value given as its encoded bytes (type octet + payload): what another
    AMQP client may send, and pika's encoder cannot (a timestamp past 2^63, a nesting 2,000 deep)."""


@contextmanager
def raw_header_encoding() -> Iterator[None]:
    """While active, pika writes :class:`RawField` header values as they are (the technique of
    ``tests/support.publish_with_undecodable_header``)."""
    from unittest import mock

    import pika.data

    original = pika.data.encode_value

    def encode_value(pieces: list, value: Any) -> int:
        if isinstance(value, RawField):
            pieces.append(bytes(value))
            return len(value)
        return original(pieces, value)

    with mock.patch.object(pika.data, "encode_value", encode_value):
        yield


def raw_timestamp(seconds: int) -> RawField:
    return RawField(struct.pack(">cQ", b"T", seconds))


def raw_double(value: float) -> RawField:
    return RawField(struct.pack(">cd", b"d", value))


def raw_decimal(decimals: int, raw: int) -> RawField:
    return RawField(struct.pack(">cBi", b"D", decimals, raw))


def raw_nested_table(depth: int) -> RawField:
    """A table nested ``depth`` deep: {"n": {"n": ... {}}}, encoded without recursion."""
    inner = b""
    for _ in range(depth):
        inner = b"\x01n" + b"F" + struct.pack(">I", len(inner)) + inner
    return RawField(b"F" + struct.pack(">I", len(inner)) + inner)


def raw_nested_array(depth: int) -> RawField:
    inner = b""
    for _ in range(depth):
        inner = b"A" + struct.pack(">I", len(inner)) + inner
    return RawField(b"A" + struct.pack(">I", len(inner)) + inner)


# -- messages and what the builders know ----------------------------------------------------


@dataclass
class Message:
    kind: str
    variant: str
    body: bytes
    exchange: str  # UPDATES or TASKS
    expected: frozenset[str]  # acceptable outcomes (see the module docstring)
    message_id: str | bytes | None = None  # set by the fuzzer when None and ``keep_message_id`` is False
    headers: dict[str, Any] = field(default_factory=dict)
    task_id: str | None = None  # the task id it names (a fuzzer's task id, unless it replays an honest one)
    worker_id: str | None = None
    # What a resend of the same body gets (duplicate_hostile): the same outcome for a message refused
    # before its task is looked at, unknown_task for one that closed its task.
    repeat_expected: frozenset[str] | None = None
    keep_message_id: bool = False  # the variant is about the message id itself (none, not UTF-8)
    # How its outcome is observed: "dead_letter" (matched by message id, or by body for odd ids),
    # "skipped" (duplicates), "refused" (accepted refusals), "honest_update" (a replayed task: the
    # honest worker's update, dead-lettered with the task id as its message id).
    via: str = "dead_letter"
    account_id: str | None = None  # the message id its dead letter carries (via honest_update: the task id)
    index: int = -1
    sent_at: float = 0.0


@dataclass
class Context:
    """What the builders need about the job under attack."""

    job: str
    store: ModelStore
    weights: codec.Weights  # shapes and dtypes of the job's model (values: the initial weights)
    max_message_bytes: int  # the coordinator refuses a larger update message unread
    max_delta_bytes: int
    foreign_key: SigningKey = field(default_factory=SigningKey.generate)
    frame_max: int = 131072  # the AMQP frame size the broker negotiated
    head: int = 0
    head_digest: str = "0" * 64
    applied: list = field(default_factory=list)  # AppliedUpdate records of honest updates
    sent: list[Message] = field(default_factory=list)  # hostile messages sent so far (for resends)
    seen_tasks: list[RoundTask] = field(default_factory=list)  # genuine tasks taken off the queue
    closed_tasks: list[RoundTask] = field(default_factory=list)  # ... whose hostile answer was accounted for

    def zeros(self) -> codec.Weights:
        return {name: np.zeros_like(array) for name, array in self.weights.items()}

    def small(self, rng: random.Random) -> codec.Weights:
        """A plausible honest-sized delta (what a made-up task would need to be accepted)."""
        generator = np.random.default_rng(rng.getrandbits(32))
        return {
            name: (generator.standard_normal(array.shape) * 0.01).astype(array.dtype)
            for name, array in self.weights.items()
        }


Builder = Callable[[Context, random.Random, RoundTask | None], Message]


@dataclass(frozen=True)
class Kind:
    name: str
    family: str  # "updates", "task" (needs a genuine task), "tasks" (forged tasks)
    weight: float
    build: Builder
    description: str = ""


KINDS: dict[str, Kind] = {}


def kind(name: str, family: str, weight: float):
    def register(build: Builder) -> Builder:
        KINDS[name] = Kind(name, family, weight, build, " ".join((build.__doc__ or "").split("\n\n")[0].split()))
        return build

    return register


def _json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def made_up_task_id(rng: random.Random) -> str:
    return "fz-task-" + "%032x" % rng.getrandbits(128)


def update_document(
    job: str,
    task_id: str,
    payload: bytes | None = None,
    *,
    worker_id: str = FUZZ_WORKER,
    base_version: Any = 0,
    num_examples: Any = 10,
    claim: dict | None = None,
    metrics: Any = None,
    schema: Any = UPDATE_SCHEMA,
) -> dict[str, Any]:
    """An update message as a dict, to be broken as a builder likes."""
    delta = claim if claim is not None else {"inline": base64.b64encode(payload or b"").decode("ascii")}
    return {
        "schema": schema,
        "job": job,
        "task_id": task_id,
        "worker_id": worker_id,
        "base_version": base_version,
        "num_examples": num_examples,
        "metrics": {"loss": 0.5} if metrics is None else metrics,
        "train_seconds": 0.1,
        "delta": delta,
    }


def update_body(ctx: Context, task_id: str, weights: codec.Weights | bytes, **fields: Any) -> bytes:
    payload = weights if isinstance(weights, bytes) else codec.encode(weights)
    return _json(update_document(ctx.job, task_id, payload, **fields))


def _message(
    kind_name: str, variant: str, body: bytes, expected: str | set[str] | frozenset[str], **fields: Any
) -> Message:
    expected = frozenset([expected]) if isinstance(expected, str) else frozenset(expected)
    return Message(
        kind=kind_name,
        variant=variant,
        body=body,
        exchange=fields.pop("exchange", UPDATES),
        expected=expected,
        **fields,
    )


def _pick(rng: random.Random, variants: dict[str, Callable[[], Any]]) -> tuple[str, Any]:
    name = rng.choice(sorted(variants))
    return name, variants[name]()


# -- updates: no task needed -----------------------------------------------------------------

# Lead bytes that start no JSON text in any encoding Python's parser sniffs: a NUL would make it read
# UTF-16/32 (b"\x006" is the number 6), and \xff\xfe is a byte-order mark.
NOT_JSON_LEAD = b"\x01\x08#<%\x80"


@kind("random_bytes", UPDATES, 5)
def random_bytes(ctx: Context, rng: random.Random, _task) -> Message:
    """Random bytes, starting with a byte no JSON text starts with."""
    size = rng.choice([0, 1, 7, 64, 1000, 20000, 80000])
    body = bytes([rng.choice(NOT_JSON_LEAD)]) + rng.randbytes(size)
    return _message("random_bytes", f"{size + 1} bytes", body, "not_json")


@kind("truncated_json", UPDATES, 4)
def truncated_json(ctx: Context, rng: random.Random, _task) -> Message:
    """A well-formed update cut short (a proper prefix of a JSON object is never JSON)."""
    whole = update_body(ctx, made_up_task_id(rng), ctx.small(rng))
    cut = rng.randrange(1, len(whole))
    return _message("truncated_json", f"cut at {cut}/{len(whole)}", whole[:cut], "not_json")


@kind("unparseable_json", UPDATES, 2)
def unparseable_json(ctx: Context, rng: random.Random, _task) -> Message:
    """JSON the parser gives up on: nested 40,000 deep, a 5,000-digit integer, bad UTF-8, trailing data."""
    task_id = made_up_task_id(rng)
    variant, body = _pick(
        rng,
        {
            "deep array": lambda: b"[" * 40000 + b"]" * 40000,
            "deep object": lambda: b'{"a":' * 12000 + b"1" + b"}" * 12000,
            "5000-digit base_version": lambda: update_body(ctx, task_id, ctx.zeros()).replace(
                b'"base_version":0', b'"base_version":' + b"9" * 5000
            ),
            "invalid utf-8 in a string": lambda: update_body(ctx, task_id, ctx.zeros()).replace(
                task_id.encode(), b"\xff\xfe\xc3(" + task_id.encode()
            ),
            "two documents": lambda: update_body(ctx, task_id, ctx.zeros()) * 2,
            "single quotes": lambda: update_body(ctx, task_id, ctx.zeros()).replace(b'"', b"'"),
            # (Python's JSON parser reads UTF-16 too: whole, this would be a good update.)
            "utf-16, cut short": lambda: update_body(ctx, task_id, ctx.zeros()).decode().encode("utf-16-le")[:20001],
        },
    )
    return _message("unparseable_json", variant, body, "not_json")


@kind("not_an_object", UPDATES, 2)
def not_an_object(ctx: Context, rng: random.Random, _task) -> Message:
    """Valid JSON that is not an object: an array, a string, a number, null, true."""
    value = rng.choice(
        [[1, 2, 3], [update_document(ctx.job, made_up_task_id(rng))], "fedq.update/1", 42, 1e308, None, True, []]
    )
    return _message("not_an_object", type(value).__name__, _json(value), "bad_schema")


@kind("wrong_schema", UPDATES, 3)
def wrong_schema(ctx: Context, rng: random.Random, _task) -> Message:
    """An update object whose schema field is missing, not a string, or another message's."""
    document = update_document(ctx.job, made_up_task_id(rng), codec.encode(ctx.zeros()))
    variant = rng.choice(
        ["missing", "number", "null", "list", "task schema", "other/1", "empty", "FEDQ.UPDATE/1", "fedq.update"]
    )
    if variant == "missing":
        del document["schema"]
    else:
        document["schema"] = {
            "number": 1,
            "null": None,
            "list": ["fedq.update/1"],
            "task schema": TASK_SCHEMA,
            "other/1": "other/1",
            "empty": "",
            "FEDQ.UPDATE/1": "FEDQ.UPDATE/1",
            "fedq.update": "fedq.update",
        }[variant]
    return _message("wrong_schema", variant, _json(document), "bad_schema")


@kind("bad_fields", UPDATES, 6)
def bad_fields(ctx: Context, rng: random.Random, _task) -> Message:
    """A fedq.update/1 object with one field missing, of the wrong type, or out of range."""
    document = update_document(ctx.job, made_up_task_id(rng), codec.encode(ctx.zeros()))
    mutations: dict[str, Callable[[dict], None]] = {
        "base_version string": lambda d: d.update(base_version="0"),
        "base_version negative": lambda d: d.update(base_version=-1),
        "base_version bool": lambda d: d.update(base_version=True),
        "base_version float": lambda d: d.update(base_version=1.5),
        "base_version missing": lambda d: d.pop("base_version"),
        "num_examples zero": lambda d: d.update(num_examples=0),
        "num_examples negative": lambda d: d.update(num_examples=-(10**12)),
        "num_examples null": lambda d: d.update(num_examples=None),
        "metrics list": lambda d: d.update(metrics=[1, 2]),
        "metrics string value": lambda d: d.update(metrics={"loss": "low"}),
        "metrics nested": lambda d: d.update(metrics={"loss": {"a": 1}}),
        "metrics bool": lambda d: d.update(metrics={"ok": True}),
        "delta missing": lambda d: d.pop("delta"),
        "delta string": lambda d: d.update(delta="AAAA"),
        "delta.inline not base64": lambda d: d.update(delta={"inline": "not base64!!"}),
        "delta.inline number": lambda d: d.update(delta={"inline": 12}),
        "claim nbytes negative": lambda d: d.update(delta={"key": "k", "sha256": "0" * 64, "nbytes": -1}),
        "claim nbytes string": lambda d: d.update(delta={"key": "k", "sha256": "0" * 64, "nbytes": "10"}),
        "claim key empty": lambda d: d.update(delta={"key": "", "sha256": "0" * 64, "nbytes": 10}),
        "claim key 301 chars": lambda d: d.update(delta={"key": "k" * 301, "sha256": "0" * 64, "nbytes": 10}),
        "claim sha256 65 chars": lambda d: d.update(delta={"key": "k", "sha256": "0" * 65, "nbytes": 10}),
        "claim empty": lambda d: d.update(delta={}),
        "job empty": lambda d: d.update(job=""),
        "job 201 chars": lambda d: d.update(job="j" * 201),
        "job number": lambda d: d.update(job=7),
        "task_id 10k chars": lambda d: d.update(task_id="t" * 10000),
        "task_id list": lambda d: d.update(task_id=["t"]),
        "worker_id missing": lambda d: d.pop("worker_id"),
        "worker_id empty": lambda d: d.update(worker_id=""),
        "train_seconds negative": lambda d: d.update(train_seconds=-1),
        "train_seconds string": lambda d: d.update(train_seconds="1"),
    }
    variant = rng.choice(sorted(mutations))
    mutations[variant](document)
    body = _json(document)
    special = {
        "metrics NaN": lambda: body.replace(b'"metrics":{"loss":0.5}', b'"metrics":{"loss":NaN}'),
        "metrics Infinity": lambda: body.replace(b'"metrics":{"loss":0.5}', b'"metrics":{"loss":-Infinity}'),
        "metrics 1e999": lambda: body.replace(b'"metrics":{"loss":0.5}', b'"metrics":{"loss":1e999}'),
        "train_seconds NaN": lambda: body.replace(b'"train_seconds":0.1', b'"train_seconds":NaN'),
    }
    if rng.random() < 0.15:  # JSON extensions Python's parser accepts: values that are not finite
        document = update_document(ctx.job, made_up_task_id(rng), codec.encode(ctx.zeros()))
        body = _json(document)
        variant = rng.choice(sorted(special))
        body = special[variant]()
    return _message("bad_fields", variant, body, "bad_schema")


@kind("schema_version", UPDATES, 2)
def schema_version(ctx: Context, rng: random.Random, _task) -> Message:
    """An update or refusal of a schema version this build does not speak."""
    schema = rng.choice(
        [
            "fedq.update/2",
            "fedq.update/0",
            "fedq.update/1.0",
            "fedq.update/",
            "fedq.update/1 ",
            "fedq.update/999999999999",
            "fedq.refusal/2",
            "fedq.refusal/",
        ]
    )
    document = update_document(ctx.job, made_up_task_id(rng), codec.encode(ctx.zeros()), schema=schema)
    return _message("schema_version", schema, _json(document), "schema_version")


@kind("other_job", UPDATES, 3)
def other_job(ctx: Context, rng: random.Random, _task) -> Message:
    """A well-formed update or refusal for another job (or this job's name changed by one character)."""
    job = rng.choice(["other-job", ctx.job + "x", ctx.job.upper(), ctx.job[:-1], " " + ctx.job, "*", "fedq"])
    if rng.random() < 0.3:
        body = _json(
            {
                "schema": REFUSAL_SCHEMA,
                "job": job,
                "task_id": made_up_task_id(rng),
                "worker_id": FUZZ_WORKER,
                "reason": "training_failed",
            }
        )
        return _message("other_job", f"refusal for {job!r}", body, "unknown_job")
    body = update_body(ctx, made_up_task_id(rng), ctx.small(rng))
    body = body.replace(_json(ctx.job), _json(job), 1)
    return _message("other_job", f"update for {job!r}", body, "unknown_job")


@kind("made_up_task", UPDATES, 5)
def made_up_task(ctx: Context, rng: random.Random, _task) -> Message:
    """A perfectly good update answering a task id the coordinator never issued."""
    task_id = rng.choice(
        [
            made_up_task_id(rng),
            uuid.UUID(int=rng.getrandbits(128)).hex,
            "0" * 32,
            "../../etc",
            "fedq:{" + ctx.job + "}:head",
            "*",
            "t" * 200,
        ]
    )
    base = rng.choice([0, ctx.head, max(ctx.head - 1, 0)])
    body = update_body(ctx, task_id, ctx.small(rng), base_version=base)
    return _message("made_up_task", "small delta", body, "unknown_task", task_id=task_id, worker_id=FUZZ_WORKER)


@kind("impersonation", UPDATES, 2)
def impersonation(ctx: Context, rng: random.Random, _task) -> Message:
    """An update claiming to come from an honest worker, for a task id never issued."""
    task_id = made_up_task_id(rng)
    worker = rng.choice(HONEST_WORKERS)
    body = update_body(ctx, task_id, ctx.small(rng), worker_id=worker, base_version=ctx.head)
    return _message("impersonation", f"as {worker}", body, "unknown_task", task_id=task_id, worker_id=worker)


@kind("huge_numbers", UPDATES, 1)
def huge_numbers(ctx: Context, rng: random.Random, _task) -> Message:
    """Integers past 2^63 and floats near the double's limit in every numeric field (made-up task)."""
    task_id = made_up_task_id(rng)
    document = update_document(
        ctx.job,
        task_id,
        codec.encode(ctx.small(rng)),
        base_version=2**70,
        num_examples=2**64 + 1,
        metrics={"loss": 1.7e308, "accuracy": -1.7e308},
    )
    document["train_seconds"] = 1.7e308
    return _message(
        "huge_numbers",
        "2^70 base, 2^64 examples",
        _json(document),
        "unknown_task",
        task_id=task_id,
        worker_id=FUZZ_WORKER,
    )


@kind("refusal_unknown_task", UPDATES, 2)
def refusal_unknown_task(ctx: Context, rng: random.Random, _task) -> Message:
    """A refusal of a task id never issued (a refusal closes a task: only an open one)."""
    task_id = made_up_task_id(rng)
    reason = rng.choice(["training_failed", "tampered_version", "unknown_version", "r" * 64])
    body = _json(
        {
            "schema": REFUSAL_SCHEMA,
            "job": ctx.job,
            "task_id": task_id,
            "worker_id": FUZZ_WORKER,
            "reason": reason,
            "detail": "d" * rng.choice([0, 10, 5000]),
        }
    )
    return _message("refusal_unknown_task", reason[:20], body, "unknown_task", task_id=task_id, worker_id=FUZZ_WORKER)


@kind("bad_refusal", UPDATES, 1)
def bad_refusal(ctx: Context, rng: random.Random, _task) -> Message:
    """A refusal with a missing or over-long field."""
    document = {
        "schema": REFUSAL_SCHEMA,
        "job": ctx.job,
        "task_id": made_up_task_id(rng),
        "worker_id": FUZZ_WORKER,
        "reason": "training_failed",
    }
    variant = rng.choice(["reason 65 chars", "reason missing", "reason number", "task_id empty"])
    if variant == "reason 65 chars":
        document["reason"] = "r" * 65
    elif variant == "reason missing":
        del document["reason"]
    elif variant == "reason number":
        document["reason"] = 5
    else:
        document["task_id"] = ""
    return _message("bad_refusal", variant, _json(document), "bad_schema")


@kind("oversized", UPDATES, 2)
def oversized(ctx: Context, rng: random.Random, _task) -> Message:
    """A body larger than any update of this model can be: refused unread."""
    size = ctx.max_message_bytes + rng.choice([1, 1024, 100_000, 300_000] + [4_000_000] * (rng.random() < 0.03))
    variant = rng.choice(["random bytes", "huge inline delta", "huge metrics", "padding"])
    task_id = made_up_task_id(rng)
    if variant == "random bytes":
        body = rng.randbytes(size)
    elif variant == "huge inline delta":
        count = size // 4
        body = update_body(ctx, task_id, {"0.weight": np.ones(count, np.float32)})
    elif variant == "huge metrics":
        metrics = {f"m{index}": float(index) for index in range(size // 12)}
        body = _json(update_document(ctx.job, task_id, codec.encode(ctx.zeros()), metrics=metrics))
    else:
        body = update_body(ctx, task_id, ctx.zeros())
        body = body[:-1] + b',"pad":"' + b"x" * (size - len(body)) + b'"}'
    return _message("oversized", f"{variant}, {len(body) // 1024} KiB", body, "too_large")


@kind("replayed_honest", UPDATES, 2)
def replayed_honest(ctx: Context, rng: random.Random, _task) -> Message:
    """An applied honest update sent again under its own task id, as it was or with a poisoned delta:
    skipped as a duplicate while its version is in Redis, refused as ``unknown_task`` once the
    archiver moved that version (and its ledger entry) out; never applied either way."""
    if not ctx.applied:
        return made_up_task(ctx, rng, None)
    applied = rng.choice(ctx.applied)
    blob = ctx.store.blobs.get(applied.blob_key) or codec.encode(ctx.zeros())
    variant, payload = _pick(
        rng,
        {
            "as it was": lambda: blob,
            "NaN delta": lambda: codec.encode(
                {name: np.full_like(array, np.nan) for name, array in ctx.weights.items()}
            ),
            "1e30 delta": lambda: codec.encode(
                {name: np.full_like(array, 1e30) for name, array in ctx.weights.items()}
            ),
            "garbage delta": lambda: rng.randbytes(100),
        },
    )
    worker = rng.choice([applied.worker_id, FUZZ_WORKER])
    body = update_body(ctx, applied.task_id, payload, worker_id=worker, base_version=applied.base_version)
    outcomes = frozenset([DUPLICATE, "unknown_task"])
    return _message(
        "replayed_honest", variant, body, outcomes, via="skipped", worker_id=worker, repeat_expected=outcomes
    )


@kind("replayed_elsewhere", UPDATES, 1)
def replayed_elsewhere(ctx: Context, rng: random.Random, _task) -> Message:
    """An applied honest update's delta under a task id never issued: inline, or claiming its blob."""
    if not ctx.applied:
        return made_up_task(ctx, rng, None)
    applied = rng.choice(ctx.applied)
    task_id = made_up_task_id(rng)
    blob = ctx.store.blobs.get(applied.blob_key) or codec.encode(ctx.zeros())
    if rng.random() < 0.5:
        body = update_body(ctx, task_id, blob, base_version=applied.base_version)
        variant = "inline"
    else:
        claim = {"key": applied.blob_key, "sha256": codec.digest(blob), "nbytes": len(blob)}
        body = _json(update_document(ctx.job, task_id, claim=claim, base_version=applied.base_version))
        variant = "claiming the applied blob"
    return _message("replayed_elsewhere", variant, body, "unknown_task", task_id=task_id, worker_id=FUZZ_WORKER)


@kind("duplicate_hostile", UPDATES, 3)
def duplicate_hostile(ctx: Context, rng: random.Random, _task) -> Message:
    """A hostile message sent before, sent again (new message id, same body and headers)."""
    candidates = [message for message in ctx.sent[-500:] if message.via in ("dead_letter", "skipped", "refused")]
    if not candidates:
        return random_bytes(ctx, rng, None)
    original = rng.choice(candidates)
    expected = original.repeat_expected or original.expected
    return _message(
        "duplicate_hostile",
        f"of {original.kind}",
        original.body,
        expected,
        exchange=original.exchange,
        headers=dict(original.headers),
        task_id=original.task_id,
        worker_id=original.worker_id,
        repeat_expected=expected,
        via="skipped" if DUPLICATE in expected else "dead_letter",
    )


def stateless_body(ctx: Context, rng: random.Random) -> Message:
    """A message of one of the kinds above that need nothing but the job (carrier of odd headers)."""
    return rng.choice(
        [random_bytes, truncated_json, made_up_task, other_job, wrong_schema, schema_version, bad_fields]
    )(ctx, rng, None)


@kind("weird_headers", UPDATES, 5)
def weird_headers(ctx: Context, rng: random.Random, _task) -> Message:
    """A hostile body with AMQP headers or properties that are odd, huge or undecodable by pika."""
    carrier = stateless_body(ctx, rng)
    variants: dict[str, Callable[[], dict[str, Any]]] = {
        "ints at the 64-bit limits": lambda: {"big": 2**63 - 1, "small": -(2**63), "i32": 2**31, "zero": 0},
        "timestamp 2^64-1 (undecodable)": lambda: {"sent": raw_timestamp(2**64 - 1)},
        "timestamp 2^63": lambda: {"sent": raw_timestamp(2**63), "nested": {"t": raw_timestamp(2**64 - 1)}},
        "timestamp in milliseconds": lambda: {"sent": raw_timestamp(1_700_000_000_000)},
        "tables nested 40 deep": lambda: {"deep": raw_nested_table(40)},
        "arrays nested 40 deep": lambda: {"deep": raw_nested_array(40)},
        "mixed table": lambda: {"t": {"a": [1, "two", b"\xff\x00", None, True, {"x": [[]]}], "b": {}}},
        "bytes not utf-8": lambda: {"bin": b"\xff\xfe\x00\x80", b"\xff\xfekey".decode("latin-1"): "v"},
        "decimal extremes": lambda: {"d1": raw_decimal(255, -(2**31)), "d2": raw_decimal(0, 2**31 - 1)},
        "doubles at the limits": lambda: {"max": raw_double(1.7976931348623157e308), "tiny": raw_double(5e-324)},
        "2,000 headers": lambda: {f"h{index}": index for index in range(2000)},
        "60 KB header value": lambda: {"big": "v" * 60_000},
        "spoofed fedq reason": lambda: {
            "x-fedq-reason": "accepted",
            "x-fedq-detail": "trust me",
            "x-fedq-origin": "coordinator",
        },
        "spoofed delivery count": lambda: {"x-delivery-count": rng.choice([-1, 2**40, "19", None])},
        "empty and unicode names": lambda: {"": "empty", "ключ-🔑": "ünïcödé", " ": 1},
    }
    variant = rng.choice(sorted(variants) + ["message id not utf-8", "no message id", "message id 255 chars"])
    if variant == "message id not utf-8":
        # Trailing spaces leave what the body is (JSON or not) and make it one of its own: its dead
        # letter is found by its body.
        carrier = dataclasses.replace(
            carrier,
            message_id=b"\xff\xfe\x80fz-" + rng.randbytes(8),
            keep_message_id=True,
            body=carrier.body + b" " * rng.randrange(1, 50),
        )
    elif variant == "no message id":
        carrier = dataclasses.replace(
            carrier, message_id=None, keep_message_id=True, body=carrier.body + b" " * rng.randrange(1, 50)
        )
    elif variant == "message id 255 chars":
        carrier = dataclasses.replace(carrier, message_id="fz-long-" + "%x" % rng.getrandbits(64) + "-" * 200)
        carrier.message_id = carrier.message_id[:255]
        carrier.keep_message_id = True
    else:
        carrier = dataclasses.replace(carrier, headers=variants[variant]())
    return dataclasses.replace(
        carrier,
        kind="weird_headers",
        variant=f"{variant} / {carrier.kind}",
        repeat_expected=carrier.repeat_expected or carrier.expected,
    )


def deep_value(rng: random.Random) -> tuple[str, RawField]:
    """A table or array nested 1,000 to 15,000 deep: deeper than pika's recursive decoder can go
    (fedq.broker.header_decoding stops at 32 levels)."""
    depth = rng.choice([1000, 2000, 15_000])  # 15,000 levels of a table: 105 KB, within a frame
    if rng.random() < 0.5:
        return f"table nested {depth:,} deep", raw_nested_table(depth)
    return f"array nested {depth:,} deep", raw_nested_array(depth)


@kind("deep_header", UPDATES, 1)
def deep_header(ctx: Context, rng: random.Random, _task) -> Message:
    """A header nested thousands deep, past what pika's recursive decoder can take."""
    carrier = made_up_task(ctx, rng, None)
    variant, value = deep_value(rng)
    return dataclasses.replace(carrier, kind="deep_header", variant=variant, headers={"deep": value})


def frame_filler(ctx: Context, message_id: str, headroom: int = 60) -> str:
    """A header value that makes the content header frame (12 bytes + properties, as
    fedq.broker.publisher writes them) end ``headroom`` bytes short of the broker's limit: room for
    the broker's x-delivery-count, not for the reason, detail and origin headers a dead letter adds."""
    import pika

    def size(pad: str) -> int:
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            timestamp=2**31,
            headers={"pad": pad},
        )
        return 12 + sum(len(piece) for piece in properties.encode())

    return "x" * (ctx.frame_max - 8 - headroom - size(""))


def filling_the_frame(ctx: Context, rng: random.Random, carrier: Message, kind_name: str) -> Message:
    """``carrier`` with a header that fills its frame but for the broker's own headers."""
    message_id = "fz-frame-%016x" % rng.getrandbits(64)
    pad = frame_filler(ctx, message_id)
    return dataclasses.replace(
        carrier,
        kind=kind_name,
        variant=f"a {len(pad)}-byte header",
        headers={"pad": pad},
        message_id=message_id,
        keep_message_id=True,
    )


@kind("frame_filling_header", UPDATES, 1)
def frame_filling_header(ctx: Context, rng: random.Random, _task) -> Message:
    """Headers that nearly fill an AMQP frame: no room left for the dead letter's reason headers."""
    return filling_the_frame(ctx, rng, made_up_task(ctx, rng, None), "frame_filling_header")


# -- task: answers to genuine tasks taken off the task queue ---------------------------------


def claimant(rng: random.Random) -> str:
    """The worker id a hostile answer names: one in five, an honest worker's."""
    return rng.choice(HONEST_WORKERS) if rng.random() < 0.2 else FUZZ_WORKER


def _answer(
    ctx: Context,
    kind_name: str,
    variant: str,
    task: RoundTask,
    rng: random.Random,
    expected: str | set[str],
    payload: codec.Weights | bytes | None = None,
    *,
    claim: dict | None = None,
    base_version: int | None = None,
    worker_id: str | None = None,
    **fields: Any,
) -> Message:
    """A hostile answer to ``task``; one in five claims to come from an honest worker."""
    worker = worker_id or claimant(rng)
    base = task.model_version if base_version is None else base_version
    if claim is not None:
        body = _json(update_document(ctx.job, task.task_id, claim=claim, worker_id=worker, base_version=base))
    else:
        encoded = payload if isinstance(payload, bytes) else codec.encode(payload)
        body = _json(update_document(ctx.job, task.task_id, encoded, worker_id=worker, base_version=base))
    if worker != FUZZ_WORKER:
        variant += f" (as {worker})"
    return _message(
        kind_name,
        variant,
        body,
        expected,
        task_id=task.task_id,
        worker_id=worker,
        repeat_expected=fields.pop("repeat_expected", frozenset(["unknown_task"])),
        **fields,
    )


@kind("wrong_base_version", "task", 3)
def wrong_base_version(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered from another version than it was issued at (fresher buys weight)."""
    base = rng.choice(
        [task.model_version + 1, task.model_version + 5, 2**40]
        + ([task.model_version - 1] if task.model_version > 0 else [])
    )
    return _answer(
        ctx,
        "wrong_base_version",
        f"base {base} for version {task.model_version}",
        task,
        rng,
        "wrong_base_version",
        ctx.small(rng),
        base_version=base,
    )


@kind("wrong_tensors", "task", 2)
def wrong_tensors(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with tensors missing, extra, renamed, or none at all."""
    delta = ctx.zeros()
    first = sorted(delta)[0]
    variant = rng.choice(["missing", "extra", "renamed", "none", "path-like name"])
    if variant == "missing":
        del delta[first]
    elif variant == "extra":
        delta["evil"] = np.zeros(3, np.float32)
    elif variant == "renamed":
        delta[first.upper()] = delta.pop(first)
    elif variant == "none":
        delta = {}
    else:
        delta["../../" + first] = delta.pop(first)
    return _answer(ctx, "wrong_tensors", variant, task, rng, "wrong_tensors", delta)


@kind("wrong_shape", "task", 2)
def wrong_shape(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a tensor of another shape (no larger than the model's)."""
    delta = ctx.zeros()
    name = rng.choice(sorted(name for name, array in delta.items() if array.ndim == 2))
    variant = rng.choice(["transposed", "flattened", "3x3", "scalar", "extra axis"])
    array = delta[name]
    delta[name] = {
        "transposed": lambda: np.ascontiguousarray(array.T),
        "flattened": lambda: array.ravel(),
        "3x3": lambda: np.zeros((3, 3), np.float32),
        "scalar": lambda: np.float32(0.0) * np.ones(()),
        "extra axis": lambda: array[None, ...],
    }[variant]().astype(np.float32)
    if variant == "transposed" and array.shape[0] == array.shape[1]:
        delta[name] = array[:, :-1].copy()
        variant = "one column short"
    return _answer(ctx, "wrong_shape", f"{name} {variant}", task, rng, "wrong_shape", delta)


@kind("wrong_dtype", "task", 2)
def wrong_dtype(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a tensor of the right shape and another dtype."""
    delta = ctx.zeros()
    dtype = rng.choice(["float16", "int32", "uint8", "bool", "int8", "float64"])
    # A float64 copy of a big tensor would be refused as too_large first: use the smallest one.
    name = min(delta, key=lambda key: delta[key].size) if dtype == "float64" else rng.choice(sorted(delta))
    delta[name] = delta[name].astype(dtype)
    return _answer(ctx, "wrong_dtype", f"{name} as {dtype}", task, rng, "wrong_dtype", delta)


@kind("not_finite", "task", 3)
def not_finite(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with NaN or infinities somewhere in the delta."""
    delta = ctx.small(rng)
    name = rng.choice(sorted(delta))
    variant = rng.choice(["one NaN", "one +inf", "one -inf", "all NaN", "NaN and inf everywhere"])
    target = delta[name].reshape(-1)
    if variant == "one NaN":
        target[rng.randrange(target.size)] = np.nan
    elif variant == "one +inf":
        target[rng.randrange(target.size)] = np.inf
    elif variant == "one -inf":
        target[rng.randrange(target.size)] = -np.inf
    elif variant == "all NaN":
        target[:] = np.nan
    else:
        for array in delta.values():
            array.reshape(-1)[::2] = np.nan
            array.reshape(-1)[1::2] = np.inf
    return _answer(ctx, "not_finite", f"{variant} in {name}", task, rng, "not_finite", delta)


@kind("norm_outlier", "task", 3)
def norm_outlier(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with finite values 1e6-1e30 (or float32's maximum): far past any norm bound."""
    delta = ctx.small(rng)
    variant = rng.choice(["everything huge", "one element huge", "honest plus one huge tensor", "float32 max"])
    magnitude = 10 ** rng.uniform(6, 30)
    sign = rng.choice([-1.0, 1.0])
    name = rng.choice(sorted(delta))
    if variant == "everything huge":
        delta = {key: np.full_like(array, sign * magnitude) for key, array in delta.items()}
    elif variant == "one element huge":
        delta[name].reshape(-1)[rng.randrange(delta[name].size)] = sign * magnitude
    elif variant == "honest plus one huge tensor":
        delta[name] = np.full_like(delta[name], sign * magnitude)
    else:
        magnitude = float(np.finfo(np.float32).max)
        delta = {key: np.full_like(array, magnitude) for key, array in delta.items()}
    return _answer(ctx, "norm_outlier", f"{variant} ({magnitude:.0e})", task, rng, "norm_outlier", delta)


def _safetensors_header(entries: dict[str, Any]) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header


@kind("bad_tensor", "task", 3)
def bad_tensor(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with bytes that are not a safetensors file of any tensors."""
    good = codec.encode(ctx.zeros())
    variant, payload = _pick(
        rng,
        {
            "random bytes": lambda: rng.randbytes(rng.choice([1, 100, 5000])),
            "empty": lambda: b"",
            "truncated": lambda: good[: rng.randrange(1, len(good) - 1)],
            "header length 2^60": lambda: struct.pack("<Q", 2**60) + good[8:],
            "header not JSON": lambda: struct.pack("<Q", 6) + b"{{{{{{" + b"\0" * 64,
            "offsets past the end": lambda: (
                _safetensors_header({"0.weight": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 10**9]}})
                + b"\0" * 64
            ),
            "offsets and shape disagree": lambda: (
                _safetensors_header({"0.weight": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 8]}})
                + b"\0" * 8
            ),
            "negative shape": lambda: (
                _safetensors_header({"0.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}) + b"\0" * 4
            ),
            "unknown dtype": lambda: (
                _safetensors_header({"0.weight": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4
            ),
            "metadata not strings": lambda: (
                _safetensors_header(
                    {"__metadata__": {"a": 1}, "0.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
                )
                + b"\0" * 4
            ),
            "pickle": lambda: pickle.dumps({"0.weight": [0.0] * 10}),
            "gzip of a good payload": lambda: __import__("gzip").compress(good),
        },
    )
    return _answer(ctx, "bad_tensor", variant, task, rng, "bad_tensor", payload)


def _claim(key: str, payload: bytes | None = None, *, sha256: str | None = None, nbytes: int | None = None) -> dict:
    payload = payload or b""
    return {"key": key, "sha256": sha256 or codec.digest(payload), "nbytes": len(payload) if nbytes is None else nbytes}


BLOB_TTL_SECONDS = 3600  # what the fuzzer writes in Redis expires by itself


@kind("claim_missing", "task", 2)
def claim_missing(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a claim check to its own key, where no blob was ever written."""
    worker = claimant(rng)
    key = ctx.store.blobs.key(task.task_id, worker)
    nbytes = rng.choice([0, 100, 19520])
    return _answer(
        ctx,
        "claim_missing",
        f"nbytes {nbytes}",
        task,
        rng,
        "missing_blob",
        claim=_claim(key, sha256="%064x" % rng.getrandbits(256), nbytes=nbytes),
        worker_id=worker,
    )


@kind("claim_wrong_key", "task", 2)
def claim_wrong_key(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a claim check to a key that is not its own: the model, the signing
    key, another task's or another job's blob."""
    keys = ctx.store.keys
    other = ctx.applied[0].task_id if ctx.applied else made_up_task_id(rng)
    variant, key = _pick(
        rng,
        {
            "the model weights": lambda: keys.model(0),
            "the signing key": lambda: keys.signing_key,
            "another task's blob": lambda: keys.update(FUZZ_WORKER, other),
            "another worker's blob": lambda: keys.update(HONEST_WORKERS[0], task.task_id),
            "another job's blob": lambda: f"fedq:{{other-job}}:update:{FUZZ_WORKER}:{task.task_id}",
            "its key with a prefix": lambda: " " + keys.update(FUZZ_WORKER, task.task_id),
            "a wildcard": lambda: keys.update(FUZZ_WORKER, "*"),
        },
    )
    return _answer(
        ctx,
        "claim_wrong_key",
        variant,
        task,
        rng,
        "bad_claim",
        claim=_claim(key, sha256="0" * 64, nbytes=100),
        worker_id=FUZZ_WORKER,
    )


@kind("claim_wrongtype", "task", 1)
def claim_wrongtype(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a claim check to its own key, where the fuzzer put a hash or a list."""
    worker = claimant(rng)
    key = ctx.store.blobs.key(task.task_id, worker)
    variant = rng.choice(["hash", "list", "set"])
    writes = ctx.store.redis.pipeline(transaction=False)
    {
        "hash": lambda: writes.hset(key, "not", "a blob"),
        "list": lambda: writes.rpush(key, "not", "a blob"),
        "set": lambda: writes.sadd(key, "not a blob"),
    }[variant]()
    writes.expire(key, BLOB_TTL_SECONDS)
    writes.execute()
    return _answer(
        ctx,
        "claim_wrongtype",
        f"a {variant} at its key",
        task,
        rng,
        "bad_claim",
        claim=_claim(key, sha256="0" * 64, nbytes=10),
        worker_id=worker,
    )


@kind("claim_bad_digest", "task", 2)
def claim_bad_digest(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a claim check whose blob does not match the claimed sha256 or size."""
    worker = claimant(rng)
    key = ctx.store.blobs.key(task.task_id, worker)
    payload = codec.encode(ctx.small(rng))
    ctx.store.redis.set(key, payload, ex=BLOB_TTL_SECONDS)
    variant, claim = _pick(
        rng,
        {
            "wrong sha256": lambda: _claim(key, payload, sha256="%064x" % rng.getrandbits(256)),
            "size one short": lambda: _claim(key, payload, nbytes=len(payload) - 1),
            "size one over": lambda: _claim(key, payload, nbytes=len(payload) + 1),
            "sha256 of another payload": lambda: _claim(key, payload, sha256=codec.digest(payload + b"x")),
        },
    )
    return _answer(ctx, "claim_bad_digest", variant, task, rng, "bad_digest", claim=claim, worker_id=worker)


@kind("claim_poison", "task", 1)
def claim_poison(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a claim check whose blob matches its digest and is poison."""
    worker = claimant(rng)
    key = ctx.store.blobs.key(task.task_id, worker)
    variant, (payload, expected) = _pick(
        rng,
        {
            "NaN": lambda: (codec.encode({n: np.full_like(a, np.nan) for n, a in ctx.weights.items()}), "not_finite"),
            "1e25": lambda: (codec.encode({n: np.full_like(a, 1e25) for n, a in ctx.weights.items()}), "norm_outlier"),
            "not safetensors": lambda: (rng.randbytes(1000), "bad_tensor"),
            "no tensors": lambda: (codec.encode({}), "wrong_tensors"),
        },
    )
    ctx.store.redis.set(key, payload, ex=BLOB_TTL_SECONDS)
    return _answer(ctx, "claim_poison", variant, task, rng, expected, claim=_claim(key, payload), worker_id=worker)


@kind("claim_too_large", "task", 1)
def claim_too_large(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task answered with a claim check to a blob larger than any delta of this model."""
    worker = claimant(rng)
    nbytes = rng.choice([ctx.max_delta_bytes + 1, 10**9, 2**62])
    return _answer(
        ctx,
        "claim_too_large",
        f"nbytes {nbytes}",
        task,
        rng,
        "too_large",
        claim=_claim(ctx.store.blobs.key(task.task_id, worker), sha256="0" * 64, nbytes=nbytes),
        worker_id=worker,
    )


@kind("refusal_of_task", "task", 1)
def refusal_of_task(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task refused (any worker may): the coordinator closes it, applies nothing."""
    reason = rng.choice(["fuzz_refusal", "tampered_version", "unknown_version", "training_failed"])
    worker = rng.choice([FUZZ_WORKER, *HONEST_WORKERS])
    body = _json(
        {
            "schema": REFUSAL_SCHEMA,
            "job": ctx.job,
            "task_id": task.task_id,
            "worker_id": worker,
            "reason": reason,
            "detail": "the fuzzer refuses",
        }
    )
    return _message(
        "refusal_of_task",
        reason,
        body,
        f"refused:{reason}",
        via="refused",
        task_id=task.task_id,
        worker_id=worker,
        repeat_expected=frozenset(["unknown_task"]),
    )


@kind("too_stale", "task", 0.3)
def too_stale(ctx: Context, rng: random.Random, task: RoundTask) -> Message:
    """A genuine task held until the head moved past --max-staleness, then answered (with NaN, in case)."""
    delta = ctx.zeros()
    delta[sorted(delta)[0]].reshape(-1)[0] = np.nan
    return _answer(ctx, "too_stale", "held", task, rng, "too_stale", delta)


# -- tasks: forged round tasks, which honest workers must dead-letter -------------------------


def _forged(ctx: Context, rng: random.Random, **changes: Any) -> RoundTask:
    return RoundTask(
        job=changes.pop("job", ctx.job),
        task_id=changes.pop("task_id", made_up_task_id(rng)),
        model_version=changes.pop("model_version", ctx.head),
        issued_at=0.0,
        train=changes.pop(
            "train", TrainSettings(epochs=1, batch_size=32, learning_rate=1000.0, seed=rng.getrandbits(31))
        ),
        model_digest=changes.pop("model_digest", ctx.head_digest),
        **changes,
    )


def _task_message(kind_name: str, variant: str, body: bytes, expected: str | frozenset[str], **fields: Any) -> Message:
    return _message(kind_name, variant, body, expected, exchange=TASKS, **fields)


@kind("forged_wrong_key", TASKS, 2)
def forged_wrong_key(ctx: Context, rng: random.Random, _task) -> Message:
    """A round task signed by another key (learning rate 1000, or epochs 10^6)."""
    train = rng.choice(
        [
            TrainSettings(learning_rate=1000.0),
            TrainSettings(epochs=10**6),
            TrainSettings(batch_size=1, learning_rate=1e-30),
        ]
    )
    task = _forged(ctx, rng, train=train)
    task = dataclasses.replace(task, signature=ctx.foreign_key.sign(task.signed_document()))
    return _task_message("forged_wrong_key", "another key", task.to_bytes(), "bad_signature", task_id=task.task_id)


@kind("forged_bad_signature", TASKS, 1)
def forged_bad_signature(ctx: Context, rng: random.Random, _task) -> Message:
    """A round task whose signature is garbled: not base64, the wrong length, or random bytes."""
    variant, signature = _pick(
        rng,
        {
            "not base64": lambda: "not base64!",
            "wrong length": lambda: base64.b64encode(b"garbled").decode(),
            "random 64 bytes": lambda: base64.b64encode(rng.randbytes(64)).decode(),
            "200 characters": lambda: "A" * 200,
        },
    )
    task = dataclasses.replace(_forged(ctx, rng), signature=signature)
    return _task_message("forged_bad_signature", variant, task.to_bytes(), "bad_signature", task_id=task.task_id)


@kind("forged_tampered", TASKS, 1)
def forged_tampered(ctx: Context, rng: random.Random, _task) -> Message:
    """A genuine task (taken off the queue) with one signed field changed, its signature kept."""
    if not ctx.seen_tasks:
        return forged_wrong_key(ctx, rng, None)
    genuine = rng.choice(ctx.seen_tasks[-50:])
    variant, task = _pick(
        rng,
        {
            "learning rate 1000": lambda: dataclasses.replace(
                genuine, train=dataclasses.replace(genuine.train, learning_rate=1000.0)
            ),
            "another version": lambda: dataclasses.replace(genuine, model_version=genuine.model_version + 1),
            "another task id": lambda: dataclasses.replace(genuine, task_id=made_up_task_id(rng)),
            "another digest": lambda: dataclasses.replace(genuine, model_digest="%064x" % rng.getrandbits(256)),
        },
    )
    return _task_message("forged_tampered", variant, task.to_bytes(), "bad_signature", task_id=task.task_id)


@kind("forged_unsigned", TASKS, 1)
def forged_unsigned(ctx: Context, rng: random.Random, _task) -> Message:
    """A round task without a signature (empty or missing): not a fedq.task/2."""
    task = _forged(ctx, rng)
    document = json.loads(task.to_bytes())
    variant = rng.choice(["empty signature", "no signature field"])
    if variant == "no signature field":
        del document["signature"]
    return _task_message("forged_unsigned", variant, _json(document), "bad_schema", task_id=task.task_id)


@kind("forged_garbage", TASKS, 1)
def forged_garbage(ctx: Context, rng: random.Random, _task) -> Message:
    """Random bytes or truncated JSON on the task queue."""
    task = dataclasses.replace(_forged(ctx, rng), signature="A" * 88)
    whole = task.to_bytes()
    variant, body = _pick(
        rng,
        {
            "random bytes": lambda: bytes([rng.choice(NOT_JSON_LEAD)]) + rng.randbytes(rng.choice([0, 10, 1000])),
            "truncated": lambda: whole[: rng.randrange(1, len(whole))],
        },
    )
    return _task_message("forged_garbage", variant, body, "not_json")


@kind("forged_bad_schema", TASKS, 1)
def forged_bad_schema(ctx: Context, rng: random.Random, _task) -> Message:
    """A round task of an old or unknown schema, or with an impossible field."""
    task = dataclasses.replace(_forged(ctx, rng), signature="A" * 88)
    document = json.loads(task.to_bytes())
    variant = rng.choice(
        [
            "fedq.task/1",
            "fedq.task/3",
            "no schema",
            "epochs 0",
            "negative version",
            "digest not hex",
            "learning rate NaN",
        ]
    )
    expected = "bad_schema"
    if variant in ("fedq.task/1", "fedq.task/3"):
        document["schema"], expected = variant, "schema_version"
    elif variant == "no schema":
        del document["schema"]
    elif variant == "epochs 0":
        document["train"]["epochs"] = 0
    elif variant == "negative version":
        document["model_version"] = -1
    elif variant == "digest not hex":
        document["model_digest"] = "z" * 64
    body = _json(document)
    if variant == "learning rate NaN":
        body = body.replace(b'"learning_rate":1000.0', b'"learning_rate":NaN')
    return _task_message("forged_bad_schema", variant, body, expected, task_id=task.task_id)


@kind("forged_other_job", TASKS, 1)
def forged_other_job(ctx: Context, rng: random.Random, _task) -> Message:
    """A round task of another job, signed by some key."""
    task = _forged(ctx, rng, job=rng.choice(["other-job", ctx.job + "x"]))
    task = dataclasses.replace(task, signature=ctx.foreign_key.sign(task.signed_document()))
    return _task_message("forged_other_job", task.job, task.to_bytes(), "unknown_job", task_id=task.task_id)


@kind("forged_too_large", TASKS, 0.5)
def forged_too_large(ctx: Context, rng: random.Random, _task) -> Message:
    """A task message larger than any round task (64 KiB)."""
    task = dataclasses.replace(_forged(ctx, rng), signature="A" * 88)
    body = task.to_bytes()[:-1] + b',"pad":"' + b"x" * (MAX_TASK_MESSAGE_BYTES + rng.choice([1, 100_000])) + b'"}'
    return _task_message("forged_too_large", f"{len(body) // 1024} KiB", body, "too_large", task_id=task.task_id)


@kind("forged_weird_headers", TASKS, 1)
def forged_weird_headers(ctx: Context, rng: random.Random, _task) -> Message:
    """A task signed by another key, with an undecodable timestamp or a spoofed delivery count."""
    message = forged_wrong_key(ctx, rng, None)
    variant, headers = _pick(
        rng,
        {
            "timestamp 2^64-1": lambda: {"sent": raw_timestamp(2**64 - 1)},
            "delivery count 2^40": lambda: {"x-delivery-count": 2**40},
            "delivery count string": lambda: {"x-delivery-count": "3"},
            "nested 40 deep": lambda: {"deep": raw_nested_table(40)},
        },
    )
    return dataclasses.replace(message, kind="forged_weird_headers", variant=variant, headers=headers)


@kind("forged_deep_header", TASKS, 0.5)
def forged_deep_header(ctx: Context, rng: random.Random, _task) -> Message:
    """A forged task with a header nested thousands deep, for the workers' pika to decode."""
    message = forged_wrong_key(ctx, rng, None)
    variant, value = deep_value(rng)
    return dataclasses.replace(message, kind="forged_deep_header", variant=variant, headers={"deep": value})


@kind("forged_frame_filling_header", TASKS, 0.5)
def forged_frame_filling_header(ctx: Context, rng: random.Random, _task) -> Message:
    """A forged task whose headers nearly fill a frame: no room left for a worker's dead-letter reason."""
    return filling_the_frame(ctx, rng, forged_wrong_key(ctx, rng, None), "forged_frame_filling_header")


@kind("replayed_task", TASKS, 0.5)
def replayed_task(ctx: Context, rng: random.Random, _task) -> Message:
    """A genuine, correctly signed task whose answer was already refused, published again: an honest
    worker trains it, and the coordinator refuses that update (its task is closed); or, once the
    archiver moved the task's version out of Redis, the worker refuses the task itself."""
    if not ctx.closed_tasks:
        return forged_wrong_key(ctx, rng, None)
    task = ctx.closed_tasks.pop(rng.randrange(len(ctx.closed_tasks)))
    outcomes = frozenset(["unknown_task", "unknown_version"])
    return _task_message(
        "replayed_task",
        f"task of version {task.model_version}",
        task.to_bytes(),
        outcomes,
        task_id=task.task_id,
        via="honest_update",
        account_id=task.task_id,
        repeat_expected=outcomes,
    )


FAMILIES = {
    "updates": "update exchange, no task needed",
    "task": "answers to genuine tasks taken off the queue",
    "tasks": "forged tasks on the task exchange",
}


def plan(messages: int, seed: int, *, only: set[str] | None = None) -> list[str]:
    """The kinds of ``messages`` messages, in proportion to their weights, in a seeded random order."""
    chosen = {name: entry for name, entry in KINDS.items() if (only is None or name in only) and entry.weight > 0}
    budget = messages
    total = sum(entry.weight for entry in chosen.values())
    exact = {name: budget * entry.weight / total for name, entry in chosen.items()} if total else {}
    counts = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda key: (counts[key] - exact[key], key))[: budget - sum(counts.values())]:
        counts[name] += 1
    kinds = [name for name, count in sorted(counts.items()) for _ in range(count)]
    random.Random(seed).shuffle(kinds)
    return kinds
