"""Differential privacy of a job: its settings, and the privacy spent so far (epsilon for a delta).

Two places to add noise, one accountant:

- ``local``: every worker clips its delta to an L2 norm of ``clip`` and adds Gaussian noise of
  standard deviation ``noise_multiplier * clip`` before it sends anything (worker/encoding.py).
  Each update is then a Gaussian mechanism on that worker's data, whoever reads it; a worker
  that sent n updates has spent the epsilon of n such mechanisms, composed. The job reports
  the largest over its workers.
- ``central``: the coordinator clips every update to ``clip`` and adds the noise to each
  buffered server step (FedBuff style, DP-FedAvg of McMahan et al. 2018), with the standard
  deviation scaled to the most one worker contributes to the step
  (coordinator/algorithms/step.py). This protects what the coordinator releases (versions,
  exports) against everyone but the coordinator and readers of the history, which holds the
  updates themselves. Steps are composed as Poisson-subsampled Gaussian mechanisms with
  sampling rate ``buffer_size / population`` when the population of participants is given,
  which assumes that participants take part as if sampled at random; without it the rate
  is 1, which assumes nothing and is what this module does by default.

The accountant is Google's ``dp-accounting`` (the RDP accountant of Mironov 2017, as in
TensorFlow Privacy and Opacus), which is pure numpy/scipy and so loads without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

MODES = ("off", "local", "central")
ON_BUDGET = ("stop", "warn")
# Integer orders only: the fractional ones of the library's default make it log convergence
# warnings at small sampling rates, and integer orders are nearly as tight (Mironov et al. 2019).
_ORDERS = tuple(range(2, 257))


class PrivacyError(ValueError):
    """Settings that cannot give the privacy they name; one sentence."""


@dataclass(frozen=True)
class PrivacySettings:
    mode: str = "off"
    clip: float = 0.0  # L2 norm every update is clipped to
    noise_multiplier: float = 1.0  # noise standard deviation / clip
    delta: float = 1e-5
    epsilon_budget: float | None = None  # stop (or warn) before epsilon would exceed this
    on_budget: str = "stop"
    population: int | None = None  # central: how many participants the buffer samples from

    def __post_init__(self):
        if self.mode not in MODES:
            raise PrivacyError(f"unknown --dp {self.mode!r}; choose from {', '.join(MODES)}")
        if self.on_budget not in ON_BUDGET:
            raise PrivacyError(f"--dp-on-budget must be one of {', '.join(ON_BUDGET)}, not {self.on_budget!r}")
        if self.mode == "off":
            return
        if not self.clip > 0:
            raise PrivacyError(f"--dp {self.mode} needs --dp-clip, the L2 norm every update is clipped to (> 0)")
        if not self.noise_multiplier > 0:
            raise PrivacyError(f"--dp {self.mode} needs --dp-noise above 0: without noise nothing is private")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"--dp-delta must lie in (0, 1), not {self.delta}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise PrivacyError(f"--dp-epsilon must be above 0, not {self.epsilon_budget}")
        if self.population is not None and self.mode != "central":
            raise PrivacyError("--dp-population is for --dp central (local noise is accounted per worker)")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def sample_rate(self, buffer_size: int) -> float:
        """The chance that one participant's update is in a step: 1 without a population (always so
        with local DP, which accounts each worker's own updates)."""
        if self.population is None:
            return 1.0
        return min(1.0, buffer_size / self.population)

    def epsilon_after(self, steps: int, buffer_size: int) -> float:
        """Epsilon (for the job's delta) after ``steps`` noised steps (central) or updates of one
        worker (local, where the sampling rate is 1)."""
        return epsilon(self.noise_multiplier, self.sample_rate(buffer_size), steps, self.delta)

    def config(self) -> dict[str, object]:
        """What the aggregation config records (nothing when off: older configs stay as they were)."""
        if not self.enabled:
            return {}
        return {
            "dp": self.mode,
            "dp_clip": self.clip,
            "dp_noise": self.noise_multiplier,
            "dp_delta": self.delta,
            "dp_population": self.population,
            "dp_epsilon_budget": self.epsilon_budget,
        }


def summary(config: dict[str, Any] | None, epsilon_spent: float | None, steps: int | None) -> str | None:
    """One line on a version's privacy for status, show and report (None: the job has no DP)."""
    if not config or config.get("dp", "off") == "off":
        return None
    mode = config["dp"]
    over = f"{steps or 0} {'noised step' if mode == 'central' else 'update'}{'' if steps == 1 else 's'}"
    if mode == "local":
        over += " of the worker that sent most"
    line = f"{mode} DP, epsilon {epsilon_spent or 0.0:.3g} (delta {config['dp_delta']:g}) after {over}"
    line += f"; clip {config['dp_clip']:g}, noise multiplier {config['dp_noise']:g}"
    if config.get("dp_population"):
        line += f", sampling rate from a population of {config['dp_population']}"
    if config.get("dp_epsilon_budget") is not None:
        line += f"; budget {config['dp_epsilon_budget']:g}"
    return line


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon (for ``delta``) of ``steps`` Gaussian mechanisms of this noise multiplier,
    each applied to a Poisson sample of rate ``sample_rate`` (1: no subsampling)."""
    if steps <= 0:
        return 0.0
    from dp_accounting.rdp import rdp_privacy_accountant

    # Rényi DP composes by addition: ``steps`` steps cost ``steps`` times one step's RDP at every
    # order, so the costly part (the subsampled Gaussian's RDP, 0.1-0.3 s at a rate below 1) is
    # computed once per (noise, rate), not once per version.
    one_step = _rdp_of_one_step(float(noise_multiplier), float(sample_rate))
    value = float(rdp_privacy_accountant.compute_epsilon(_ORDERS, steps * one_step, float(delta))[0])
    return value if math.isfinite(value) else math.inf


@lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float):
    """The RDP, at each of ``_ORDERS``, of one (subsampled) Gaussian mechanism: the accountant's own."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(_ORDERS))
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant.compose(event, 1)
    return accountant.rdp
