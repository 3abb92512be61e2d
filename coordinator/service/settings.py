"""The coordinator's settings: everything a run depends on, checked when built."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedq.coordinator.algorithms.registry import Algorithm, algorithm


# Evaluations without improvement after which a run with a --target gives up on it: the
# README's 3-worker digits example plateaus at 0.947 against a target of 0.95 and, before this,
# never ended.
PLATEAU_WITH_TARGET = 100


@dataclass(frozen=True)
class CoordinatorSettings:
    job: str
    amqp_url: str
    redis_url: str
    task: str = "digits"
    task_params: dict[str, Any] = field(default_factory=dict)
    algorithm: str = "fedasync"
    concurrency: int = 4
    buffer_size: int = 3
    staleness: str = "polynomial:a=0.5"
    mixing_rate: float = 0.6
    max_staleness: int = 20
    example_weighted: bool = False
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_epsilon: float = 1e-3
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    target: float | None = None
    max_versions: int | None = None
    max_seconds: float | None = None
    eval_every: int = 1
    # Stop when the score has not improved by plateau_epsilon in this many evaluations.
    # None: PLATEAU_WITH_TARGET when a target is set (a run that cannot reach it still ends),
    # else never (runs bounded by time or versions, and long-lived jobs, go on). 0: never.
    plateau: int | None = None
    plateau_epsilon: float = 0.001
    seed: int = 0
    task_lease_seconds: float = 600.0
    clip_norm: float = 0.0
    robust: str = "mean"
    trim_fraction: float = 0.1
    norm_outlier_factor: float = 10.0
    # The history's two tiers (see coordinator/service/archiver.py): Redis keeps the last
    # hot_versions versions in full; older ones move to the archive, which keeps the weights of
    # every checkpoint_every-th version. archive "" is the local default, "none" keeps all in Redis.
    archive: str = ""
    hot_versions: int = 0  # 0: max_staleness + 2, every version a stale update may still be based on
    checkpoint_every: int = 50
    archive_seconds: float = 10.0
    redis_budget_mb: int = 2048
    # Accept updates only from enrolled, unrevoked identities even before any is enrolled
    # (otherwise the check starts with the job's first `fedq admin enroll`).
    require_identity: bool = False
    # How long the consumer waits for an update before its housekeeping, and how often an idle
    # coordinator looks for a head moved elsewhere or a rewritten description (tests shorten both).
    idle_seconds: float = 0.5
    head_check_seconds: float = 2.0

    def __post_init__(self):
        algorithm(self.algorithm)  # an unknown name raises here, with the choices
        if self.hot_versions and self.hot_versions <= self.max_staleness:
            raise ValueError(f"--hot-versions {self.hot_versions} must exceed --max-staleness {self.max_staleness}: "
                             "an update may be based on any version that recent, and its weights must be in Redis")

    @property
    def plateau_evaluations(self) -> int:
        """Evaluations without improvement that end the run (0: never)."""
        if self.plateau is not None:
            return self.plateau
        return PLATEAU_WITH_TARGET if self.target is not None else 0

    @property
    def hot_window(self) -> int:
        """Versions whose weights, records and blobs stay in Redis."""
        return self.hot_versions or self.max_staleness + 2

    @property
    def archive_url(self) -> str | None:
        """Where older history goes (None: nowhere, Redis keeps it all)."""
        from fedq.common.store.archive import default_archive_url, normalise_url

        if self.archive.lower() == "none":
            return None
        return normalise_url(self.archive or default_archive_url())

    @property
    def chosen_algorithm(self) -> Algorithm:
        return algorithm(self.algorithm)

    def aggregation_config(self) -> dict[str, Any]:
        """Everything the server step depends on; recorded with every version."""
        names = ("algorithm", "concurrency", "buffer_size", "staleness", "mixing_rate", "max_staleness",
                 "example_weighted", "clip_norm", "robust", "trim_fraction", "server_optimizer", "server_lr",
                 "server_beta1", "server_beta2", "server_epsilon")
        return {name: getattr(self, name) for name in names}
