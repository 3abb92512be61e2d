"""check_tensors and check_staleness: the reason label of every rejection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.common.wire.codec import tensor_specs
from fedq.common.wire.messages import ClaimCheck, InlineDelta, MessageError, ModelUpdate
from fedq.coordinator.service.validation import check_staleness, check_tensors

FAST = settings(max_examples=150, deadline=None, database=None)

MODEL = {
    "fc.weight": np.zeros((2, 3), dtype=np.float32),
    "fc.bias": np.zeros(2, dtype=np.float32),
    "steps": np.zeros(1, dtype=np.int64),
}
SPECS = tensor_specs(MODEL)


def good_delta() -> dict:
    return {
        "fc.weight": np.full((2, 3), 0.5, dtype=np.float32),
        "fc.bias": np.array([1.0, -1.0], np.float32),
        "steps": np.array([3], dtype=np.int64),
    }


def reason(delta) -> str:
    with pytest.raises(MessageError) as info:
        check_tensors(delta, SPECS)
    return info.value.reason


# -- check_tensors -----------------------------------------------------------------------


def test_matching_delta_passes_and_its_norm_is_returned():
    assert check_tensors(good_delta(), SPECS) == pytest.approx(math.sqrt(6 * 0.25 + 2 + 9))


def test_large_but_finite_values_pass():
    delta = good_delta()
    delta["fc.bias"] = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max], np.float32)
    assert math.isfinite(check_tensors(delta, SPECS))
    delta["steps"] = np.array([2**62], dtype=np.int64)
    check_tensors(delta, SPECS)


def test_float64_values_whose_squares_overflow_are_finite_not_refused():
    delta = {"w": np.array([1e200, 1.0], dtype=np.float64)}
    assert check_tensors(delta, tensor_specs(delta)) == math.inf  # a norm the norm bound judges


@pytest.mark.parametrize("change", ["missing", "extra", "renamed", "empty"])
def test_wrong_names(change):
    delta = good_delta()
    if change == "missing":
        del delta["fc.bias"]
    elif change == "extra":
        delta["fc2.weight"] = np.zeros(1, np.float32)
    elif change == "renamed":
        delta["fc.Bias"] = delta.pop("fc.bias")
    else:
        delta = {}
    assert reason(delta) == "wrong_tensors"


@pytest.mark.parametrize("shape", [(3, 2), (6,), (2, 3, 1), (1, 2, 3), (2, 2), ()])
def test_wrong_shape(shape):
    delta = good_delta()
    delta["fc.weight"] = np.zeros(shape, dtype=np.float32)
    assert reason(delta) == "wrong_shape"


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("fc.weight", np.float64),
        ("fc.weight", np.float16),
        ("fc.bias", np.int32),
        ("steps", np.float32),
        ("steps", np.int32),
    ],
)
def test_wrong_dtype(name, dtype):
    delta = good_delta()
    delta[name] = delta[name].astype(dtype)
    assert reason(delta) == "wrong_dtype"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["fc.weight", "fc.bias"])
def test_not_finite(name, bad):
    delta = good_delta()
    delta[name].flat[-1] = bad
    assert reason(delta) == "not_finite"


def test_names_are_checked_before_shapes_and_shapes_before_values():
    delta = good_delta()
    delta["fc.bias"] = np.array([np.nan, 1.0, 2.0], dtype=np.float32)  # wrong shape and not finite
    assert reason(delta) == "wrong_shape"
    delta["extra"] = np.zeros(1, np.float32)
    assert reason(delta) == "wrong_tensors"


@FAST
@given(st.integers(0, 5), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_any_single_non_finite_element_is_caught(position, bad):
    delta = good_delta()
    delta["fc.weight"].flat[position] = bad
    assert reason(delta) == "not_finite"


# -- check_staleness ---------------------------------------------------------------------


def update(base_version: int) -> ModelUpdate:
    return ModelUpdate(
        job="j", task_id="t", worker_id="w", base_version=base_version, num_examples=1, delta=InlineDelta(b"")
    )


def test_fresh_update_has_staleness_zero():
    assert check_staleness(update(7), head=7, max_staleness=0) == 0


def test_staleness_is_head_minus_base():
    assert check_staleness(update(3), head=10, max_staleness=20) == 7


def test_staleness_equal_to_the_limit_is_accepted():
    assert check_staleness(update(5), head=9, max_staleness=4) == 4


def test_too_stale():
    with pytest.raises(MessageError) as info:
        check_staleness(update(4), head=9, max_staleness=4)
    assert info.value.reason == "too_stale"


@pytest.mark.parametrize("base, head", [(1, 0), (11, 10), (1000, 3)])
def test_future_version(base, head):
    with pytest.raises(MessageError) as info:
        check_staleness(update(base), head=head, max_staleness=10**6)
    assert info.value.reason == "future_version"


def test_claim_checked_update_is_checked_the_same_way():
    claimed = ModelUpdate(
        job="j",
        task_id="t",
        worker_id="w",
        base_version=2,
        num_examples=5,
        delta=ClaimCheck(key="k", sha256="0" * 64, nbytes=10),
    )
    assert check_staleness(claimed, head=6, max_staleness=4) == 4


@FAST
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 1000))
def test_staleness_property(base, head, limit):
    if base > head:
        expected = "future_version"
    elif head - base > limit:
        expected = "too_stale"
    else:
        assert check_staleness(update(base), head, limit) == head - base
        return
    with pytest.raises(MessageError) as info:
        check_staleness(update(base), head, limit)
    assert info.value.reason == expected


def test_update_based_on_an_abandoned_version_is_rolled_back():
    with pytest.raises(MessageError) as info:
        check_staleness(update(4), head=6, max_staleness=10, abandoned={4, 5})
    assert info.value.reason == "rolled_back"


def test_abandoned_versions_do_not_affect_other_bases():
    assert check_staleness(update(3), head=6, max_staleness=10, abandoned={4, 5}) == 3


def test_rolled_back_is_reported_before_too_stale():
    with pytest.raises(MessageError) as info:
        check_staleness(update(1), head=100, max_staleness=2, abandoned={1})
    assert info.value.reason == "rolled_back"
