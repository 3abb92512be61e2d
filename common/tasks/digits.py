"""scikit-learn's bundled handwritten digits (1,797 8x8 images; no download).

A fixed 80/20 train/test split; the training part is split across partitions
by a Dirichlet(alpha) draw over labels (non-IID, alpha=0.5 by default).
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedq.common.tasks.base import MAX_PARTITIONS, FederatedTask, LocalData, check_parameter, dirichlet_partition

SPLIT_SEED = 0
TEST_FRACTION = 0.2


class DigitsTask(FederatedTask):
    score_metric = "accuracy"

    def __init__(self, num_partitions: int = 10, alpha: float = 0.5, seed: int = 0, hidden: int = 64):
        check_parameter("num_partitions", num_partitions, 1, MAX_PARTITIONS)
        check_parameter("alpha", alpha, 1e-6, 1e6, integer=False)
        check_parameter("seed", seed, 0, 2**32 - 1)
        check_parameter("hidden", hidden, 1, 65536)
        self.num_partitions = num_partitions
        self.alpha = alpha
        self.seed = seed
        self.hidden = hidden

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        features = (digits.data / 16.0).astype(np.float32)
        labels = digits.target.astype(np.int64)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
        test_count = int(len(labels) * TEST_FRACTION)
        test, train = order[:test_count], order[test_count:]
        return features[train], labels[train], features[test], labels[test]

    def _to_inputs(self, features: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(features)

    @cached_property
    def _partitions(self) -> list[np.ndarray]:
        _, train_labels, _, _ = self._arrays
        return dirichlet_partition(train_labels, self.num_partitions, self.alpha, self.seed)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def local_data(self, partition: int) -> LocalData:
        train_features, train_labels, _, _ = self._arrays
        indices = self._partitions[partition % self.num_partitions]
        return LocalData(self._to_inputs(train_features[indices]), torch.from_numpy(train_labels[indices]))

    @cached_property
    def _test(self) -> LocalData:
        _, _, test_features, test_labels = self._arrays
        return LocalData(self._to_inputs(test_features), torch.from_numpy(test_labels))

    def test_data(self) -> LocalData:
        return self._test

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)


class Digits28Task(DigitsTask):
    """The textbook server/client scenario: a 784-128-10 MLP on 28x28 images.

    The 8x8 digits are upsampled bilinearly to 28x28 (MNIST's size) so the
    classic MNIST MLP runs without a download. The MLP ends in logits: the
    cross-entropy loss applies log-softmax itself.
    """

    def __init__(self, num_partitions: int = 10, alpha: float = 0.5, seed: int = 0, hidden: int = 128):
        super().__init__(num_partitions=num_partitions, alpha=alpha, seed=seed, hidden=hidden)

    def _to_inputs(self, features: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(features).reshape(-1, 1, 8, 8)
        upsampled = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
        return upsampled.reshape(-1, 784).contiguous()

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(784, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))
