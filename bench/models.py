"""Task plugins for benchmarks: an MLP of a chosen size whose training is never run.

The coordinator loads these by module path (``bench.models:MLPTask``), so the
benchmark runs with the repository root as working directory. ``evaluate`` is a
constant so that the coordinator's initial evaluation (version 0, done even with
``--eval-every 0``) costs nothing.

Parameter counts of ``sizes`` = [d0, d1, ..., dn]: sum of d_i * d_{i+1} + d_{i+1}.

    SMALL = [100, 90, 10]    ->    10,000 parameters (4 tensors, 40 KB: inline updates)
    LARGE = [1000, 990, 10]  -> 1,000,900 parameters (4 tensors, 4.0 MB: claim-checked updates)
    HUGE = [1000, 9990, 10]  -> 10,099,900 parameters (4 tensors, 40 MB: claim-checked updates)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedq.common.tasks.base import FederatedTask, LocalData

SMALL = [100, 90, 10]
LARGE = [1000, 990, 10]
HUGE = [1000, 9990, 10]


def parameter_count(sizes: list[int]) -> int:
    return sum(d_in * d_out + d_out for d_in, d_out in zip(sizes, sizes[1:]))


class MLPTask(FederatedTask):
    """A ReLU MLP with layer widths ``sizes``; data is a handful of random rows."""

    score_metric = "accuracy"
    num_partitions = 1

    def __init__(self, sizes: list[int] | None = None):
        self.sizes = [int(size) for size in (sizes or SMALL)]
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError("sizes needs at least two positive layer widths")

    def build_model(self) -> nn.Module:
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(self.sizes, self.sizes[1:])):
            if index:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(d_in, d_out))
        return nn.Sequential(*layers)

    def _data(self, seed: int) -> LocalData:
        generator = torch.Generator().manual_seed(seed)
        features = torch.randn(8, self.sizes[0], generator=generator)
        targets = torch.randint(0, self.sizes[-1], (8,), generator=generator)
        return LocalData(features, targets)

    def local_data(self, partition: int) -> LocalData:
        return self._data(1 + partition % self.num_partitions)

    def test_data(self) -> LocalData:
        return self._data(0)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": 0.0}
