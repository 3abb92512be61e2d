"""FedAsync and FedBuff: hand-computed examples and properties against float64 references.

The references below are written from the papers, not from the module:

* FedAsync (Xie, Koyejo, Gupta 2019):
  x_new = (1 - alpha s(tau)) x + alpha s(tau) (x_base + delta); every update is mixed
  once with its own alpha s(tau) (the rate never compounds).
* FedBuff (Nguyen et al. 2022): x_new = x + sum_i p_i s(tau_i) delta_i with p_i = 1/K,
  or n_i / sum_j n_j when example-weighted; ``renormalise`` divides by sum_i p_i s(tau_i).

Tolerance. The aggregator computes in float32; the references compute in float64 from
the *same* float32 inputs, so the only differences are float32 rounding errors. The
textbook bound for a float32 sum of K terms (each a product) is about
(K + 2) * 2^-24 * sum_i |term_i|, i.e. below 1e-6 * sum_i |term_i| for the K <= 6 used
here. So each element is checked as |got - ref| <= 1e-6 * magnitude + 1e-12, where
``magnitude`` is the elementwise sum of the absolute values of the terms the formula adds
(which is >= |ref|, so this is at least a 1e-6 relative check; it only differs from a pure
relative check where terms cancel, where relative error is meaningless). The 1e-12 floor
only covers float32 subnormal underflow (values are in [-10, 10], so any real error is
orders of magnitude larger).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedq.coordinator.algorithms.aggregation import BufferedUpdate, FedAsync, FedBuff
from fedq.coordinator.algorithms.server_optimizers import ServerOptimizer
from fedq.coordinator.algorithms.staleness import Constant, Cutoff, Exponential, Hinge, Polynomial

FAST = settings(max_examples=100, deadline=None, database=None)
LIGHT = settings(max_examples=40, deadline=None, database=None)
RTOL = 1e-6
FLOOR = 1e-12


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def update(delta, staleness=0, base_version=0, num_examples=1, task_id="t") -> BufferedUpdate:
    return BufferedUpdate(
        task_id=task_id,
        worker_id="w",
        base_version=base_version,
        staleness=staleness,
        num_examples=num_examples,
        delta=delta,
    )


def assert_close(got: np.ndarray, ref: np.ndarray, magnitude: np.ndarray) -> None:
    assert got.shape == ref.shape
    error = np.abs(got.astype(np.float64) - ref)
    bound = RTOL * magnitude + FLOOR
    assert (error <= bound).all(), f"max error {error.max()} exceeds bound; got {got}, ref {ref}"


def never_called(version):
    raise AssertionError(f"base weights of version {version} should not be needed")


# -- FedAsync: hand-computed -----------------------------------------------------


def test_fedasync_constant_staleness_hand_example():
    aggregator = FedAsync(mixing_rate=0.5, staleness=Constant())
    current = {"w": f32([1.0, 2.0])}
    # the worker started from version 0 = [0, 0] and trained to [2, 4]
    step = aggregator.step(
        current, [update({"w": f32([2.0, 4.0])}, base_version=0)], {0: {"w": f32([0.0, 0.0])}}.__getitem__
    )
    # 0.5 * ([2, 4] - [1, 2]) = [0.5, 1]; new model (1 - 0.5) [1, 2] + 0.5 [2, 4] = [1.5, 3]
    np.testing.assert_array_equal(step["w"], f32([0.5, 1.0]))
    np.testing.assert_array_equal(current["w"] + step["w"], f32([1.5, 3.0]))


def test_fedasync_stale_update_uses_its_base_version_and_discount():
    aggregator = FedAsync(mixing_rate=0.6, staleness=Polynomial(0.5))
    current = {"w": f32([1.0, -1.0])}
    versions = {5: {"w": f32([0.0, 1.0])}, 8: {"w": f32([100.0, 100.0])}}
    buffered = update({"w": f32([1.0, 1.0])}, staleness=3, base_version=5)
    # alpha_t = 0.6 * (1 + 3)^-0.5 = 0.3; x_new = x_base + delta = [1, 2]
    assert aggregator.weights([buffered]) == pytest.approx([0.3], rel=1e-12)
    step = aggregator.step(current, [buffered], versions.__getitem__)
    # 0.3 * ([1, 2] - [1, -1]) = [0, 0.9]
    np.testing.assert_allclose(step["w"], [0.0, 0.9], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(current["w"] + step["w"], [1.0, -0.1], rtol=1e-6, atol=1e-7)
    assert step["w"].dtype == np.float32


def test_fedasync_mixing_rate_one_and_fresh_update_replaces_the_model():
    aggregator = FedAsync(mixing_rate=1.0, staleness=Polynomial(0.5))
    current = {"w": f32([3.0, -7.0, 0.5])}
    delta = {"w": f32([1.0, 1.0, 1.0])}
    step = aggregator.step(current, [update(delta, base_version=2)], {2: current}.__getitem__)
    np.testing.assert_array_equal(current["w"] + step["w"], f32([4.0, -6.0, 1.5]))


def test_fedasync_does_not_mutate_inputs():
    aggregator = FedAsync(mixing_rate=0.4, staleness=Hinge(1.0, 0.0))
    current = {"a": f32([1.0, 2.0]), "b": f32([[3.0]])}
    base = {"a": f32([0.5, 0.5]), "b": f32([[1.0]])}
    delta = {"a": f32([0.25, -1.0]), "b": f32([[2.0]])}
    snapshot = copy.deepcopy((current, base, delta))
    aggregator.step(current, [update(delta, staleness=2, base_version=1)], {1: base}.__getitem__)
    for before, after in zip(snapshot, (current, base, delta)):
        for name in before:
            np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.parametrize("count", [0, 2, 3])
def test_fedasync_rejects_anything_but_one_update(count):
    aggregator = FedAsync()
    updates = [update({"w": f32([1.0])}, task_id=f"t{i}") for i in range(count)]
    with pytest.raises(ValueError):
        aggregator.step({"w": f32([0.0])}, updates, lambda version: {"w": f32([0.0])})


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_fedasync_rejects_bad_mixing_rate(rate):
    with pytest.raises(ValueError):
        FedAsync(mixing_rate=rate)


def test_fedasync_defaults():
    aggregator = FedAsync()
    assert aggregator.mixing_rate == 0.6
    assert aggregator.staleness == Polynomial(0.5)
    assert aggregator.buffer_size == 1


# -- FedBuff: hand-computed ------------------------------------------------------


TWO = [{"w": f32([1.0, 2.0])}, {"w": f32([3.0, -2.0])}]


def test_fedbuff_uniform_weights_hand_example():
    aggregator = FedBuff(buffer_size=2, staleness=Constant())
    updates = [update(TWO[0]), update(TWO[1])]
    assert aggregator.weights(updates) == [0.5, 0.5]
    step = aggregator.step({"w": f32([10.0, 10.0])}, updates, never_called)
    # 0.5 [1, 2] + 0.5 [3, -2] = [2, 0]
    np.testing.assert_array_equal(step["w"], f32([2.0, 0.0]))


def test_fedbuff_staleness_discount_hand_example():
    aggregator = FedBuff(buffer_size=2, staleness=Polynomial(0.5))
    updates = [update(TWO[0], staleness=0), update(TWO[1], staleness=3)]
    # weights 1/2 * 1 and 1/2 * 4^-0.5 = [0.5, 0.25] (not renormalised: they sum to 0.75)
    assert aggregator.weights(updates) == pytest.approx([0.5, 0.25], rel=1e-12)
    step = aggregator.step({"w": f32([0.0, 0.0])}, updates, never_called)
    # 0.5 [1, 2] + 0.25 [3, -2] = [1.25, 0.5]
    np.testing.assert_array_equal(step["w"], f32([1.25, 0.5]))


def test_fedbuff_example_weighted_hand_example():
    aggregator = FedBuff(buffer_size=2, staleness=Constant(), example_weighted=True)
    updates = [update(TWO[0], num_examples=1), update(TWO[1], num_examples=3)]
    assert aggregator.weights(updates) == pytest.approx([0.25, 0.75], rel=1e-12)
    step = aggregator.step({"w": f32([0.0, 0.0])}, updates, never_called)
    # 0.25 [1, 2] + 0.75 [3, -2] = [2.5, -1]
    np.testing.assert_array_equal(step["w"], f32([2.5, -1.0]))


def test_fedbuff_renormalised_hand_example():
    aggregator = FedBuff(buffer_size=2, staleness=Polynomial(0.5), renormalise=True)
    updates = [update(TWO[0], staleness=0), update(TWO[1], staleness=3)]
    # raw [0.5, 0.25] / 0.75 = [2/3, 1/3]
    assert aggregator.weights(updates) == pytest.approx([2 / 3, 1 / 3], rel=1e-12)
    step = aggregator.step({"w": f32([0.0, 0.0])}, updates, never_called)
    # 2/3 [1, 2] + 1/3 [3, -2] = [5/3, 2/3]
    np.testing.assert_allclose(step["w"], [5 / 3, 2 / 3], rtol=1e-6)


def test_fedbuff_new_model_under_sgd_is_current_plus_step():
    aggregator = FedBuff(buffer_size=2, staleness=Constant())
    current = {"w": f32([10.0, 20.0])}
    step = aggregator.step(current, [update(TWO[0]), update(TWO[1])], never_called)
    new, state = ServerOptimizer("sgd", 1.0).apply(current, step, {})
    np.testing.assert_array_equal(new["w"], f32([12.0, 20.0]))
    assert state == {}


def test_fedbuff_does_not_mutate_inputs():
    aggregator = FedBuff(buffer_size=2, staleness=Exponential(0.5), example_weighted=True)
    current = {"w": f32([1.0, 2.0])}
    deltas = [{"w": f32([0.5, 0.5])}, {"w": f32([-1.0, 4.0])}]
    snapshot = copy.deepcopy((current, deltas))
    aggregator.step(current, [update(deltas[0], 1, num_examples=2), update(deltas[1], 0, num_examples=5)], never_called)
    np.testing.assert_array_equal(snapshot[0]["w"], current["w"])
    for before, after in zip(snapshot[1], deltas):
        np.testing.assert_array_equal(before["w"], after["w"])


def test_fedbuff_rejects_empty_buffer():
    with pytest.raises(ValueError):
        FedBuff().step({"w": f32([0.0])}, [], never_called)


@pytest.mark.parametrize("size", [0, -1, -10])
def test_fedbuff_rejects_bad_buffer_size(size):
    with pytest.raises(ValueError):
        FedBuff(buffer_size=size)


def test_fedbuff_defaults():
    aggregator = FedBuff()
    assert aggregator.buffer_size == 3
    assert aggregator.staleness == Polynomial(0.5)
    assert aggregator.example_weighted is False and aggregator.renormalise is False


# -- float64 references from the papers -------------------------------------------


def reference_fedasync(x, x_base, delta, alpha, s_tau):
    """(new model, elementwise magnitude of the terms) in float64."""
    a = alpha * s_tau
    x, x_base, delta = (np.asarray(v, dtype=np.float64) for v in (x, x_base, delta))
    new = (1.0 - a) * x + a * (x_base + delta)
    magnitude = np.abs(x) + a * (np.abs(x_base) + np.abs(delta) + np.abs(x))
    return new, magnitude


def reference_fedbuff_step(deltas, staleness, examples, s, example_weighted, renormalise):
    K = len(deltas)
    if example_weighted:
        total = float(sum(examples))
        p = [n / total for n in examples]
    else:
        p = [1.0 / K] * K
    w = [p_i * s(t) for p_i, t in zip(p, staleness)]
    if renormalise:
        norm = sum(w)
        w = [w_i / norm for w_i in w]
    step = sum(w_i * np.asarray(d, dtype=np.float64) for w_i, d in zip(w, deltas))
    magnitude = sum(abs(w_i) * np.abs(np.asarray(d, dtype=np.float64)) for w_i, d in zip(w, deltas))
    return step, magnitude


# -- strategies --------------------------------------------------------------------

values = st.floats(min_value=-10.0, max_value=10.0, width=32, allow_nan=False, allow_infinity=False)
rates = st.floats(min_value=0.0, max_value=3.0, allow_nan=False)
staleness_functions = st.one_of(
    st.just(Constant()),
    st.builds(Polynomial, a=rates),
    st.builds(Hinge, a=rates, b=st.floats(min_value=0.0, max_value=10.0)),
    st.builds(Exponential, a=rates),
    # 0, or a weight a person would choose: a subnormal value (5e-324) underflows the reference's own sum.
    st.builds(
        Cutoff,
        limit=st.floats(min_value=0.0, max_value=10.0),
        value=st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1.0)),
    ),
)
shape_lists = st.lists(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4), min_size=1, max_size=3)


def arrays_like(shapes):
    return st.fixed_dictionaries(
        {f"t{i}": hnp.arrays(np.float32, shape, elements=values) for i, shape in enumerate(shapes)}
    )


@st.composite
def fedasync_cases(draw):
    shapes = draw(shape_lists)
    steps = draw(st.integers(min_value=1, max_value=4))
    current = draw(arrays_like(shapes))
    bases = [draw(arrays_like(shapes)) for _ in range(steps)]
    deltas = [draw(arrays_like(shapes)) for _ in range(steps)]
    staleness = draw(st.lists(st.integers(min_value=0, max_value=30), min_size=steps, max_size=steps))
    alpha = draw(st.floats(min_value=0.001, max_value=1.0))
    s = draw(staleness_functions)
    return current, bases, deltas, staleness, alpha, s


@FAST
@given(fedasync_cases())
def test_fedasync_matches_paper_reference_over_a_sequence(case):
    """Each step mixes its update with alpha s(tau) of its own: no compounding across steps."""
    current, bases, deltas, staleness, alpha, s = case
    aggregator = FedAsync(mixing_rate=alpha, staleness=s)
    sgd = ServerOptimizer("sgd", 1.0)
    for i, (base, delta, tau) in enumerate(zip(bases, deltas, staleness)):
        buffered = update(delta, staleness=tau, base_version=i)
        assert aggregator.weights([buffered]) == pytest.approx([alpha * s(tau)], rel=1e-12)
        step = aggregator.step(current, [buffered], {i: base}.__getitem__)
        new, _ = sgd.apply(current, step, {})
        for name in current:
            ref_new, magnitude = reference_fedasync(current[name], base[name], delta[name], alpha, s(tau))
            ref_step = ref_new - current[name].astype(np.float64)
            assert step[name].dtype == np.float32
            assert_close(step[name], ref_step, magnitude)
            assert_close(new[name], ref_new, magnitude)
        current = new


@st.composite
def fedbuff_cases(draw):
    shapes = draw(shape_lists)
    k = draw(st.integers(min_value=1, max_value=6))
    current = draw(arrays_like(shapes))
    deltas = [draw(arrays_like(shapes)) for _ in range(k)]
    staleness = draw(st.lists(st.integers(min_value=0, max_value=30), min_size=k, max_size=k))
    examples = draw(st.lists(st.integers(min_value=1, max_value=10_000), min_size=k, max_size=k))
    return current, deltas, staleness, examples, draw(staleness_functions), draw(st.booleans()), draw(st.booleans())


@FAST
@given(fedbuff_cases())
def test_fedbuff_matches_paper_reference(case):
    current, deltas, staleness, examples, s, example_weighted, renormalise = case
    if renormalise and sum(s(t) for t in staleness) == 0:
        renormalise = False  # every weight is 0: nothing to renormalise (see the test below)
    aggregator = FedBuff(
        buffer_size=len(deltas), staleness=s, example_weighted=example_weighted, renormalise=renormalise
    )
    updates = [
        update(d, staleness=t, num_examples=n, task_id=f"t{i}")
        for i, (d, t, n) in enumerate(zip(deltas, staleness, examples))
    ]
    step = aggregator.step(current, updates, never_called)
    new, _ = ServerOptimizer("sgd", 1.0).apply(current, step, {})
    assert step.keys() == current.keys()
    for name in current:
        ref_step, magnitude = reference_fedbuff_step(
            [d[name] for d in deltas], staleness, examples, s, example_weighted, renormalise
        )
        x = current[name].astype(np.float64)
        assert step[name].dtype == np.float32 and step[name].shape == current[name].shape
        assert_close(step[name], ref_step, magnitude)
        assert_close(new[name], x + ref_step, np.abs(x) + magnitude)


@FAST
@given(fedbuff_cases())
def test_fedbuff_with_fresh_full_buffer_and_example_weights_is_fedavg(case):
    """K = number of updates, tau = 0, example-weighted: the n-weighted average of client models."""
    current, deltas, _, examples, s, _, renormalise = case
    aggregator = FedBuff(buffer_size=len(deltas), staleness=s, example_weighted=True, renormalise=renormalise)
    updates = [
        update(d, staleness=0, num_examples=n, task_id=f"t{i}") for i, (d, n) in enumerate(zip(deltas, examples))
    ]
    new, _ = ServerOptimizer("sgd", 1.0).apply(current, aggregator.step(current, updates, never_called), {})
    total = float(sum(examples))
    for name in current:
        x = current[name].astype(np.float64)
        clients = [x + d[name].astype(np.float64) for d in deltas]  # x_i = x + delta_i
        fedavg = sum(n * client for n, client in zip(examples, clients)) / total
        magnitude = np.abs(x) + sum(n * np.abs(d[name].astype(np.float64)) for n, d in zip(examples, deltas)) / total
        assert_close(new[name], fedavg, magnitude)


@LIGHT
@given(fedbuff_cases())
def test_fedbuff_uniform_weights_ignore_example_counts(case):
    current, deltas, staleness, examples, s, _, _ = case
    aggregator = FedBuff(buffer_size=len(deltas), staleness=s)
    updates = [
        update(d, staleness=t, num_examples=n, task_id=f"t{i}")
        for i, (d, t, n) in enumerate(zip(deltas, staleness, examples))
    ]
    relabelled = [
        update(d, staleness=t, num_examples=1, task_id=f"t{i}") for i, (d, t) in enumerate(zip(deltas, staleness))
    ]
    first = aggregator.step(current, updates, never_called)
    second = aggregator.step(current, relabelled, never_called)
    for name in current:
        np.testing.assert_array_equal(first[name], second[name])


def test_fedbuff_renormalise_with_all_weights_zero_fails_cleanly():
    """Cutoff(value=0) with every update past the limit makes sum_i p_i s(tau_i) = 0: expect a
    ValueError or a finite (zero) step, not an arithmetic exception from deep inside."""
    aggregator = FedBuff(buffer_size=2, staleness=Cutoff(limit=1.0, value=0.0), renormalise=True)
    updates = [update(TWO[0], staleness=5), update(TWO[1], staleness=6)]
    try:
        step = aggregator.step({"w": f32([0.0, 0.0])}, updates, never_called)
    except ValueError:
        return
    assert np.isfinite(step["w"]).all()


def read_only(weights):
    frozen = {}
    for name, array in weights.items():
        array = array.copy()
        array.setflags(write=False)
        frozen[name] = array
    return frozen


def test_aggregators_accept_read_only_inputs():
    """The coordinator caches versions as read-only arrays; stepping must neither fail nor need to write them."""
    current = read_only({"w": f32([1.0, 2.0])})
    base = read_only({"w": f32([0.0, 0.0])})
    delta = read_only({"w": f32([2.0, 4.0])})
    step = FedAsync(0.5, Constant()).step(current, [update(delta)], {0: base}.__getitem__)
    np.testing.assert_array_equal(step["w"], f32([0.5, 1.0]))
    step = FedBuff(2, Constant()).step(current, [update(delta), update(read_only(TWO[1]))], never_called)
    np.testing.assert_array_equal(step["w"], f32([2.5, 1.0]))  # 0.5 [2, 4] + 0.5 [3, -2]
    assert step["w"].flags.writeable
