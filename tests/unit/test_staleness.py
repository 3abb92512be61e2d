"""Staleness functions s(tau): hand-computed values, s(0) = 1, monotonicity, spec round trips."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.coordinator.algorithms.staleness import (
    Constant,
    Cutoff,
    Exponential,
    Hinge,
    NormalisedAt,
    Polynomial,
    StalenessFunction,
    parse_staleness,
)

FAST = settings(max_examples=150, deadline=None, database=None)

# -- hand-computed values ------------------------------------------------------


@pytest.mark.parametrize("tau", [0, 1, 7, 1000])
def test_constant_is_one_everywhere(tau):
    assert Constant()(tau) == 1.0


@pytest.mark.parametrize(
    "a, tau, expected",
    [
        (0.5, 0, 1.0),
        (0.5, 3, 0.5),  # 4^-0.5
        (0.5, 8, 1 / 3),  # 9^-0.5
        (0.5, 15, 0.25),  # 16^-0.5
        (1.0, 1, 0.5),  # 2^-1
        (1.0, 4, 0.2),  # 5^-1
        (2.0, 1, 0.25),  # 2^-2
        (2.0, 9, 0.01),  # 10^-2
        (0.0, 50, 1.0),  # a = 0: no discount
    ],
)
def test_polynomial_values(a, tau, expected):
    assert Polynomial(a)(tau) == pytest.approx(expected, rel=1e-12)


def test_polynomial_default_is_fedbuff_inverse_sqrt():
    assert Polynomial().a == 0.5
    assert Polynomial()(3) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize(
    "a, b, tau, expected",
    [
        (10.0, 4.0, 0, 1.0),
        (10.0, 4.0, 4, 1.0),  # still inside the hinge
        (10.0, 4.0, 5, 1 / 11),  # 1 / (10*1 + 1)
        (10.0, 4.0, 6, 1 / 21),  # 1 / (10*2 + 1)
        (10.0, 4.0, 4.5, 1 / 6),  # 1 / (10*0.5 + 1)
        (0.5, 2.0, 4, 0.5),  # 1 / (0.5*2 + 1)
        (1.0, 0.0, 3, 0.25),  # 1 / (1*3 + 1)
        (0.0, 1.0, 100, 1.0),  # a = 0: no discount
    ],
)
def test_hinge_values(a, b, tau, expected):
    assert Hinge(a, b)(tau) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "a, tau, expected",
    [
        (0.5, 0, 1.0),
        (0.5, 2, 0.36787944117144233),  # e^-1
        (1.0, 1, 0.36787944117144233),  # e^-1
        (math.log(2), 3, 0.125),  # 2^-3
        (0.0, 9, 1.0),
    ],
)
def test_exponential_values(a, tau, expected):
    assert Exponential(a)(tau) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "limit, value, tau, expected",
    [
        (4.0, 0.0, 4, 1.0),
        (4.0, 0.0, 5, 0.0),
        (2.0, 0.25, 2, 1.0),
        (2.0, 0.25, 3, 0.25),
        (0.0, 0.5, 0, 1.0),
        (0.0, 0.5, 1, 0.5),
    ],
)
def test_cutoff_values(limit, value, tau, expected):
    assert Cutoff(limit, value)(tau) == expected


def test_normalised_at_hand_values():
    f = NormalisedAt(Polynomial(0.5), 3.0)  # inner(3) = 0.5
    assert f(3) == pytest.approx(1.0, rel=1e-12)
    assert f(0) == pytest.approx(2.0, rel=1e-12)
    assert f(15) == pytest.approx(0.5, rel=1e-12)  # 0.25 / 0.5


# -- properties ----------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)
small_rate = st.floats(min_value=0.0, max_value=20.0, **finite)
threshold = st.floats(min_value=0.0, max_value=1e4, **finite)

base_functions: st.SearchStrategy[StalenessFunction] = st.one_of(
    st.just(Constant()),
    st.builds(Polynomial, a=small_rate),
    st.builds(Hinge, a=small_rate, b=threshold),
    st.builds(Exponential, a=small_rate),
    st.builds(Cutoff, limit=threshold, value=st.floats(min_value=0.0, max_value=1.0, **finite)),
)
staleness_values = st.one_of(
    st.integers(min_value=0, max_value=10**6), st.floats(min_value=0.0, max_value=1e6, **finite)
)


@FAST
@given(base_functions)
def test_every_function_gives_one_at_zero(function):
    assert function(0) == 1.0
    assert function(0.0) == 1.0


@FAST
@given(base_functions, staleness_values, staleness_values)
def test_every_function_is_non_increasing_and_in_unit_interval(function, t1, t2):
    low, high = sorted((t1, t2))
    assert function(low) >= function(high)
    assert 0.0 <= function(high) <= 1.0


def _normalisable(function: StalenessFunction, average: float) -> bool:
    return function(average) > 0


@FAST
@given(base_functions)
def test_spec_round_trips(function):
    assert parse_staleness(function.spec()) == function


@FAST
@given(base_functions, st.floats(min_value=0.0, max_value=50.0, **finite))
def test_normalised_spec_round_trips_and_is_one_at_average(function, average):
    if not _normalisable(function, average):
        with pytest.raises(ValueError):
            NormalisedAt(function, average)
        return
    normalised = NormalisedAt(function, average)
    assert normalised(average) == pytest.approx(1.0, rel=1e-12)
    assert parse_staleness(normalised.spec()) == normalised
    assert parse_staleness(normalised.spec())(average) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("constant", Constant()),
        ("polynomial", Polynomial(0.5)),
        ("polynomial:a=2", Polynomial(2.0)),
        (" hinge:a=10, b=4 ", Hinge(10.0, 4.0)),
        ("exponential:a=0.25", Exponential(0.25)),
        ("cutoff:limit=3,value=0.1", Cutoff(3.0, 0.1)),
        ("hinge:a=10,b=4@2", NormalisedAt(Hinge(10.0, 4.0), 2.0)),
        ("polynomial:a=0.5@3", NormalisedAt(Polynomial(0.5), 3.0)),
    ],
)
def test_parse_examples(spec, expected):
    assert parse_staleness(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",  # no name
        "linear",  # unknown name
        "Polynomial:a=0.5",  # names are case-sensitive
        "polynomial:a",  # not name=value
        "polynomial:a=abc",  # not a number
        "polynomial:c=1",  # unknown parameter
        "constant:a=1",  # constant takes none
        "polynomial:a=-0.5",  # negative exponent
        "hinge:a=-1,b=4",
        "hinge:a=1,b=-4",
        "exponential:a=-1",
        "cutoff:limit=-1",
        "cutoff:value=1.5",
        "cutoff:value=-0.1",
        "polynomial:a=0.5@abc",  # average not a number
        "cutoff:limit=2,value=0@5",  # s(average) = 0: cannot normalise
        "exponential:a=1@1e6",  # s(average) underflows to 0
    ],
)
def test_parse_rejects_bad_specs_with_value_error(spec):
    with pytest.raises(ValueError):
        parse_staleness(spec)


@pytest.mark.parametrize(
    "cls, params",
    [
        (Polynomial, {"a": -1.0}),
        (Hinge, {"a": -1.0}),
        (Hinge, {"b": -1.0}),
        (Exponential, {"a": -0.1}),
        (Cutoff, {"limit": -1.0}),
        (Cutoff, {"value": 2.0}),
    ],
)
def test_constructors_reject_bad_parameters(cls, params):
    with pytest.raises(ValueError):
        cls(**params)


# -- defects found and fixed (regression tests) ----------


@pytest.mark.parametrize(
    "spec", ["polynomial:a=nan", "hinge:a=nan", "exponential:a=nan", "cutoff:limit=nan", "polynomial@nan"]
)
def test_parse_rejects_nan_parameters(spec):
    with pytest.raises(ValueError):
        parse_staleness(spec)


@pytest.mark.parametrize("spec", ["polynomial:a=0.5@-1", "polynomial:a=0.5@-2"])
def test_parse_rejects_negative_average_with_value_error(spec):
    with pytest.raises(ValueError):
        parse_staleness(spec)


def test_exponential_infinite_rate_is_rejected_or_one_at_zero():
    try:
        function = parse_staleness("exponential:a=inf")
    except ValueError:
        return
    assert function(0) == 1.0
