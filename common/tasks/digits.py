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

    def __init__(
        self,
        num_partitions: int = 10,
        alpha: float = 0.5,
        seed: int = 0,
        hidden: int = 64,
        exclusive_classes: list[int] | None = None,
        exclusive_partitions: list[int] | None = None,
    ):
        check_parameter("num_partitions", num_partitions, 1, MAX_PARTITIONS)
        check_parameter("alpha", alpha, 1e-6, 1e6, integer=False)
        check_parameter("seed", seed, 0, 2**32 - 1)
        check_parameter("hidden", hidden, 1, 65536)
        self.num_partitions = num_partitions
        self.alpha = alpha
        self.seed = seed
        self.hidden = hidden
        # A split where some partitions alone hold some classes (the heterogeneity benchmark: slow
        # workers that are the only ones to see digits 7-9). Both lists or neither.
        self.exclusive_classes = sorted(exclusive_classes or [])
        self.exclusive_partitions = sorted(exclusive_partitions or [])
        for name, values, high in (
            ("exclusive_classes", self.exclusive_classes, 9),
            ("exclusive_partitions", self.exclusive_partitions, num_partitions - 1),
        ):
            for value in values:
                check_parameter(name, value, 0, high)
        if (
            bool(self.exclusive_classes) != bool(self.exclusive_partitions)
            or len(self.exclusive_partitions) >= num_partitions
            or len(self.exclusive_classes) >= 10
        ):
            raise ValueError(
                "exclusive_classes and exclusive_partitions go together, and leave some classes and "
                "partitions to the others"
            )

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
        if not self.exclusive_partitions:
            return dirichlet_partition(train_labels, self.num_partitions, self.alpha, self.seed)
        parts: list[np.ndarray] = [np.empty(0, np.int64)] * self.num_partitions
        exclusive = np.isin(train_labels, self.exclusive_classes)
        others = [index for index in range(self.num_partitions) if index not in self.exclusive_partitions]
        for owners, mask in ((self.exclusive_partitions, exclusive), (others, ~exclusive)):
            indices = np.flatnonzero(mask)
            for owner, part in zip(
                owners, dirichlet_partition(train_labels[indices], len(owners), self.alpha, self.seed)
            ):
                parts[owner] = indices[part]
        return parts

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
