"""One server step, as a pure function of the recorded inputs.

The coordinator and ``fedq replay`` both compute a version with
:func:`server_step`, from the aggregation config recorded in the version's
metadata, the parent's weights and optimizer state, and the ordered updates.
That single definition is what makes replay verify bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedq.common.wire.codec import Weights
from fedq.coordinator.algorithms.aggregation import Aggregator, BufferedUpdate
from fedq.coordinator.algorithms.registry import algorithm
from fedq.coordinator.algorithms.server_optimizers import ServerOptimizer


def build_aggregator(config: dict[str, Any]) -> Aggregator:
    """The aggregator a recorded config names; an unknown algorithm raises ValueError."""
    return algorithm(config["algorithm"]).build(config)


def build_optimizer(config: dict[str, Any]) -> ServerOptimizer:
    return ServerOptimizer(
        config["server_optimizer"],
        config["server_lr"],
        config["server_beta1"],
        config["server_beta2"],
        config["server_epsilon"],
    )


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CentralNoise:
    """Central differential privacy of one step: Gaussian noise of standard deviation
    ``noise_multiplier * clip * (the largest total weight one worker has in the step)`` on every
    value, drawn from ``seed`` (recorded with the version, so that replay draws the same)."""

    clip: float
    noise_multiplier: float
    seed: int

    @classmethod
    def of(cls, config: dict[str, Any], seed: int | None) -> CentralNoise | None:
        """The noise a recorded config asks for (None: no central DP)."""
        if config.get("dp") != "central":
            return None
        if seed is None:
            raise ValueError("the version was made with central DP but records no noise seed")
        return cls(float(config["dp_clip"]), float(config["dp_noise"]), int(seed))

    def standard_deviation(self, updates: Sequence[BufferedUpdate], update_weights: Sequence[float]) -> float:
        """Each update was clipped to ``clip`` and enters the step times its weight: one worker can
        move the step by at most ``clip`` times the sum of its updates' weights."""
        by_worker: dict[str, float] = {}
        for update, weight in zip(updates, update_weights):
            by_worker[update.worker_id] = by_worker.get(update.worker_id, 0.0) + abs(weight)
        return self.noise_multiplier * self.clip * max(by_worker.values(), default=0.0)

    def add(self, step: Weights, updates: Sequence[BufferedUpdate], update_weights: Sequence[float]) -> None:
        deviation = self.standard_deviation(updates, update_weights)
        generator = np.random.Generator(np.random.PCG64(self.seed))
        for name in sorted(step):  # a fixed order: the same seed gives the same noise
            step[name] += generator.normal(0.0, deviation, step[name].shape).astype(np.float32)


def server_step(
    aggregator: Aggregator,
    optimizer: ServerOptimizer,
    weights: Weights,
    optimizer_state: Weights,
    updates: Sequence[BufferedUpdate],
    base_weights: Callable[[int], Weights],
    noise: CentralNoise | None = None,
) -> tuple[Weights, Weights, list[float]]:
    """(new weights, new optimizer state, the weight each update got)."""
    update_weights = aggregator.weights(updates)
    step = aggregator.step(weights, updates, base_weights, update_weights)
    if noise is not None:
        noise.add(step, updates, update_weights)
    new_weights, new_state = optimizer.apply(weights, step, optimizer_state)
    return new_weights, new_state, update_weights
