"""validate_update end to end on fakeredis: hostile claim checks end in a reason, never a crash or a big read."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedq.common.wire import codec
from fedq.common.wire.messages import ClaimCheck, InlineDelta, ModelUpdate
from fedq.coordinator.service.validation import Expectations, NormGuard, Rejected, validate_update
from tests.support import memory_store

JOB = "unit"
MODEL = {"fc.weight": np.zeros((4, 8), np.float32), "fc.bias": np.zeros(4, np.float32)}
SPECS = codec.tensor_specs(MODEL)
EXPECTED = Expectations(
    job=JOB, head=3, max_staleness=5, tensor_specs=SPECS, max_delta_bytes=codec.max_encoded_size(SPECS)
)


def issued_at_2(task_id: str) -> int | None:
    """Every task id the tests use is an open task issued at version 2 (the updates' base version)."""
    return 2


def body(task_id: str, delta) -> bytes:
    return ModelUpdate(job=JOB, task_id=task_id, worker_id="w", base_version=2, num_examples=5, delta=delta).to_bytes()


def claim_of(store, task_id: str, payload: bytes) -> ClaimCheck:
    return ClaimCheck(key=store.blobs.key(task_id, "w"), sha256=codec.digest(payload), nbytes=len(payload))


def reason(store, message: bytes) -> str:
    with pytest.raises(Rejected) as info:
        validate_update(message, EXPECTED, store, lambda task_id: False, issued_at_2)
    return info.value.reason


def test_a_genuine_claim_checked_update_is_validated():
    store = memory_store(JOB)
    payload = codec.encode({name: np.ones_like(array) for name, array in MODEL.items()})
    store.blobs.put("t1", "w", payload, 60)
    validated = validate_update(
        body("t1", claim_of(store, "t1", payload)), EXPECTED, store, lambda task_id: False, issued_at_2
    )
    assert validated.update.staleness == 1 and validated.inline_payload is None
    assert validated.digest == codec.digest(payload)
    assert len(payload) <= EXPECTED.max_delta_bytes


def test_a_claim_key_holding_a_hash_is_a_bad_claim_not_a_crash():
    store = memory_store(JOB)
    store.redis.hset(store.blobs.key("t1", "w"), "field", "value")  # WRONGTYPE for GET and STRLEN
    claim = ClaimCheck(key=store.blobs.key("t1", "w"), sha256="0" * 64, nbytes=100)
    assert reason(store, body("t1", claim)) == "bad_claim"


def test_an_oversized_claim_is_refused_before_redis_is_asked():
    store = memory_store(JOB)
    huge = EXPECTED.max_delta_bytes + 1
    # Nothing stored under the key: the size alone decides, before the blob (or its absence) is looked at.
    claim = ClaimCheck(key=store.blobs.key("t1", "w"), sha256="0" * 64, nbytes=huge)
    assert reason(store, body("t1", claim)) == "too_large"


def test_a_claim_whose_stored_blob_is_larger_than_claimed_is_not_read():
    store = memory_store(JOB)
    store.blobs.put("t1", "w", b"\0" * (EXPECTED.max_delta_bytes * 50), 60)  # a lie about its size
    claim = ClaimCheck(key=store.blobs.key("t1", "w"), sha256="0" * 64, nbytes=100)
    reads = []
    store.blobs.get = lambda key: reads.append(key)  # a GET would be a mistake here
    assert reason(store, body("t1", claim)) == "bad_digest"
    assert reads == []


def test_a_missing_blob_and_an_oversized_inline_delta_have_their_reasons():
    store = memory_store(JOB)
    assert (
        reason(store, body("t1", ClaimCheck(key=store.blobs.key("t1", "w"), sha256="0" * 64, nbytes=100)))
        == "missing_blob"
    )
    assert reason(store, body("t2", InlineDelta(b"\0" * (EXPECTED.max_delta_bytes + 1)))) == "too_large"


def test_the_norm_bound_follows_the_model_until_the_warm_up_then_the_median_of_accepted_updates():
    guard = NormGuard(10.0, window=4, warmup=3)
    assert guard.bound(model_norm=2.0) == 20.0  # no history yet: ten times the model's norm
    assert NormGuard(10.0).bound(model_norm=0.0) is None  # nothing to compare with: no bound
    assert NormGuard(0.0).bound(model_norm=2.0) is None  # off
    guard.accepted([("w", 0.5), ("w", 0.7)])
    assert guard.bound(model_norm=2.0) == 20.0  # still warming up
    guard.accepted([("w", 0.6), ("w", None)])  # None: a record from before norms were kept
    assert guard.bound(model_norm=2.0) == pytest.approx(6.0)  # ten times the median, even below the model's norm
    guard.accepted([("w", 1000.0)])  # one outlier in the window hardly moves the median
    assert guard.bound(model_norm=2.0) == pytest.approx(6.5)


def test_a_worker_whose_updates_are_larger_keeps_its_own_scale_up_to_factor_squared():
    guard = NormGuard(10.0, window=30, warmup=3, worker_window=5, worker_warmup=3)
    guard.accepted([("fast", 0.01)] * 25 + [("unique", 0.05)] * 3)  # a slow worker that alone holds some classes
    assert guard.bound(model_norm=2.0) == pytest.approx(0.1)  # the job's: ten times its median, 0.01
    assert guard.worker_bounds(model_norm=2.0) == {"unique": pytest.approx(0.5)}  # ten times its own median
    assert NormGuard(10.0, window=30, warmup=3).worker_bounds(model_norm=2.0) == {}
    ramping = NormGuard(10.0, window=30, warmup=3, worker_window=5, worker_warmup=3)
    ramping.accepted([("fast", 0.01)] * 25 + [("liar", 1e6)] * 5)  # its own median may count 10x the job's at most
    assert ramping.worker_bounds(model_norm=2.0)["liar"] == pytest.approx(10.0 * 10.0 * 0.01)


def test_a_plausible_step_is_bounded_by_the_model_or_one_acceptable_update():
    guard = NormGuard(10.0, window=4, warmup=1)
    assert NormGuard(0.0).step_bound(model_norm=2.0) is None
    assert NormGuard(10.0).step_bound(model_norm=0.0) is None
    assert guard.step_bound(model_norm=2.0) == 20.0
    guard.accepted([("w", 5.0)])
    assert guard.step_bound(model_norm=2.0) == 50.0


def test_an_update_over_the_norm_bound_is_a_norm_outlier():
    store = memory_store(JOB)
    delta = {name: np.full_like(array, 3.0) for name, array in MODEL.items()}  # norm 3 * 6 = 18
    expected = replace(EXPECTED, max_delta_norm=17.9)
    with pytest.raises(Rejected) as info:
        validate_update(
            body("t1", InlineDelta(codec.encode(delta))), expected, store, lambda task_id: False, issued_at_2
        )
    assert info.value.reason == "norm_outlier"
    validated = validate_update(
        body("t1", InlineDelta(codec.encode(delta))),
        replace(expected, max_delta_norm=18.1),
        store,
        lambda task_id: False,
        issued_at_2,
    )
    assert validated.norm == pytest.approx(18.0)


def test_an_update_for_a_task_never_issued_or_already_closed_is_unknown_task():
    store = memory_store(JOB)
    delta = InlineDelta(codec.encode({name: np.ones_like(array) for name, array in MODEL.items()}))
    with pytest.raises(Rejected) as info:
        validate_update(body("made-up", delta), EXPECTED, store, lambda task_id: False, lambda task_id: None)
    assert info.value.reason == "unknown_task" and info.value.task_id == "made-up"


def test_an_update_claiming_a_fresher_base_than_its_task_is_refused():
    store = memory_store(JOB)
    delta = InlineDelta(codec.encode({name: np.ones_like(array) for name, array in MODEL.items()}))
    with pytest.raises(Rejected) as info:  # the task was issued at version 1; the update claims 2 (less stale)
        validate_update(body("t1", delta), EXPECTED, store, lambda task_id: False, lambda task_id: 1)
    assert info.value.reason == "wrong_base_version"


def test_a_duplicate_is_recognised_before_its_closed_task_would_make_it_unknown():
    store = memory_store(JOB)
    delta = InlineDelta(codec.encode({name: np.ones_like(array) for name, array in MODEL.items()}))
    with pytest.raises(Rejected) as info:
        validate_update(body("t1", delta), EXPECTED, store, lambda task_id: True, lambda task_id: None)
    assert info.value.duplicate and info.value.reason == "duplicate"
