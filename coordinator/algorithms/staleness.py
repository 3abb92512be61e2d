"""Staleness functions s(tau): how much an update computed tau versions ago still counts.

Every function gives s(0) = 1 and is non-increasing in tau. ``parse_staleness``
builds one from a spec such as ``"polynomial:a=0.5"`` or ``"hinge:a=10,b=4"``;
``normalise_at`` rescales any of them so that s(average) = 1.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass


def _finite_at_least_zero(value: float) -> bool:
    # Written so that NaN fails too (every comparison with NaN is False).
    return math.isfinite(value) and value >= 0


class StalenessFunction(ABC):
    @abstractmethod
    def __call__(self, staleness: float) -> float:
        """The weight of an update that is ``staleness`` versions old (staleness >= 0)."""

    def spec(self) -> str:
        """The text ``parse_staleness`` turns back into this function."""
        params = ",".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{self.name}:{params}" if params else self.name

    name = ""


@dataclass(frozen=True)
class Constant(StalenessFunction):
    name = "constant"

    def __call__(self, staleness: float) -> float:
        return 1.0


@dataclass(frozen=True)
class Polynomial(StalenessFunction):
    """(1 + tau)^-a (Xie et al. 2019); a = 0.5 is FedBuff's 1/sqrt(1 + tau)."""

    a: float = 0.5
    name = "polynomial"

    def __post_init__(self):
        if not _finite_at_least_zero(self.a):
            raise ValueError("polynomial staleness needs a finite a >= 0")

    def __call__(self, staleness: float) -> float:
        return (1.0 + staleness) ** -self.a


@dataclass(frozen=True)
class Hinge(StalenessFunction):
    """1 while tau <= b, then 1 / (a (tau - b) + 1) (Xie et al. 2019)."""

    a: float = 10.0
    b: float = 4.0
    name = "hinge"

    def __post_init__(self):
        if not (_finite_at_least_zero(self.a) and _finite_at_least_zero(self.b)):
            raise ValueError("hinge staleness needs finite a >= 0 and b >= 0")

    def __call__(self, staleness: float) -> float:
        return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)


@dataclass(frozen=True)
class Exponential(StalenessFunction):
    """exp(-a tau)."""

    a: float = 0.5
    name = "exponential"

    def __post_init__(self):
        if not _finite_at_least_zero(self.a):
            raise ValueError("exponential staleness needs a finite a >= 0")

    def __call__(self, staleness: float) -> float:
        return math.exp(-self.a * staleness)


@dataclass(frozen=True)
class Cutoff(StalenessFunction):
    """1 while tau <= limit, ``value`` beyond (0 <= value <= 1)."""

    limit: float = 4.0
    value: float = 0.0
    name = "cutoff"

    def __post_init__(self):
        if not (_finite_at_least_zero(self.limit) and 0 <= self.value <= 1):
            raise ValueError("cutoff staleness needs a finite limit >= 0 and 0 <= value <= 1")

    def __call__(self, staleness: float) -> float:
        return 1.0 if staleness <= self.limit else self.value


@dataclass(frozen=True)
class NormalisedAt(StalenessFunction):
    """``inner`` divided by inner(average), so an update of average staleness weighs 1."""

    inner: StalenessFunction
    average: float
    name = "normalised"

    def __post_init__(self):
        if not _finite_at_least_zero(self.average):
            raise ValueError(f"cannot normalise at average staleness {self.average}: it must be finite and >= 0")
        if self.inner(self.average) <= 0:
            raise ValueError(f"cannot normalise: s({self.average}) is 0")

    def __call__(self, staleness: float) -> float:
        return self.inner(staleness) / self.inner(self.average)

    def spec(self) -> str:
        return f"{self.inner.spec()}@{self.average!r}"


STALENESS_FUNCTIONS: dict[str, type[StalenessFunction]] = {
    cls.name: cls for cls in (Constant, Polynomial, Hinge, Exponential, Cutoff)
}


def parse_staleness(spec: str) -> StalenessFunction:
    """``name[:param=value,...][@average]``, e.g. ``polynomial:a=0.5`` or ``hinge:a=10,b=4@2``."""
    text, _, average = spec.strip().partition("@")
    name, _, params_text = text.partition(":")
    cls = STALENESS_FUNCTIONS.get(name.strip())
    if cls is None:
        raise ValueError(f"unknown staleness function {name!r}; choose from {', '.join(STALENESS_FUNCTIONS)}")
    params: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in params_text.split(","))):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"staleness parameter {item!r} must look like name=value")
        params[key.strip()] = float(value)
    try:
        function: StalenessFunction = cls(**params)
    except TypeError:
        names = list(inspect.signature(cls).parameters)
        raise ValueError(f"staleness function {name!r} takes parameters {names}") from None
    return NormalisedAt(function, float(average)) if average else function
