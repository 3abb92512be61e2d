"""The "images" task: ResNet-18-sized at its defaults, deterministic, and learnable at a tiny width."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedq.common.tasks import TaskPluginError, load_task, load_weights_into, weights_of
from fedq.common.tasks.images import CLASSES, SyntheticImagesTask
from fedq.common.wire.messages import TrainSettings

TINY = {"width": 4, "examples_per_partition": 32, "test_examples": 50}


def test_the_default_model_has_at_least_ten_million_parameters():
    model = SyntheticImagesTask().build_model()
    assert sum(parameter.numel() for parameter in model.parameters()) >= 10_000_000


def test_every_tensor_of_the_state_is_a_float32_parameter():
    """Workers send float32 deltas and the coordinator checks dtypes: no int64 BatchNorm counters."""
    model = SyntheticImagesTask(**TINY).build_model()
    assert list(dict(model.named_buffers())) == []
    assert {array.dtype for array in weights_of(model).values()} == {np.dtype(np.float32)}


def test_it_is_a_builtin_whose_sizes_are_bounded():
    assert isinstance(load_task("images", TINY), SyntheticImagesTask)
    with pytest.raises(TaskPluginError, match="width"):
        load_task("images", {"width": 0})


def test_initial_weights_are_deterministic_per_seed():
    task = SyntheticImagesTask(**TINY)
    first, again, other = (
        task.initial_weights(7),
        SyntheticImagesTask(**TINY).initial_weights(7),
        task.initial_weights(8),
    )
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[name], other[name]) for name in first)


def test_data_is_deterministic_per_partition_and_not_iid():
    task, again = SyntheticImagesTask(**TINY), SyntheticImagesTask(**TINY)
    first = task.local_data(3)
    assert first.features.shape == (32, 3, 32, 32) and first.features.dtype == torch.float32
    for data in (again.local_data(3), task.local_data(3 + task.num_partitions)):
        torch.testing.assert_close(data.features, first.features, rtol=0, atol=0)
        torch.testing.assert_close(data.targets, first.targets, rtol=0, atol=0)
    torch.testing.assert_close(task.test_data().features, again.test_data().features, rtol=0, atol=0)
    histograms = {tuple(torch.bincount(task.local_data(p).targets, minlength=CLASSES).tolist()) for p in range(5)}
    assert len(histograms) == 5
    other_seed = SyntheticImagesTask(**TINY, seed=1).local_data(3)
    assert not torch.equal(other_seed.features, first.features)


def test_a_tiny_model_trains_one_local_task_and_evaluates():
    task = SyntheticImagesTask(**TINY)
    base = task.initial_weights(0)
    model = load_weights_into(task.build_model(), base)
    metrics = task.train(model, task.local_data(0), TrainSettings(batch_size=16))
    assert np.isfinite(metrics["train_loss"])
    trained = weights_of(model)
    assert any(not np.array_equal(trained[name], base[name]) for name in base)
    scores = task.evaluate(model)
    assert 0.0 <= scores["accuracy"] <= 1.0 and np.isfinite(scores["loss"])


def test_a_few_local_tasks_lift_a_tiny_model_well_above_chance():
    # Nearly IID partitions (alpha=100), so four local tasks in a row are enough: about a second.
    task = SyntheticImagesTask(width=8, alpha=100.0, examples_per_partition=256, test_examples=200)
    model = load_weights_into(task.build_model(), task.initial_weights(0))
    before = task.evaluate(model)
    for round_number in range(4):
        task.train(model, task.local_data(round_number), TrainSettings(epochs=2, seed=round_number))
    after = task.evaluate(model)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 3 / CLASSES, (before, after)
