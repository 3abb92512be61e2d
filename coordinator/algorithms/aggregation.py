"""Aggregation rules as pure functions of (global weights, ordered buffered updates).

Each aggregator turns a buffer of updates into one *server step* ``step`` such
that the plain server optimizer yields ``x + step``; adaptive server optimizers
(FedAdam, ...) treat ``-step`` as the pseudo-gradient. The result depends only
on its inputs (fixed float32 operation order), which replay relies on.

Notation: x is the current global model, x_base the version an update started
from, delta = x_local - x_base the update, tau its staleness.
"""

from __future__ import annotations

import statistics
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedq.common.tensors import clip_by_norm
from fedq.common.wire.codec import Weights
from fedq.coordinator.algorithms.registry import ROBUST_ESTIMATORS

__all__ = ["AdaptiveStaleness", "Aggregator", "BufferedUpdate", "FedAsync", "FedBuff", "clip_by_norm"]
from fedq.coordinator.algorithms.staleness import Polynomial, StalenessFunction


@dataclass(frozen=True)
class BufferedUpdate:
    task_id: str
    worker_id: str
    base_version: int
    staleness: int
    num_examples: int
    delta: Weights
    # What adaptive weighting needs, measured by the coordinator (coordinator/service/fleet.py) and
    # recorded with the update so that a replay weighs it the same: the staleness its worker's
    # speed predicts, its worker's share of the examples of the active workers, and how many
    # versions pass between two updates of its worker. None: not measured.
    expected_staleness: float | None = None
    data_share: float | None = None
    update_interval: float | None = None
    local_steps: int = 0  # minibatch steps its worker took (0: not reported)


# An expected staleness below this counts as this (a worker faster than the version rate).
MIN_EXPECTED_STALENESS = 0.05


@dataclass(frozen=True)
class AdaptiveStaleness:
    """Weights that follow each worker's measured speed instead of cutting slow workers off.

    *Fairness* (in the spirit of FedStaleWeight, Ma et al. 2024, which reweighs buffered
    updates by their clients' average staleness, a proxy for how rarely they send): a worker
    whose updates arrive every D_i seconds sends one every u_i = r D_i versions (r: versions per
    second), so weighing each of its updates by w_i = d_i u_i, d_i its share of the active
    workers' examples, gives it d_i of the weight per version on average: each worker's
    influence follows its data, not its speed. In a fleet of equal workers this is FedBuff's
    1/K (u = N/K, d = 1/N), and FedAsync's alpha with K = 1, whatever the concurrency. (The
    interval, not the round trip: with more tasks in flight than workers, tasks wait in the
    queue, and a round trip counts that wait too.) No single update weighs more than
    ``max_weight`` (1: the server never steps further than the worker did), which also bounds
    a worker that overstates its example count.

    *Step size.* Fair weights sum to about 1 per version, a FedAvg step made of stale deltas;
    with few workers and many tasks in flight that overshot and diverged (two workers, six
    tasks, K=2: accuracy fell to 0.2). So the staleness function still sets the size of the
    step, evaluated at the buffer's median staleness: every update of the buffer gets the same
    s(median tau), which shrinks the step as FedBuff's does without singling out the slow
    (FedAsync, one update per step, keeps its own s(tau)).

    *Work done* (FedNova, Wang et al. NeurIPS 2020): with device-sized tasks the updates of one
    buffer took different numbers of local steps t_i, and a plain weighted sum would pull the
    model towards the objectives of the workers that took more. When every update reports its
    steps, each is normalised to the buffer's weighted mean steps: w_i <- w_i t_bar / t_i,
    t_bar = sum_j w_j t_j / sum_j w_j (FedNova's d_i = delta_i / t_i scaled by tau_eff).

    *Damping* (after FADAS, Wang et al. ICML 2024, which scales the server step by
    tau_c / tau_max once the buffer's largest staleness passes a threshold tau_c): here the
    threshold is per worker, ``damp_above`` times its expected staleness. A slow worker's
    normal updates never shrink the step, which FADAS's fleet-wide threshold would (starving
    it again); an update much staler than its own worker's norm (a stalled worker, a
    backlog) shrinks the whole step by how far it exceeds that.

    Both are pure functions of the recorded updates, so replay recomputes them.
    """

    damp_above: float = 2.0
    max_weight: float = 1.0
    staleness: StalenessFunction = Polynomial(0.5)

    def __post_init__(self):
        if not self.damp_above >= 1:
            raise ValueError("damp_above must be at least 1")
        if not self.max_weight > 0:
            raise ValueError("max_weight must be above 0")

    @staticmethod
    def expected(update: BufferedUpdate) -> float:
        # Not measured yet (a worker's first update): as stale as it is, neither boosted nor damped.
        if update.expected_staleness is None:
            return max(float(update.staleness), 1.0)
        return max(update.expected_staleness, MIN_EXPECTED_STALENESS)

    def surprise(self, update: BufferedUpdate) -> float:
        """How many times staler than its worker's norm the update is: (1 + tau) / (1 + tau_hat)."""
        return (1.0 + update.staleness) / (1.0 + self.expected(update))

    def damping(self, updates: Sequence[BufferedUpdate]) -> float:
        worst = max(self.surprise(update) for update in updates)
        return 1.0 if worst <= self.damp_above else self.damp_above / worst

    def fair_weight(self, update: BufferedUpdate, buffered: int) -> float:
        """d_i u_i, at most max_weight. FedBuff's 1/K for an update whose worker's interval is not
        measured yet (its first updates: early in a job the data shares of the few workers seen
        are inflated, and the first run of a fair rule with them tripled the steps and set the
        model back) or that has no data share (a record from before shares were measured)."""
        if update.data_share is None or update.update_interval is None:
            return 1.0 / buffered
        return min(self.max_weight, update.data_share * max(update.update_interval, MIN_EXPECTED_STALENESS))

    def weights(self, updates: Sequence[BufferedUpdate]) -> list[float]:
        step_size = self.staleness(statistics.median(update.staleness for update in updates))
        weights = [self.fair_weight(update, len(updates)) * step_size for update in updates]
        if all(update.local_steps > 0 for update in updates) and sum(weights) > 0:
            mean_steps = sum(weight * update.local_steps for weight, update in zip(weights, updates)) / sum(weights)
            weights = [
                min(self.max_weight * step_size, weight * mean_steps / update.local_steps)
                for weight, update in zip(weights, updates)
            ]
        damping = self.damping(updates)
        return [weight * damping for weight in weights]


def _readable_tensor(array: np.ndarray) -> torch.Tensor:
    if array.flags.writeable:
        return torch.from_numpy(array)
    # Versions are cached as read-only arrays; torch warns when it wraps one, though
    # the addend is only ever read. Silenced here, not process-wide.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def add_scaled(accumulator: np.ndarray, addend: np.ndarray, scale: float) -> None:
    """accumulator += scale * addend, in place, without numpy's temporary (torch's fused add_)."""
    torch.from_numpy(accumulator).add_(_readable_tensor(np.ascontiguousarray(addend)), alpha=scale)


def zeros_like(weights: Weights) -> Weights:
    return {name: np.zeros_like(array) for name, array in weights.items()}


class Aggregator(ABC):
    buffer_size: int
    name = ""

    @abstractmethod
    def weights(self, updates: Sequence[BufferedUpdate]) -> list[float]:
        """The weight each update gets in the step (recorded in the history)."""

    @abstractmethod
    def step(
        self,
        current: Weights,
        updates: Sequence[BufferedUpdate],
        base_weights: Callable[[int], Weights],
        weights: Sequence[float] | None = None,
    ) -> Weights:
        """The server step for ``updates``; ``base_weights(v)`` returns version v.

        ``weights`` are ``self.weights(updates)`` when the caller already has them
        (the server step records them), so they are computed once.
        """


class FedAsync(Aggregator):
    """Xie, Koyejo, Gupta 2019: x <- (1 - alpha_t) x + alpha_t x_new, alpha_t = alpha s(tau).

    x_new = x_base + delta is the worker's locally trained model. Each update is
    mixed in once with its own alpha_t; the rate never compounds across updates.
    """

    name = "fedasync"

    def __init__(
        self,
        mixing_rate: float = 0.6,
        staleness: StalenessFunction | None = None,
        adaptive: AdaptiveStaleness | None = None,
    ):
        if not 0 < mixing_rate <= 1:
            raise ValueError("FedAsync needs 0 < mixing_rate <= 1")
        self.mixing_rate = mixing_rate
        self.staleness = staleness or Polynomial(0.5)
        self.adaptive = adaptive
        self.buffer_size = 1

    def weights(self, updates: Sequence[BufferedUpdate]) -> list[float]:
        if self.adaptive is not None:
            return [self.mixing_rate * weight for weight in self.adaptive.weights(updates)]
        return [self.mixing_rate * self.staleness(update.staleness) for update in updates]

    def step(
        self,
        current: Weights,
        updates: Sequence[BufferedUpdate],
        base_weights: Callable[[int], Weights],
        weights: Sequence[float] | None = None,
    ) -> Weights:
        if len(updates) != 1:
            raise ValueError("FedAsync applies exactly one update per step")
        (update,), (alpha,) = updates, self.weights(updates) if weights is None else weights
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

    Robust options: ``clip_norm`` first scales each delta down to at most that
    L2 norm; ``robust`` = ``median`` or ``trimmed_mean`` replaces the weighted
    mean by a coordinate-wise median / trimmed mean of the deltas, scaled by
    sum_i p_i s(tau_i) so that staleness still shrinks the step (with fresh
    updates that factor is 1). ``trim_fraction`` of the deltas is dropped at
    each end per coordinate.

    ``adaptive`` (:class:`AdaptiveStaleness`) replaces p_i s(tau_i) by d_i tau_hat_i (each
    worker's data share per version it spans), times the damping.
    """

    name = "fedbuff"

    def __init__(
        self,
        buffer_size: int = 3,
        staleness: StalenessFunction | None = None,
        example_weighted: bool = False,
        renormalise: bool = False,
        clip_norm: float = 0.0,
        robust: str = "mean",
        trim_fraction: float = 0.1,
        adaptive: AdaptiveStaleness | None = None,
    ):
        if buffer_size < 1:
            raise ValueError("FedBuff needs buffer_size >= 1")
        if robust not in ROBUST_ESTIMATORS:
            raise ValueError(f"unknown robust estimator {robust!r}; choose from {', '.join(ROBUST_ESTIMATORS)}")
        if not clip_norm >= 0:
            raise ValueError("clip_norm must be 0 (off) or more")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        self.buffer_size = buffer_size
        self.staleness = staleness or Polynomial(0.5)
        self.example_weighted = example_weighted
        self.renormalise = renormalise
        self.clip_norm = clip_norm
        self.robust = robust
        self.trim_fraction = trim_fraction
        self.adaptive = adaptive

    def weights(self, updates: Sequence[BufferedUpdate]) -> list[float]:
        if self.adaptive is not None:
            return self.adaptive.weights(updates)
        if self.example_weighted:
            total = sum(update.num_examples for update in updates)
            shares = [update.num_examples / total for update in updates]
        else:
            shares = [1.0 / len(updates)] * len(updates)
        weights = [share * self.staleness(update.staleness) for share, update in zip(shares, updates)]
        total_weight = sum(weights)
        if self.renormalise and total_weight > 0:  # all-zero weights (e.g. a cutoff): a zero step
            weights = [weight / total_weight for weight in weights]
        return weights

    def step(
        self,
        current: Weights,
        updates: Sequence[BufferedUpdate],
        base_weights: Callable[[int], Weights],
        weights: Sequence[float] | None = None,
    ) -> Weights:
        if not updates:
            raise ValueError("FedBuff needs at least one update")
        deltas = [clip_by_norm(update.delta, self.clip_norm) if self.clip_norm else update.delta for update in updates]
        weights = self.weights(updates) if weights is None else weights
        if self.robust != "mean":
            return self._robust_step(current, deltas, sum(weights))
        step = zeros_like(current)
        for delta, weight in zip(deltas, weights):
            for name, accumulator in step.items():
                add_scaled(accumulator, delta[name], weight)
        return step

    def _robust_step(self, current: Weights, deltas: list[Weights], scale: float) -> Weights:
        step = {}
        trim = int(self.trim_fraction * len(deltas))
        for name in current:
            stacked = np.stack([delta[name] for delta in deltas])
            if self.robust == "median":
                center = np.median(stacked, axis=0)
            else:
                ordered = np.sort(stacked, axis=0)
                center = ordered[trim : len(deltas) - trim].mean(axis=0)
            step[name] = (center * scale).astype(np.float32)
        return step
