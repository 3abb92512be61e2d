"""Server optimizers applied to the aggregated step (Reddi et al. 2021, "Adaptive Federated Optimization").

The aggregator's ``step`` is the averaged client delta; the pseudo-gradient is
g = -step. Every optimizer is a pure function of (weights, step, state) and
returns new weights and new state, so a version can be recomputed from its
parent, the parent's optimizer state and the logged updates.

- sgd:      x + lr * step                       (lr = 1 is plain FedAvg/FedBuff)
- momentum: m = beta1 m + step; x + lr m         (FedAvgM, Hsu et al. 2019)
- adam:     m = b1 m + (1-b1) step; v = b2 v + (1-b2) step^2; x + lr m / (sqrt v + eps)
- yogi:     as adam, v = v - (1-b2) step^2 sign(v - step^2)
- adagrad:  m as adam; v = v + step^2
Adaptive ones follow the paper: no bias correction, eps (its tau) = 1e-3, v_0 = eps^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedq.common.wire.codec import Weights
from fedq.coordinator.algorithms.aggregation import add_scaled
from fedq.coordinator.algorithms.registry import SERVER_OPTIMIZERS as OPTIMIZERS


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "sgd"
    learning_rate: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    epsilon: float = 1e-3

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; choose from {', '.join(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ValueError("server learning rate must be more than 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.epsilon > 0):
            raise ValueError("server optimizer needs 0 <= beta1, beta2 < 1 and epsilon > 0")

    @property
    def stateful(self) -> bool:
        return self.name != "sgd"

    def apply(self, weights: Weights, step: Weights, state: Weights) -> tuple[Weights, Weights]:
        """New weights and new state; neither input is modified."""
        new_weights: Weights = {}
        new_state: Weights = {}
        for name, x in weights.items():
            delta = step[name]
            if self.name == "sgd":
                direction = delta
            elif self.name == "momentum":
                momentum = self._state(state, f"m.{name}", x, 0.0) * np.float32(self.beta1)
                add_scaled(momentum, delta, 1.0)
                new_state[f"m.{name}"] = direction = momentum
            else:
                direction = self._adaptive(name, x, delta, state, new_state)
            updated = x.astype(np.float32, copy=True)
            add_scaled(updated, direction, self.learning_rate)
            new_weights[name] = updated
        return new_weights, new_state

    def _adaptive(self, name: str, x: np.ndarray, delta: np.ndarray, state: Weights, new_state: Weights) -> np.ndarray:
        momentum = self._state(state, f"m.{name}", x, 0.0) * np.float32(self.beta1)
        add_scaled(momentum, delta, 1.0 - self.beta1)
        variance = self._state(state, f"v.{name}", x, self.epsilon**2)
        squared = np.square(delta, dtype=np.float32)
        if self.name == "adam":
            variance *= np.float32(self.beta2)
            add_scaled(variance, squared, 1.0 - self.beta2)
        elif self.name == "yogi":
            add_scaled(variance, squared * np.sign(variance - squared), -(1.0 - self.beta2))
        else:  # adagrad
            add_scaled(variance, squared, 1.0)
        new_state[f"m.{name}"], new_state[f"v.{name}"] = momentum, variance
        return momentum / (np.sqrt(variance) + np.float32(self.epsilon))

    @staticmethod
    def _state(state: Weights, key: str, like: np.ndarray, initial: float) -> np.ndarray:
        if key in state:
            return state[key].astype(np.float32, copy=True)
        return np.full_like(like, initial, dtype=np.float32)
