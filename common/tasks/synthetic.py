"""Synthetic(alpha, beta) of Li et al. 2020 (FedProx), with multinomial logistic regression.

Per device k: u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k, b_k ~ N(u_k, 1);
v_k[j] ~ N(B_k, 1); x ~ N(v_k, diag(j^-1.2)); y = argmax(softmax(W_k x + b_k)).
Sample counts follow the FedProx generator's power law: lognormal(4, 2) + 50.
Alpha controls how much local models differ, beta how much local data differ.
Each device keeps 80% of its samples for training; the union of the other 20%
is the global test set.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedq.common.tasks.base import MAX_PARTITIONS, FederatedTask, LocalData, check_parameter

FEATURES = 60
CLASSES = 10
TRAIN_FRACTION = 0.8


class SyntheticTask(FederatedTask):
    score_metric = "accuracy"

    def __init__(
        self, alpha: float = 1.0, beta: float = 1.0, num_partitions: int = 30, seed: int = 0, max_samples: int = 2000
    ):
        check_parameter("alpha", alpha, 0, 1e6, integer=False)
        check_parameter("beta", beta, 0, 1e6, integer=False)
        check_parameter("num_partitions", num_partitions, 1, MAX_PARTITIONS)
        check_parameter("seed", seed, 0, 2**32 - 1)
        check_parameter("max_samples", max_samples, 1, 1_000_000)
        self.alpha, self.beta = alpha, beta
        self.num_partitions = num_partitions
        self.seed = seed
        self.max_samples = max_samples

    @cached_property
    def _devices(self) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        counts = np.minimum(rng.lognormal(4, 2, self.num_partitions).astype(int) + 50, self.max_samples)
        covariance_diagonal = np.arange(1, FEATURES + 1, dtype=np.float64) ** -1.2
        devices = []
        for count in counts:
            model_mean = rng.normal(0, np.sqrt(self.alpha))
            data_mean = rng.normal(0, np.sqrt(self.beta))
            weights = rng.normal(model_mean, 1, (CLASSES, FEATURES))
            bias = rng.normal(model_mean, 1, CLASSES)
            centre = rng.normal(data_mean, 1, FEATURES)
            features = rng.normal(centre, np.sqrt(covariance_diagonal), (count, FEATURES))
            labels = np.argmax(features @ weights.T + bias, axis=1)
            devices.append((features.astype(np.float32), labels.astype(np.int64)))
        return devices

    def _split(self, device: int) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        features, labels = self._devices[device]
        return int(len(labels) * TRAIN_FRACTION), (features, labels)

    def build_model(self) -> nn.Module:
        return nn.Linear(FEATURES, CLASSES)

    def local_data(self, partition: int) -> LocalData:
        cut, (features, labels) = self._split(partition % self.num_partitions)
        return LocalData(torch.from_numpy(features[:cut]), torch.from_numpy(labels[:cut]))

    @cached_property
    def _test(self) -> LocalData:
        parts = [self._split(device) for device in range(self.num_partitions)]
        features = np.concatenate([data[0][cut:] for cut, data in parts])
        labels = np.concatenate([data[1][cut:] for cut, data in parts])
        return LocalData(torch.from_numpy(features), torch.from_numpy(labels))

    def test_data(self) -> LocalData:
        return self._test

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)
