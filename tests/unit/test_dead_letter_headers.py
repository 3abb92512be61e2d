"""What a dead letter's headers say (reason, origin), how it is requeued, and its headers as JSON."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from fedq.broker.dead_letters import (
    had_undecodable_header,
    json_safe,
    letter_detail,
    letter_origin,
    letter_reason,
    origin_exchange,
    requeue_headers,
)
from fedq.broker.topology import Topology
from fedq.broker.transport import DETAIL_HEADER, ORIGIN_HEADER, REASON_HEADER, dead_letter_headers
from fedq.common.cli import UserError
from fedq.coordinator.ops.dead import wanted_reasons

TOPOLOGY = Topology("job-a")
# What RabbitMQ 3.10 puts on a message a quorum queue dead-letters past its delivery limit.
BROKER_DEATH = {
    "x-first-death-reason": "delivery_limit",
    "x-first-death-queue": "fedq.job-a.updates",
    "x-first-death-exchange": "fedq.job-a.updates",
    "x-death": [
        {
            "count": 1,
            "reason": "delivery_limit",
            "queue": "fedq.job-a.updates",
            "time": datetime(2024, 1, 1, tzinfo=UTC),
            "exchange": "fedq.job-a.updates",
            "routing-keys": ["fedq"],
        }
    ],
}


def test_fedq_letters_say_why_and_where_from():
    headers = dead_letter_headers({"sender": "w1"}, "unknown_task", "task t1 was never issued", origin="updates")
    assert (letter_reason(headers), letter_origin(headers, TOPOLOGY), letter_detail(headers)) == (
        "unknown_task",
        "updates",
        "task t1 was never issued",
    )
    assert letter_origin(dead_letter_headers({}, "bad_signature", "", origin="tasks"), TOPOLOGY) == "tasks"
    with pytest.raises(ValueError):
        dead_letter_headers({}, "bad_signature", "", origin="somewhere")


def test_broker_letters_give_the_brokers_reason_and_the_queue_they_died_in():
    assert (letter_reason(BROKER_DEATH), letter_origin(BROKER_DEATH, TOPOLOGY)) == ("delivery_limit", "updates")
    # Only x-death (e.g. after the x-first-death-* headers were stripped somewhere).
    only_deaths = {"x-death": [{**BROKER_DEATH["x-death"][0], "queue": "fedq.job-a.tasks", "reason": "rejected"}]}
    assert (letter_reason(only_deaths), letter_origin(only_deaths, TOPOLOGY)) == ("rejected", "tasks")


def test_a_queue_of_another_job_or_a_made_up_origin_is_no_origin():
    assert letter_origin(BROKER_DEATH, Topology("job-b")) is None
    assert letter_origin({ORIGIN_HEADER: "elsewhere"}, TOPOLOGY) is None
    assert letter_origin({ORIGIN_HEADER: b"tasks"}, TOPOLOGY) == "tasks"  # pika leaves some strings as bytes


def test_a_letter_that_says_nothing_is_unknown_or_undecodable():
    assert letter_reason({}) == letter_reason({"sent": 12, "when": datetime.now(UTC)}) == "unknown"
    # What the tolerant decoder makes of values pika's stock decoder fails on.
    assert letter_reason({"sent": 2**64 - 1}) == "undecodable"
    assert letter_reason({"nested": {"deep": [math.inf]}}) == "undecodable"
    assert not had_undecodable_header({"big": 2**63 - 1, "flag": True, "text": "x"})
    # A fedq reason wins: the undecodable header is then just a header.
    assert letter_reason({REASON_HEADER: "not_json", "sent": 2**64 - 1}) == "not_json"
    assert letter_reason({REASON_HEADER: 7}) == "unknown"  # not a reason


def test_a_requeued_letter_loses_the_death_bookkeeping_and_what_pika_cannot_encode():
    headers = {
        **dead_letter_headers(
            {"sender": "w1", "x-delivery-count": 3, "sent": 2**64 - 1}, "unknown_task", "detail", origin="updates"
        ),
        **BROKER_DEATH,
        "x-last-death-reason": "rejected",
    }
    assert requeue_headers(headers) == {"sender": "w1"}
    assert origin_exchange("updates", TOPOLOGY) == "fedq.job-a.updates"
    assert origin_exchange("tasks", TOPOLOGY) == "fedq.job-a.tasks"


def test_headers_become_json():
    headers = {
        "when": datetime(2024, 1, 1, tzinfo=UTC),
        "text": b"ok",
        "binary": b"\xff\x00",
        "price": Decimal("1.50"),
        "inf": math.inf,
        "nan": math.nan,
        "huge": 2**64 - 1,
        "nested": {b"key": [None, True, 1]},
        DETAIL_HEADER: "x",
    }
    safe = json_safe(headers)
    assert json.loads(json.dumps(safe, allow_nan=False)) == {
        "when": "2024-01-01T00:00:00+00:00",
        "text": "ok",
        "binary": {"base64": "/wA="},
        "price": "1.50",
        "inf": "inf",
        "nan": "nan",
        "huge": 2**64 - 1,
        "nested": {"key": [None, True, 1]},
        DETAIL_HEADER: "x",
    }


def test_reasons_are_given_repeated_or_comma_separated():
    assert wanted_reasons(None) is None
    assert wanted_reasons(["unknown_task", "not_json, bad_signature"]) == {"unknown_task", "not_json", "bad_signature"}
    with pytest.raises(UserError):
        wanted_reasons([" , "])
