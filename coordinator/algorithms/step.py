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
from typing import Any

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


def server_step(
    aggregator: Aggregator,
    optimizer: ServerOptimizer,
    weights: Weights,
    optimizer_state: Weights,
    updates: Sequence[BufferedUpdate],
    base_weights: Callable[[int], Weights],
) -> tuple[Weights, Weights, list[float]]:
    """(new weights, new optimizer state, the weight each update got)."""
    update_weights = aggregator.weights(updates)
    step = aggregator.step(weights, updates, base_weights, update_weights)
    new_weights, new_state = optimizer.apply(weights, step, optimizer_state)
    return new_weights, new_state, update_weights
