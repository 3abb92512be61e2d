"""Server optimizers (Reddi et al. 2021) against hand-computed values and a float64 reference.

The reference follows the module docstring / the paper, with step = the aggregated
client delta (pseudo-gradient g = -step):

    sgd:      x + lr step
    momentum: m = b1 m + step;                                  x + lr m
    adam:     m = b1 m + (1-b1) step; v = b2 v + (1-b2) step^2;  x + lr m / (sqrt v + eps)
    yogi:     as adam but v = v - (1-b2) step^2 sign(v - step^2)
    adagrad:  as adam but v = v + step^2
    no bias correction, m_0 = 0, v_0 = eps^2.

Tolerance. The module computes in float32, the reference in float64 from the same float32
inputs. Alongside each reference quantity we carry its "magnitude" (the same recursion
with every term made non-negative), which bounds how large the float32 rounding errors can
get: each float32 operation adds at most 2^-24 (6e-8) relative to it, and a handful of
operations happen per step. We check |got - ref| <= 1e-6 * t * magnitude (+1e-12 for
subnormal underflow) at step t, i.e. 1e-6 per carried step, which is ~4x above the
worst-case rounding bound and far below any formula error (e.g. bias correction changes
the first adam step by a factor of ~10, v_0 = 0 instead of eps^2 changes it by >1e-3).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedq.coordinator.algorithms.server_optimizers import OPTIMIZERS, ServerOptimizer

FAST = settings(max_examples=150, deadline=None, database=None)


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# -- hand-computed -----------------------------------------------------------------


def test_sgd_hand_example():
    new, state = ServerOptimizer("sgd", learning_rate=0.5).apply({"w": f32([1.0, 2.0])}, {"w": f32([2.0, -4.0])}, {})
    np.testing.assert_array_equal(new["w"], f32([2.0, 0.0]))
    assert state == {}
    assert not ServerOptimizer("sgd").stateful


def test_momentum_hand_example_over_two_steps():
    optimizer = ServerOptimizer("momentum", learning_rate=1.0, beta1=0.9)
    assert optimizer.stateful
    x1, state = optimizer.apply({"w": f32([0.0])}, {"w": f32([1.0])}, {})
    np.testing.assert_allclose(x1["w"], [1.0], rtol=1e-6)  # m = 1
    np.testing.assert_allclose(state["m.w"], [1.0], rtol=1e-6)
    x2, state = optimizer.apply(x1, {"w": f32([1.0])}, state)
    np.testing.assert_allclose(state["m.w"], [1.9], rtol=1e-6)  # m = 0.9 * 1 + 1
    np.testing.assert_allclose(x2["w"], [2.9], rtol=1e-6)  # 1 + 1.9
    assert set(state) == {"m.w"}


def test_adam_first_step_has_no_bias_correction_and_v0_eps_squared():
    optimizer = ServerOptimizer("adam", learning_rate=1.0, beta1=0.9, beta2=0.99, epsilon=1e-3)
    new, state = optimizer.apply({"w": f32([0.0])}, {"w": f32([0.1])}, {})
    m = 0.1 * 0.1  # (1 - 0.9) * 0.1 = 0.01
    v = 0.99 * 1e-6 + 0.01 * 0.1**2  # 0.99 eps^2 + 0.01 * 0.01 = 1.0099e-4
    expected = m / (math.sqrt(v) + 1e-3)  # ~0.90502, not ~0.99 as with bias correction
    assert expected == pytest.approx(0.905, abs=1e-3)
    np.testing.assert_allclose(state["m.w"], [m], rtol=1e-6)
    np.testing.assert_allclose(state["v.w"], [v], rtol=1e-6)
    np.testing.assert_allclose(new["w"], [expected], rtol=1e-6)
    assert set(state) == {"m.w", "v.w"}


def test_adagrad_first_step_uses_v0_eps_squared():
    optimizer = ServerOptimizer("adagrad", learning_rate=1.0, beta1=0.9, epsilon=1e-3)
    new, state = optimizer.apply({"w": f32([2.0])}, {"w": f32([1e-3])}, {})
    m = 0.1 * 1e-3  # 1e-4
    v = 1e-6 + 1e-6  # eps^2 + step^2
    expected = 2.0 + m / (math.sqrt(v) + 1e-3)  # 2 + 1e-4 / (1.41421e-3 + 1e-3) = 2.0414214 (0.05 if v0 = 0)
    np.testing.assert_allclose(state["v.w"], [2e-6], rtol=1e-6)
    np.testing.assert_allclose(new["w"], [expected], rtol=1e-6)
    assert new["w"][0] == pytest.approx(2.0414214, abs=1e-6)


def test_yogi_two_steps_variance_moves_towards_step_squared():
    optimizer = ServerOptimizer("yogi", learning_rate=1.0, beta1=0.9, beta2=0.99, epsilon=1e-3)
    x1, state = optimizer.apply({"w": f32([0.0])}, {"w": f32([0.1])}, {})
    # step^2 = 0.01 > v0 = 1e-6: sign(v - step^2) = -1, v = 1e-6 + 0.01 * 0.01 = 1.01e-4
    np.testing.assert_allclose(state["v.w"], [1.01e-4], rtol=1e-6)
    np.testing.assert_allclose(x1["w"], [0.01 / (math.sqrt(1.01e-4) + 1e-3)], rtol=1e-6)
    x2, state = optimizer.apply(x1, {"w": f32([0.001])}, state)
    # step^2 = 1e-6 < v: v = 1.01e-4 - 0.01 * 1e-6 = 1.0099e-4; m = 0.9 * 0.01 + 0.1 * 0.001 = 0.0091
    np.testing.assert_allclose(state["v.w"], [1.0099e-4], rtol=1e-6)
    np.testing.assert_allclose(state["m.w"], [0.0091], rtol=1e-6)
    np.testing.assert_allclose(x2["w"], x1["w"] + 0.0091 / (math.sqrt(1.0099e-4) + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inputs_are_not_mutated(name):
    optimizer = ServerOptimizer(name, learning_rate=0.7)
    weights = {"a": f32([1.0, -2.0]), "b": f32([[0.5, 0.25]])}
    step = {"a": f32([0.3, 0.1]), "b": f32([[-1.0, 2.0]])}
    _, state = optimizer.apply(weights, step, {})
    _, state = optimizer.apply(weights, step, state)
    snapshot = copy.deepcopy((weights, step, state))
    new, new_state = optimizer.apply(weights, step, state)
    for before, after in zip(snapshot, (weights, step, state)):
        assert before.keys() == after.keys()
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])
    # and the outputs do not alias the inputs
    for key in new:
        assert not np.shares_memory(new[key], weights[key])
        assert not np.shares_memory(new[key], step[key])
    for key in new_state:
        assert all(not np.shares_memory(new_state[key], array) for array in (*state.values(), *step.values()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "rmsprop"},
        {"name": "sgd", "learning_rate": 0.0},
        {"name": "sgd", "learning_rate": -1.0},
        {"name": "sgd", "learning_rate": float("nan")},
        {"name": "adam", "beta1": 1.0},
        {"name": "adam", "beta1": -0.1},
        {"name": "adam", "beta2": 1.0},
        {"name": "adam", "epsilon": 0.0},
        {"name": "adam", "epsilon": -1e-3},
    ],
)
def test_constructor_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ServerOptimizer(**kwargs)


def test_defaults_follow_the_paper():
    optimizer = ServerOptimizer()
    assert (optimizer.name, optimizer.learning_rate, optimizer.beta1, optimizer.beta2, optimizer.epsilon) == (
        "sgd",
        1.0,
        0.9,
        0.99,
        1e-3,
    )


# -- float64 reference -------------------------------------------------------------


class Reference:
    """One tensor's optimizer in float64, with magnitudes bounding the rounding error."""

    def __init__(self, name, lr, b1, b2, eps, x0):
        self.name, self.lr, self.b1, self.b2, self.eps = name, lr, b1, b2, eps
        self.x = x0.astype(np.float64)
        self.x_mag = np.abs(self.x)
        self.m = np.zeros_like(self.x)
        self.m_mag = np.zeros_like(self.x)
        self.v = np.full_like(self.x, eps**2)
        self.v_mag = self.v.copy()

    def step(self, s32):
        s = s32.astype(np.float64)
        b1, b2, eps = self.b1, self.b2, self.eps
        if self.name == "sgd":
            direction, d_mag = s, np.abs(s)
        elif self.name == "momentum":
            self.m = b1 * self.m + s
            self.m_mag = b1 * self.m_mag + np.abs(s)
            direction, d_mag = self.m, self.m_mag
        else:
            self.m = b1 * self.m + (1 - b1) * s
            self.m_mag = b1 * self.m_mag + (1 - b1) * np.abs(s)
            squared = s * s
            if self.name == "adam":
                self.v = b2 * self.v + (1 - b2) * squared
                self.v_mag = b2 * self.v_mag + (1 - b2) * squared
            elif self.name == "yogi":
                difference = self.v - squared
                # where v and step^2 agree to float32 precision the sign is not determined
                assume(bool((np.abs(difference) > 1e-4 * (self.v_mag + squared)).all()))
                self.v = self.v - (1 - b2) * squared * np.sign(difference)
                self.v_mag = self.v_mag + (1 - b2) * squared
            else:
                self.v = self.v + squared
                self.v_mag = self.v_mag + squared
            root = np.sqrt(self.v)
            direction = self.m / (root + eps)
            # error of m over (sqrt v + eps), plus |m| times the relative error of sqrt(v)
            # (v_mag / v is 1 for adam and adagrad; v = 0 only when every term is 0)
            ratio = np.divide(self.v_mag, self.v, out=np.ones_like(self.v), where=self.v > 0)
            d_mag = (self.m_mag + np.abs(self.m) * ratio) / (root + eps)
        self.x = self.x + self.lr * direction
        self.x_mag = self.x_mag + self.lr * d_mag
        return self.x


values = st.floats(min_value=-10.0, max_value=10.0, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def optimizer_cases(draw):
    shapes = draw(st.lists(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4), min_size=1, max_size=3))
    names = [f"t{i}" for i in range(len(shapes))]
    weights = {n: draw(hnp.arrays(np.float32, shape, elements=values)) for n, shape in zip(names, shapes)}
    count = draw(st.integers(min_value=1, max_value=5))
    steps = [
        {n: draw(hnp.arrays(np.float32, shape, elements=values)) for n, shape in zip(names, shapes)}
        for _ in range(count)
    ]
    optimizer = ServerOptimizer(
        name=draw(st.sampled_from(OPTIMIZERS)),
        learning_rate=draw(st.floats(min_value=0.01, max_value=2.0)),
        beta1=draw(st.floats(min_value=0.0, max_value=0.99)),
        beta2=draw(st.floats(min_value=0.0, max_value=0.999)),
        epsilon=draw(st.floats(min_value=1e-4, max_value=0.1)),
    )
    return optimizer, weights, steps


def assert_within(got, ref, magnitude, tolerance):
    error = np.abs(got.astype(np.float64) - ref)
    bound = tolerance * magnitude + 1e-12
    assert (error <= bound).all(), f"error {error.max()} > bound at {np.argmax(error - bound)}: {got} vs {ref}"


@FAST
@given(optimizer_cases())
def test_matches_float64_reference_over_several_steps(case):
    optimizer, weights, steps = case
    references = {
        name: Reference(optimizer.name, optimizer.learning_rate, optimizer.beta1, optimizer.beta2, optimizer.epsilon, x)
        for name, x in weights.items()
    }
    state: dict = {}
    for t, step in enumerate(steps, start=1):
        weights, state = optimizer.apply(weights, step, state)
        tolerance = 1e-6 * t
        expected_keys = {"sgd": set(), "momentum": {"m."}}.get(optimizer.name, {"m.", "v."})
        assert set(state) == {prefix + name for prefix in expected_keys for name in weights}
        for name, reference in references.items():
            x = reference.step(step[name])
            assert weights[name].dtype == np.float32
            if optimizer.name != "sgd":
                assert_within(state[f"m.{name}"], reference.m, reference.m_mag, tolerance)
            if optimizer.name in ("adam", "yogi", "adagrad"):
                assert_within(state[f"v.{name}"], reference.v, reference.v_mag, tolerance)
            assert_within(weights[name], x, reference.x_mag, tolerance)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_read_only_inputs_are_accepted(name):
    def frozen(weights):
        for array in weights.values():
            array.setflags(write=False)
        return weights

    optimizer = ServerOptimizer(name)
    weights = frozen({"w": f32([1.0, 2.0])})
    step = frozen({"w": f32([0.5, -0.5])})
    _, state = optimizer.apply(weights, step, {})
    new, _ = optimizer.apply(weights, step, frozen(state))
    assert new["w"].flags.writeable and np.isfinite(new["w"]).all()
