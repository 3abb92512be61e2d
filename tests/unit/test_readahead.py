"""The read-ahead begins reading a claim-checked delta only for a message that can be one."""

from __future__ import annotations

from fedq.broker.transport import Delivery
from fedq.common.wire.limits import UPDATE_ENVELOPE_BYTES
from fedq.common.wire.messages import ClaimCheck, ModelUpdate
from fedq.coordinator.service.readahead import DeltaReadAhead
from tests.support import memory_store


def claim_message(store, padding: int = 0) -> bytes:
    update = ModelUpdate(
        job="unit",
        task_id="t1",
        worker_id="w",
        base_version=0,
        num_examples=1,
        delta=ClaimCheck(key=store.blobs.key("t1", "w"), sha256="0" * 64, nbytes=100),
    )
    return update.to_bytes() + b" " * padding  # trailing whitespace: still valid JSON


def test_a_claim_is_read_ahead_and_a_message_larger_than_any_claim_is_left_for_its_turn():
    store = memory_store("unit")
    read_ahead = DeltaReadAhead(store, max_delta_bytes=1000)
    try:
        read_ahead.start(Delivery(1, claim_message(store)), lambda task_id: True)
        assert read_ahead.started == 1 and read_ahead.result_for(Delivery(1, b"")) is not None
        oversized = claim_message(store, padding=UPDATE_ENVELOPE_BYTES)
        read_ahead.start(Delivery(2, oversized), lambda task_id: True)
        assert read_ahead.started == 1 and read_ahead.result_for(Delivery(2, b"")) is None
    finally:
        read_ahead.close()


def test_an_inline_delta_is_not_parsed_ahead_only_on_its_turn(monkeypatch):
    """Parsing a message is the loop's own work when there is nothing to read: an inline delta
    parsed ahead was parsed twice, base64 and all."""
    from fedq.common.wire.messages import InlineDelta
    from fedq.coordinator.service import readahead

    store = memory_store("unit")
    parsed, parse = [], readahead.parse_worker_message
    monkeypatch.setattr(readahead, "parse_worker_message", lambda body: parsed.append(body) or parse(body))
    inline = ModelUpdate(
        job="unit", task_id="t1", worker_id="w", base_version=0, num_examples=1, delta=InlineDelta(b"\0" * 4000)
    ).to_bytes()
    assert len(inline) < UPDATE_ENVELOPE_BYTES
    read_ahead = DeltaReadAhead(store, max_delta_bytes=10_000)
    try:
        read_ahead.start(Delivery(1, inline), lambda task_id: True)
        assert parsed == [] and read_ahead.started == 0
        read_ahead.start(Delivery(2, claim_message(store)), lambda task_id: True)
        assert len(parsed) == 1 and read_ahead.started == 1
    finally:
        read_ahead.close()
