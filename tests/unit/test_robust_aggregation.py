"""FedBuff's robust options: norm clipping, coordinate-wise median, trimmed mean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.coordinator.algorithms.aggregation import BufferedUpdate, FedBuff, clip_by_norm
from fedq.coordinator.algorithms.staleness import Constant, Polynomial
from fedq.coordinator.algorithms.step import build_aggregator


def update(delta: dict, staleness: int = 0, examples: int = 10) -> BufferedUpdate:
    return BufferedUpdate("t", "w", 0, staleness, examples, delta)


def never_called(version: int):
    raise AssertionError("FedBuff must not need base versions")


def test_clip_by_norm_scales_to_the_bound_over_all_tensors():
    delta = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}  # norm 5
    clipped = clip_by_norm(delta, 1.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-6)
    assert clip_by_norm(delta, 10.0) is delta


def test_median_ignores_one_wild_update():
    honest = [
        {"w": np.array([1.0, -1.0], np.float32)},
        {"w": np.array([1.2, -0.8], np.float32)},
        {"w": np.array([0.8, -1.2], np.float32)},
        {"w": np.array([1.1, -0.9], np.float32)},
    ]
    wild = {"w": np.array([1e6, -1e6], np.float32)}
    aggregator = FedBuff(buffer_size=5, staleness=Constant(), robust="median")
    step = aggregator.step({"w": np.zeros(2, np.float32)}, [update(d) for d in honest + [wild]], never_called)
    np.testing.assert_allclose(step["w"], [1.1, -1.0], rtol=1e-6)  # medians of 5 values per coordinate
    mean_step = FedBuff(buffer_size=5, staleness=Constant()).step(
        {"w": np.zeros(2, np.float32)}, [update(d) for d in honest + [wild]], never_called
    )
    assert abs(mean_step["w"][0]) > 1e5, "the plain mean is not robust: the test must be able to tell"


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    values = [0.0, 1.0, 2.0, 3.0, 100.0, -50.0, 1.5, 2.5, 0.5, 1.0]
    aggregator = FedBuff(buffer_size=10, staleness=Constant(), robust="trimmed_mean", trim_fraction=0.1)
    step = aggregator.step(
        {"w": np.zeros(1, np.float32)}, [update({"w": np.array([value], np.float32)}) for value in values], never_called
    )
    expected = np.mean(sorted(values)[1:-1])
    np.testing.assert_allclose(step["w"], [expected], rtol=1e-6)


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.lists(st.floats(-10, 10, width=32), min_size=2, max_size=7), st.lists(st.integers(0, 6), min_size=7, max_size=7)
)
def test_robust_step_is_scaled_by_the_staleness_weights(values, stalenesses):
    updates = [update({"w": np.array([value], np.float32)}, staleness) for value, staleness in zip(values, stalenesses)]
    aggregator = FedBuff(buffer_size=len(values), staleness=Polynomial(0.5), robust="median")
    step = aggregator.step({"w": np.zeros(1, np.float32)}, updates, never_called)
    scale = np.mean([(1.0 + staleness) ** -0.5 for staleness in stalenesses[: len(values)]])
    np.testing.assert_allclose(step["w"], [np.median(np.array(values, np.float32)) * scale], rtol=1e-5, atol=1e-6)


def test_robust_settings_travel_through_the_recorded_config():
    config = {
        "algorithm": "fedbuff",
        "buffer_size": 4,
        "staleness": "constant",
        "example_weighted": False,
        "clip_norm": 2.5,
        "robust": "trimmed_mean",
        "trim_fraction": 0.25,
    }
    aggregator = build_aggregator(config)
    assert (aggregator.clip_norm, aggregator.robust, aggregator.trim_fraction) == (2.5, "trimmed_mean", 0.25)
    # Versions recorded before the robust options existed replay as a plain mean.
    legacy = build_aggregator(
        {key: value for key, value in config.items() if key not in ("clip_norm", "robust", "trim_fraction")}
    )
    assert (legacy.clip_norm, legacy.robust) == (0.0, "mean")


@pytest.mark.parametrize("kwargs", [{"robust": "mode"}, {"clip_norm": -1.0}, {"trim_fraction": 0.5}])
def test_invalid_robust_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        FedBuff(buffer_size=3, **kwargs)
