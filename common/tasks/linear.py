"""The textbook two-party example: linear regression on 10 features, FedAvg of two models.

Each party draws its own inputs (with a different mean, so the two data sets
differ) from one true model y = x.w + b + noise. The score is R^2 on a shared
test set.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedq.common.tasks.base import MAX_PARTITIONS, FederatedTask, LocalData, check_parameter

FEATURES = 10


class LinearRegressionTask(FederatedTask):
    score_metric = "r2"

    def __init__(self, num_partitions: int = 2, samples_per_party: int = 500, noise: float = 0.1, seed: int = 0):
        check_parameter("num_partitions", num_partitions, 1, MAX_PARTITIONS)
        check_parameter("samples_per_party", samples_per_party, 1, 1_000_000)
        check_parameter("noise", noise, 0, 1e6, integer=False)
        check_parameter("seed", seed, 0, 2**32 - 1)
        self.num_partitions = num_partitions
        self.samples_per_party = samples_per_party
        self.noise = noise
        self.seed = seed

    @cached_property
    def _true_model(self) -> tuple[np.ndarray, float]:
        rng = np.random.default_rng(self.seed)
        return rng.normal(0, 1, FEATURES), float(rng.normal(0, 1))

    def _draw(self, stream: int, count: int, shift: float) -> LocalData:
        rng = np.random.default_rng([self.seed, stream])
        weights, bias = self._true_model
        features = rng.normal(shift, 1, (count, FEATURES))
        targets = features @ weights + bias + rng.normal(0, self.noise, count)
        return LocalData(
            torch.from_numpy(features.astype(np.float32)), torch.from_numpy(targets.astype(np.float32)).unsqueeze(1)
        )

    def build_model(self) -> nn.Module:
        return nn.Linear(FEATURES, 1)

    def local_data(self, partition: int) -> LocalData:
        party = partition % self.num_partitions
        return self._draw(1 + party, self.samples_per_party, shift=float(party) - 0.5)

    @cached_property
    def _test(self) -> LocalData:
        return self._draw(0, 1000, shift=0.0)

    def test_data(self) -> LocalData:
        return self._test

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        data = self.test_data()
        predictions = model(data.features)
        residual = float(((predictions - data.targets) ** 2).sum())
        total = float(((data.targets - data.targets.mean()) ** 2).sum())
        return {"r2": 1.0 - residual / total, "loss": residual / len(data)}
