"""dirichlet_partition: a disjoint cover of the indices, deterministic per seed, min_size respected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.common.tasks.base import dirichlet_partition

FAST = settings(max_examples=100, deadline=None, database=None)


@st.composite
def cases(draw):
    num_partitions = draw(st.integers(min_value=1, max_value=8))
    min_size = draw(st.integers(min_value=0, max_value=10))
    num_classes = draw(st.integers(min_value=1, max_value=10))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    # Every class has >= 2 examples per partition and the whole set >= 4 min_size per partition
    # more than the classes' rounding loss, so a split exists and redraws find it quickly. (Smaller
    # classes hit the rounding defect tested by the xfail tests at the end.)
    counts = draw(
        st.lists(
            st.integers(min_value=2 * num_partitions, max_value=2 * num_partitions + 60),
            min_size=num_classes,
            max_size=num_classes,
        )
    )
    counts[0] += max(0, 4 * num_partitions * max(min_size, 1) + num_partitions * num_classes - sum(counts))
    labels = np.repeat(np.arange(num_classes), counts)
    np.random.default_rng(seed).shuffle(labels)
    alpha = draw(st.floats(min_value=0.5, max_value=1e4))
    return labels, num_partitions, alpha, seed, min_size


@FAST
@given(cases())
def test_partitions_are_a_disjoint_cover_of_at_least_min_size(case):
    labels, num_partitions, alpha, seed, min_size = case
    parts = dirichlet_partition(labels, num_partitions, alpha, seed, min_size=min_size)
    assert len(parts) == num_partitions
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == len(labels)  # disjoint (no index twice) ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))  # ... and covering
    for part in parts:
        assert len(part) >= min_size
        assert (np.diff(part) > 0).all()  # sorted, no duplicates


@FAST
@given(cases())
def test_deterministic_for_a_seed(case):
    labels, num_partitions, alpha, seed, min_size = case
    first = dirichlet_partition(labels, num_partitions, alpha, seed, min_size=min_size)
    second = dirichlet_partition(labels.copy(), num_partitions, alpha, seed, min_size=min_size)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_different_seeds_give_different_splits():
    labels = np.repeat(np.arange(10), 100)
    first = dirichlet_partition(labels, 5, 0.5, seed=1)
    second = dirichlet_partition(labels, 5, 0.5, seed=2)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(first, second))


def test_default_min_size_is_ten():
    labels = np.repeat(np.arange(3), 40)
    for seed in range(20):
        parts = dirichlet_partition(labels, 6, 0.3, seed=seed)
        assert min(len(part) for part in parts) >= 10


def test_large_alpha_is_nearly_iid_and_small_alpha_is_skewed():
    labels = np.repeat(np.arange(4), 500)  # 4 classes x 500
    even = dirichlet_partition(labels, 4, 1e5, seed=0, min_size=1)
    for part in even:
        counts = np.bincount(labels[part], minlength=4)
        assert (np.abs(counts - 125) <= 10).all()  # every partition ~ 1/4 of every class
    skewed = dirichlet_partition(labels, 4, 0.05, seed=0, min_size=1)
    dominant = [np.bincount(labels[part], minlength=4).max() / len(part) for part in skewed]
    assert np.mean(dominant) > 0.6  # partitions mostly hold one class


def test_single_partition_holds_everything():
    labels = np.array([2, 0, 1, 1, 0, 2, 2])
    (only,) = dirichlet_partition(labels, 1, 1.0, seed=3, min_size=7)
    np.testing.assert_array_equal(only, np.arange(7))


def test_impossible_min_size_raises_value_error():
    labels = np.zeros(25, dtype=np.int64)
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 3, 1.0, seed=0, min_size=10)  # 3 * 10 > 25


# -- defects found and fixed (regression tests) -------------------------------------------------


def test_near_iid_split_of_small_classes_succeeds():
    labels = np.repeat(np.arange(10), 3)  # 30 examples, 8 partitions of >= 1: clearly possible
    parts = dirichlet_partition(labels, 8, 1e5, seed=0, min_size=1)
    assert min(len(part) for part in parts) >= 1


def test_near_iid_split_is_unbiased_across_partitions():
    labels = np.repeat(np.arange(10), 180)
    sizes = np.mean(
        [[len(p) for p in dirichlet_partition(labels, 10, 1e4, seed=seed, min_size=1)] for seed in range(50)], axis=0
    )
    np.testing.assert_allclose(sizes, 180, atol=1.5)
