"""The coordinator's settings: everything a run depends on, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedq.common.privacy import PrivacySettings
from fedq.common.wire.compression import Compression
from fedq.coordinator.algorithms.registry import STALENESS_BOUNDS, Algorithm, algorithm

# Evaluations without improvement after which a run with a --target gives up on it: the
# README's 3-worker digits example plateaus at 0.947 against a target of 0.95 and, before this,
# never ended.
PLATEAU_WITH_TARGET = 100
# --task-seconds auto: tasks sized by the fleet's measured speed.
AUTO = "auto"
DOWNLINK_MODES = ("auto", "diffs", "full")
# The fixed cut's bound when --max-staleness is not given.
DEFAULT_MAX_STALENESS = 20


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
    # "fixed": reject updates staler than max_staleness, weigh the rest by the staleness function.
    # "adaptive": judge and weigh each update against the staleness its worker's measured speed
    # predicts (coordinator/service/fleet.py, algorithms/aggregation.py AdaptiveStaleness).
    staleness_bound: str = "adaptive"
    # A hard bound in versions. None: DEFAULT_MAX_STALENESS with the fixed cut, none when adaptive.
    max_staleness: int | None = None
    redis_wait_replicas: int = 0
    # Adaptive: refuse an update (1 + tau) more than this many times (1 + its worker's expected tau).
    staleness_tolerance: float = 8.0
    # Adaptive: shrink the server step when an update is more than this many times staler than expected.
    damp_above: float = 2.0
    # Adaptive: no single update weighs more than this (1: the server steps no further than the worker did).
    max_update_weight: float = 1.0
    # A hard bound in seconds from a task's issue to its update's arrival (None: the task lease's).
    max_age_seconds: float | None = None
    example_weighted: bool = False
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_epsilon: float = 1e-3
    local_epochs: int = 1
    # Device-sized tasks: a time budget each worker fills with as many local steps as fit (at
    # most local_epochs epochs). 0: every task is local_epochs epochs, however long that takes.
    # AUTO: what local_epochs take the median worker (measured; coordinator/service/fleet.py).
    task_seconds: float | str = 0.0
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
    # Synchronous rounds: close a round this many seconds after it started (None: wait for every
    # task) if at least min_updates updates came back (None: all of concurrency).
    round_seconds: float | None = None
    min_updates: int | None = None
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
    # Bandwidth (common/wire/compression.py): how workers encode their updates, and whether each
    # keeps what its encoding dropped for its next update (error feedback, worker/encoding.py).
    compression: str = "none"
    error_feedback: bool = True
    # Downlink (worker/model_cache.py): store the exact diff from each version to the next, so that a
    # worker holding the previous version reads that instead of the whole model. "auto": when the
    # compression is sparse (topk, prune), which changes a fraction of the model per version; a
    # dense step's diff is about half the model (bench/downlink.py), which pays only one version
    # behind, and costs the coordinator a diff per commit. "diffs": always; "full": never.
    downlink: str = "auto"
    # Differential privacy (common/privacy.py): off, local (workers add the noise) or central (the
    # coordinator adds it to each FedBuff step).
    dp: str = "off"
    dp_clip: float = 0.0
    dp_noise: float = 1.0
    dp_delta: float = 1e-5
    dp_epsilon: float | None = None
    dp_on_budget: str = "stop"
    dp_population: int | None = None

    def __post_init__(self):
        algorithm(self.algorithm)  # an unknown name raises here, with the choices
        Compression.parse(self.compression)  # an unknown method or parameter raises here
        if self.downlink not in DOWNLINK_MODES:
            raise ValueError(f"unknown --downlink {self.downlink!r}; choose from {', '.join(DOWNLINK_MODES)}")
        privacy = self.privacy  # and so do privacy settings that promise nothing
        if privacy.mode == "central":
            self._check_central_dp()
        if privacy.enabled and privacy.epsilon_budget is not None:
            first = privacy.epsilon_after(1, self.buffer_size)
            if first > privacy.epsilon_budget:
                raise ValueError(
                    f"--dp-epsilon {privacy.epsilon_budget:g} is spent by a single "
                    f"{'step' if privacy.mode == 'central' else 'update'} (epsilon {first:.3g} at --dp-noise "
                    f"{privacy.noise_multiplier:g}); raise the noise or the budget"
                )
        if self.staleness_bound not in STALENESS_BOUNDS:
            raise ValueError(
                f"unknown --staleness-bound {self.staleness_bound!r}; choose from {', '.join(STALENESS_BOUNDS)}"
            )
        if self.task_seconds != AUTO and not (isinstance(self.task_seconds, (int, float)) and self.task_seconds >= 0):
            raise ValueError(f"--task-seconds must be a number of seconds >= 0 or 'auto', not {self.task_seconds!r}")
        if self.min_updates is not None and not 1 <= self.min_updates <= self.concurrency:
            raise ValueError(f"--min-updates {self.min_updates} must be from 1 to --concurrency {self.concurrency}")
        if not self.max_update_weight > 0:
            raise ValueError("--max-update-weight must be above 0")
        if not (self.staleness_tolerance >= 1 and self.damp_above >= 1):
            raise ValueError(
                "--staleness-tolerance and --damp-above must be at least 1 (1: exactly as stale as expected)"
            )
        bound = self.version_bound
        if self.hot_versions and bound is not None and self.hot_versions <= bound:
            raise ValueError(
                f"--hot-versions {self.hot_versions} must exceed --max-staleness {bound}: "
                "an update may be based on any version that recent, and its weights must be in Redis"
            )

    def _check_central_dp(self) -> None:
        """Central noise is calibrated to what one update can move a FedBuff step: its clipped norm
        times its weight, at most 1/K with the fixed staleness weights (s(tau) <= 1)."""
        needs = []
        if self.algorithm != "fedbuff":
            needs.append("--algorithm fedbuff")
        if self.adaptive:
            needs.append("--staleness-bound fixed (adaptive weights may reach --max-update-weight)")
        if self.example_weighted:
            needs.append("no --example-weighted (an update's weight would follow its example count)")
        if self.robust != "mean":
            needs.append("--robust mean")
        if needs:
            raise ValueError(f"--dp central needs {', '.join(needs)}")
        if self.clip_norm and self.clip_norm != self.dp_clip:
            raise ValueError(
                f"--clip-norm {self.clip_norm:g} differs from --dp-clip {self.dp_clip:g}; give only --dp-clip"
            )

    @property
    def uplink(self) -> Compression:
        return Compression.parse(self.compression)

    @property
    def publishes_diffs(self) -> bool:
        return self.downlink == "diffs" or (self.downlink == "auto" and self.uplink.sparse)

    @property
    def privacy(self) -> PrivacySettings:
        return PrivacySettings(
            mode=self.dp,
            clip=self.dp_clip,
            noise_multiplier=self.dp_noise,
            delta=self.dp_delta,
            epsilon_budget=self.dp_epsilon,
            on_budget=self.dp_on_budget,
            population=self.dp_population,
        )

    @property
    def adaptive(self) -> bool:
        return self.staleness_bound == "adaptive"

    @property
    def version_bound(self) -> int | None:
        """The hard bound on staleness in versions (None: none)."""
        if self.max_staleness is not None:
            return self.max_staleness
        return None if self.adaptive else DEFAULT_MAX_STALENESS

    @property
    def plateau_evaluations(self) -> int:
        """Evaluations without improvement that end the run (0: never)."""
        if self.plateau is not None:
            return self.plateau
        return PLATEAU_WITH_TARGET if self.target is not None else 0

    @property
    def hot_window(self) -> int:
        """Versions whose weights, records and blobs stay in Redis."""
        # Adaptive staleness without a bound still keeps DEFAULT_MAX_STALENESS + 2 versions: a task is
        # issued at the head and read at once, so only FedAsync's base versions need older ones.
        return self.hot_versions or (self.version_bound or DEFAULT_MAX_STALENESS) + 2

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
        names = (
            "algorithm",
            "concurrency",
            "buffer_size",
            "staleness",
            "mixing_rate",
            "example_weighted",
            "clip_norm",
            "robust",
            "trim_fraction",
            "server_optimizer",
            "server_lr",
            "server_beta1",
            "server_beta2",
            "server_epsilon",
            "staleness_bound",
            "damp_above",
            "max_update_weight",
        )
        config = {name: getattr(self, name) for name in names} | {"max_staleness": self.version_bound}
        if self.dp == "central":
            config["clip_norm"] = self.dp_clip  # the aggregator clips each update to what the noise is scaled to
        # Recorded only when used, so that a job without them keeps the config (and digest) it had.
        if self.uplink.lossy:
            config |= {"compression": self.uplink.spec, "error_feedback": self.error_feedback}
        return config | self.privacy.config()
