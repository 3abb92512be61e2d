"""Message schemas: round trips and the MessageError reason of every kind of bad message."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.common.wire.messages import (
    TASK_SCHEMA,
    UPDATE_SCHEMA,
    ClaimCheck,
    InlineDelta,
    MessageError,
    ModelUpdate,
    RoundTask,
    TrainSettings,
    parse_task,
    parse_update,
)

FAST = settings(max_examples=100, deadline=None, database=None)

text = st.text(min_size=1, max_size=200)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.integers(min_value=0, max_value=2**53)

tasks = st.builds(
    RoundTask,
    job=text,
    task_id=text,
    model_version=non_negative,
    train=st.builds(
        TrainSettings,
        epochs=st.integers(1, 100),
        batch_size=st.integers(1, 4096),
        learning_rate=st.floats(min_value=1e-6, max_value=10.0),
        seed=st.integers(0, 2**31),
    ),
    issued_at=st.floats(min_value=0.0, max_value=4e9),
    model_digest=st.text("0123456789abcdef", min_size=64, max_size=64),
    signature=st.text(min_size=1, max_size=200),
)
deltas = st.one_of(
    st.builds(InlineDelta, payload=st.binary(max_size=300)),
    st.builds(
        ClaimCheck,
        key=st.text(min_size=1, max_size=300),
        sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
        nbytes=st.integers(min_value=0, max_value=2**40),
    ),
)
updates = st.builds(
    ModelUpdate,
    job=text,
    task_id=text,
    worker_id=text,
    base_version=non_negative,
    num_examples=st.integers(min_value=1, max_value=2**40),
    delta=deltas,
    metrics=st.dictionaries(st.text(max_size=20), finite, max_size=5),
    train_seconds=st.floats(min_value=0.0, max_value=1e6),
)


def good_update(**overrides) -> dict:
    document = {
        "schema": UPDATE_SCHEMA,
        "job": "j",
        "task_id": "t1",
        "worker_id": "w1",
        "base_version": 3,
        "num_examples": 10,
        "metrics": {"train_loss": 0.5},
        "train_seconds": 1.5,
        "delta": {"inline": base64.b64encode(b"payload").decode()},
    }
    document.update(overrides)
    return document


def good_task(**overrides) -> dict:
    document = {
        "schema": TASK_SCHEMA,
        "job": "j",
        "task_id": "t1",
        "model_version": 4,
        "train": {"epochs": 1, "batch_size": 32, "learning_rate": 0.05, "seed": 7},
        "issued_at": 12.5,
        "model_digest": "ab" * 32,
        "signature": "c2lnbmVk",
    }
    document.update(overrides)
    return document


def body(document) -> bytes:
    return json.dumps(document).encode()


def reason_of(parse, payload: bytes) -> str:
    with pytest.raises(MessageError) as info:
        parse(payload)
    assert info.value.detail and info.value.reason in str(info.value)
    return info.value.reason


# -- round trips -----------------------------------------------------------------------


@FAST
@given(tasks)
def test_task_round_trip(task):
    assert parse_task(task.to_bytes()) == task


@FAST
@given(updates)
def test_update_round_trip(update):
    assert parse_update(update.to_bytes()) == update


def test_update_round_trip_inline_example():
    update = ModelUpdate(
        job="job-1",
        task_id="task-9",
        worker_id="w",
        base_version=0,
        num_examples=1,
        delta=InlineDelta(b"\x00\x01binary\xff"),
        metrics={"loss": 1.25},
        train_seconds=0.5,
    )
    body_bytes = update.to_bytes()
    assert json.loads(body_bytes)["delta"] == {"inline": base64.b64encode(b"\x00\x01binary\xff").decode()}
    assert json.loads(body_bytes)["schema"] == "fedq.update/1"
    parsed = parse_update(body_bytes)
    assert parsed == update and isinstance(parsed.delta, InlineDelta)


def test_update_round_trip_claim_check_example():
    update = ModelUpdate(
        job="j",
        task_id="t",
        worker_id="w",
        base_version=12,
        num_examples=500,
        delta=ClaimCheck(key="fedq:j:blob:t", sha256="ab" * 32, nbytes=4096),
    )
    parsed = parse_update(update.to_bytes())
    assert parsed == update and isinstance(parsed.delta, ClaimCheck)
    assert parsed.metrics == {} and parsed.train_seconds == 0.0


def test_task_to_bytes_carries_schema():
    task = RoundTask(job="j", task_id="t", model_version=0, train=TrainSettings(), issued_at=1.0)
    document = json.loads(task.to_bytes())
    assert document["schema"] == "fedq.task/2"
    assert document["train"] == {"epochs": 1, "batch_size": 32, "learning_rate": 0.05, "seed": 0, "seconds": 0.0}


def test_optional_update_fields_default():
    document = good_update()
    del document["metrics"], document["train_seconds"]
    parsed = parse_update(body(document))
    assert parsed.metrics == {} and parsed.train_seconds == 0.0


def test_integer_metrics_and_train_seconds_become_floats():
    parsed = parse_update(body(good_update(metrics={"n": 3}, train_seconds=2)))
    assert parsed.metrics == {"n": 3.0} and isinstance(parsed.metrics["n"], float)
    assert isinstance(parsed.train_seconds, float)


# -- failures: envelope ----------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"not json", b"{", b"\xff\xfe\x00garbage", b"{'single': 'quotes'}"])
@pytest.mark.parametrize("parse", [parse_update, parse_task])
def test_not_json(parse, payload):
    assert reason_of(parse, payload) == "not_json"


@pytest.mark.parametrize("payload", [b"[]", b"[1, 2]", b'"fedq.update/1"', b"42", b"null", b"true"])
@pytest.mark.parametrize("parse", [parse_update, parse_task])
def test_json_that_is_not_an_object_is_bad_schema(parse, payload):
    assert reason_of(parse, payload) == "bad_schema"


@pytest.mark.parametrize(
    "schema", [None, 1, "", "fedq.task/1", "fedq.update", "fedq.updates/1", "other/1", "FEDQ.UPDATE/1"]
)
def test_update_with_wrong_schema_kind_is_bad_schema(schema):
    document = good_update(schema=schema)
    if schema is None:
        del document["schema"]
    assert reason_of(parse_update, body(document)) == "bad_schema"


def test_task_body_parsed_as_update_is_bad_schema_and_vice_versa():
    task = RoundTask(job="j", task_id="t", model_version=0, train=TrainSettings(), issued_at=1.0)
    assert reason_of(parse_update, task.to_bytes()) == "bad_schema"
    assert reason_of(parse_task, body(good_update())) == "bad_schema"


@pytest.mark.parametrize("schema", ["fedq.update/2", "fedq.update/0", "fedq.update/1.1", "fedq.update/"])
def test_other_update_version_is_schema_version(schema):
    assert reason_of(parse_update, body(good_update(schema=schema))) == "schema_version"


def test_other_task_version_is_schema_version():
    assert reason_of(parse_task, body(good_task(schema="fedq.task/1"))) == "schema_version"


# -- failures: update fields -----------------------------------------------------------


@pytest.mark.parametrize("name", ["job", "task_id", "worker_id", "base_version", "num_examples", "delta"])
def test_missing_update_field_is_bad_schema(name):
    document = good_update()
    del document[name]
    assert reason_of(parse_update, body(document)) == "bad_schema"


@pytest.mark.parametrize(
    "overrides",
    [
        {"base_version": True},
        {"base_version": False},
        {"num_examples": True},
        {"base_version": 1.0},
        {"base_version": "3"},
        {"num_examples": 2.5},
        {"num_examples": None},
        {"base_version": -1},
        {"num_examples": 0},
        {"num_examples": -5},
        {"job": ""},
        {"job": 5},
        {"task_id": "x" * 201},
        {"worker_id": None},
        {"metrics": []},
        {"metrics": "loss"},
        {"metrics": {"loss": "0.5"}},
        {"metrics": {"loss": True}},
        {"metrics": {"loss": None}},
        {"metrics": {"loss": [1.0]}},
        {"train_seconds": "1"},
        {"train_seconds": True},
        {"delta": "inline"},
        {"delta": {"inline": "not base64!"}},
        {"delta": {"inline": 5}},
        {"delta": {}},
        {"delta": {"key": "k", "sha256": "ab"}},  # no nbytes
        {"delta": {"key": "k", "sha256": "ab", "nbytes": True}},
        {"delta": {"key": "", "sha256": "ab", "nbytes": 1}},
        {"delta": {"key": "k", "sha256": "a" * 65, "nbytes": 1}},
        {"delta": {"sha256": "ab", "nbytes": 1}},
    ],
)
def test_bad_update_field_is_bad_schema(overrides):
    assert reason_of(parse_update, body(good_update(**overrides))) == "bad_schema"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_metric_is_bad_schema(literal):
    payload = body(good_update(metrics={"loss": 0.0})).replace(b'{"loss": 0.0}', b'{"loss": ' + literal.encode() + b"}")
    assert literal.encode() in payload
    assert reason_of(parse_update, payload) == "bad_schema"


def test_boundary_values_are_accepted():
    parsed = parse_update(body(good_update(base_version=0, num_examples=1, task_id="x" * 200)))
    assert parsed.base_version == 0 and parsed.num_examples == 1 and len(parsed.task_id) == 200


def test_message_error_is_a_value_error_with_reason_and_detail():
    error = MessageError("bad_schema", "field 'x' is missing")
    assert isinstance(error, ValueError)
    assert (error.reason, error.detail) == ("bad_schema", "field 'x' is missing")


# -- failures: task fields --------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        good_task(model_version=-1),
        good_task(model_version=True),
        good_task(model_version="4"),
        good_task(train="fast"),
        good_task(train={"epochs": 1, "batch_size": 32, "learning_rate": 0.05}),  # no seed
        good_task(train={"epochs": "many", "batch_size": 32, "learning_rate": 0.05, "seed": 1}),
        good_task(job=""),
        good_task(issued_at="now"),
        good_task(issued_at=None),
        good_task(model_digest="not a digest"),
        good_task(signature=""),
        {k: v for k, v in good_task().items() if k != "signature"},
        {k: v for k, v in good_task().items() if k != "task_id"},
        {k: v for k, v in good_task().items() if k != "train"},
    ],
)
def test_bad_task_field_is_bad_schema(document):
    assert reason_of(parse_task, body(document)) == "bad_schema"


# -- defects found and fixed (regression tests) -------------------------------------------------

HUGE = "1" + "0" * 400  # a valid JSON integer too large for a float


@pytest.mark.parametrize(
    "field_json", [b'"metrics": {"loss": ' + HUGE.encode() + b"}", b'"train_seconds": ' + HUGE.encode()]
)
def test_huge_integer_number_is_a_message_error(field_json):
    document = good_update()
    del document["metrics"], document["train_seconds"]
    payload = body(document)[:-1] + b", " + field_json + b"}"
    json.loads(payload)  # the body itself is valid JSON
    with pytest.raises(MessageError):
        parse_update(payload)


@pytest.mark.parametrize(
    "payload", [b'{"schema": "fedq.update/1", "base_version": ' + b"1" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000]
)
def test_pathological_json_is_a_message_error(payload):
    with pytest.raises(MessageError):
        parse_update(payload)
