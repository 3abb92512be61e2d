"""The one list of every name a user can choose: algorithms, staleness functions,
server optimizers, robust estimators. The CLI's choices come from here; an
unknown name is an error, never a silent fallback.

Light on purpose: the aggregators (and torch) are imported only when one is
built, so ``fedq demo --help`` need not pay torch's import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedq.coordinator.algorithms.staleness import STALENESS_FUNCTIONS, parse_staleness

if TYPE_CHECKING:
    from fedq.coordinator.algorithms.aggregation import Aggregator

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")
ROBUST_ESTIMATORS = ("mean", "median", "trimmed_mean")
# How staleness bounds and weighs updates: by each worker's measured speed, or by a fixed cut.
STALENESS_BOUNDS = ("adaptive", "fixed")

__all__ = [
    "ALGORITHMS",
    "ROBUST_ESTIMATORS",
    "SERVER_OPTIMIZERS",
    "STALENESS_BOUNDS",
    "STALENESS_FUNCTIONS",
    "Algorithm",
    "algorithm",
]


@dataclass(frozen=True)
class Algorithm:
    """An aggregation algorithm: how to build its aggregator from a recorded config,
    and whether the coordinator dispatches in synchronous rounds (a barrier)."""

    name: str
    synchronous: bool
    build: Callable[[dict[str, Any]], Aggregator]


def _adaptive(config: dict[str, Any]):
    """The adaptive weighting a config asks for; None for the fixed cut (and configs recorded before it)."""
    from fedq.coordinator.algorithms.aggregation import AdaptiveStaleness

    if config.get("staleness_bound", "fixed") == "fixed":
        return None
    return AdaptiveStaleness(
        config.get("damp_above", 2.0), config.get("max_update_weight", 1.0), parse_staleness(config["staleness"])
    )


def _fedasync(config: dict[str, Any]) -> Aggregator:
    from fedq.coordinator.algorithms.aggregation import FedAsync

    return FedAsync(config["mixing_rate"], parse_staleness(config["staleness"]), adaptive=_adaptive(config))


def _fedbuff(config: dict[str, Any]) -> Aggregator:
    from fedq.coordinator.algorithms.aggregation import FedBuff

    return FedBuff(
        config["buffer_size"],
        parse_staleness(config["staleness"]),
        example_weighted=config["example_weighted"],
        clip_norm=config.get("clip_norm", 0.0),
        robust=config.get("robust", "mean"),
        trim_fraction=config.get("trim_fraction", 0.1),
        adaptive=_adaptive(config),
    )


def _fedavg(config: dict[str, Any]) -> Aggregator:
    from fedq.coordinator.algorithms.aggregation import FedBuff

    # Synchronous FedAvg: every round's updates (tau = 0), example-weighted mean, one step.
    return FedBuff(config["concurrency"], parse_staleness(config["staleness"]), example_weighted=True)


ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        Algorithm("fedasync", synchronous=False, build=_fedasync),
        Algorithm("fedbuff", synchronous=False, build=_fedbuff),
        Algorithm("fedavg", synchronous=True, build=_fedavg),
    )
}


def algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}") from None
