"""Aggregation rules as pure functions of (global weights, ordered buffered updates).

Each aggregator turns a buffer of updates into one *server step* ``step`` such
that the plain server optimizer yields ``x + step``; adaptive server optimizers
(FedAdam, ...) treat ``-step`` as the pseudo-gradient. The result depends only
on its inputs (fixed float32 operation order), which replay relies on.

Notation: x is the current global model, x_base the version an update started
from, delta = x_local - x_base the update, tau its staleness.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import warnings

import numpy as np
import torch

from common.codec import Weights
from coordinator.staleness import Polynomial, StalenessFunction

# One thread: on two cores shared with workers and servers, a second torch
# thread costs far more than it gains (DESIGN.md measured 1.2-400x).
torch.set_num_threads(1)
# Versions are cached as read-only arrays; torch warns when it wraps one, though
# add_scaled only ever reads its addend.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class BufferedUpdate:
    task_id: str
    worker_id: str
    base_version: int
    staleness: int
    num_examples: int
    delta: Weights


def add_scaled(accumulator: np.ndarray, addend: np.ndarray, scale: float) -> None:
    """accumulator += scale * addend, in place, without numpy's temporary (torch's fused add_)."""
    torch.from_numpy(accumulator).add_(torch.from_numpy(np.ascontiguousarray(addend)), alpha=scale)


def zeros_like(weights: Weights) -> Weights:
    return {name: np.zeros_like(array) for name, array in weights.items()}


class Aggregator(ABC):
    buffer_size: int
    name = ""

    @abstractmethod
    def weights(self, updates: Sequence[BufferedUpdate]) -> list[float]:
        """The weight each update gets in the step (recorded in the history)."""

    @abstractmethod
    def step(self, current: Weights, updates: Sequence[BufferedUpdate],
             base_weights: Callable[[int], Weights]) -> Weights:
        """The server step for ``updates``; ``base_weights(v)`` returns version v."""


class FedAsync(Aggregator):
    """Xie, Koyejo, Gupta 2019: x <- (1 - alpha_t) x + alpha_t x_new, alpha_t = alpha s(tau).

    x_new = x_base + delta is the worker's locally trained model. Each update is
    mixed in once with its own alpha_t; the rate never compounds across updates.
    """

    name = "fedasync"

    def __init__(self, mixing_rate: float = 0.6, staleness: StalenessFunction | None = None):
        if not 0 < mixing_rate <= 1:
            raise ValueError("FedAsync needs 0 < mixing_rate <= 1")
        self.mixing_rate = mixing_rate
        self.staleness = staleness or Polynomial(0.5)
        self.buffer_size = 1

    def weights(self, updates: Sequence[BufferedUpdate]) -> list[float]:
        return [self.mixing_rate * self.staleness(update.staleness) for update in updates]

    def step(self, current: Weights, updates: Sequence[BufferedUpdate],
             base_weights: Callable[[int], Weights]) -> Weights:
        if len(updates) != 1:
            raise ValueError("FedAsync applies exactly one update per step")
        (update,), (alpha,) = updates, self.weights(updates)
        base = base_weights(update.base_version)
        step = {}
        for name, x in current.items():
            # alpha (x_base + delta - x): the mix written as a step from x
            difference = base[name].astype(np.float32, copy=True)
            add_scaled(difference, update.delta[name], 1.0)
            add_scaled(difference, x, -1.0)
            difference *= np.float32(alpha)
            step[name] = difference
        return step


class FedBuff(Aggregator):
    """Nguyen et al. 2022: a buffer of K deltas applied as one server step.

    step = sum_i p_i s(tau_i) delta_i, where p_i = 1/K (the paper) or, with
    ``example_weighted``, n_i / sum_j n_j (FedAvg's weighting). Staleness
    weights are *not* renormalised by default: stale buffers take smaller steps,
    as in the paper; ``renormalise`` divides by sum_i p_i s(tau_i) instead.
    With K = concurrency, a dispatch barrier (tau = 0) and example weighting
    this is exactly synchronous FedAvg.
    """

    name = "fedbuff"

    def __init__(self, buffer_size: int = 3, staleness: StalenessFunction | None = None,
                 example_weighted: bool = False, renormalise: bool = False):
        if buffer_size < 1:
            raise ValueError("FedBuff needs buffer_size >= 1")
        self.buffer_size = buffer_size
        self.staleness = staleness or Polynomial(0.5)
        self.example_weighted = example_weighted
        self.renormalise = renormalise

    def weights(self, updates: Sequence[BufferedUpdate]) -> list[float]:
        if self.example_weighted:
            total = sum(update.num_examples for update in updates)
            shares = [update.num_examples / total for update in updates]
        else:
            shares = [1.0 / len(updates)] * len(updates)
        weights = [share * self.staleness(update.staleness) for share, update in zip(shares, updates)]
        if self.renormalise:
            total_weight = sum(weights)
            weights = [weight / total_weight for weight in weights]
        return weights

    def step(self, current: Weights, updates: Sequence[BufferedUpdate],
             base_weights: Callable[[int], Weights]) -> Weights:
        if not updates:
            raise ValueError("FedBuff needs at least one update")
        step = zeros_like(current)
        for update, weight in zip(updates, self.weights(updates)):
            for name, accumulator in step.items():
                add_scaled(accumulator, update.delta[name], weight)
        return step
