"""What ``async_vs_sync.py`` compares: the arms, the tasks, and the heterogeneity cases (per-worker slowdowns)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# FedAdam's server learning rate, chosen before any run and not tuned: adaptive
# server optimizers move each coordinate by at most about server_lr per step
# (|m / sqrt(v)| <~ 1), and one client's delta after the first local training
# measures 0.005-0.015 per coordinate on average on both tasks, so 0.01 makes a
# FedAdam step about as large as a plain FedBuff step. It is the lower end of
# the 0.01-0.05 range suggested for this benchmark.
FEDADAM_SERVER_LR = 0.01
STALENESS = "polynomial:a=0.5"
# The arms compare staleness functions under the fixed cut, as when docs/async-vs-sync.md was
# measured; bench/heterogeneous.py compares it with adaptive staleness.
FIXED = ("--staleness-bound", "fixed")

ARMS: dict[str, list[str]] = {
    "fedavg": ["--algorithm", "fedavg"],
    "fedasync": ["--algorithm", "fedasync", "--staleness", STALENESS, *FIXED],
    "fedbuff3": ["--algorithm", "fedbuff", "--buffer-size", "3", "--staleness", STALENESS, *FIXED],
    "fedbuff5": ["--algorithm", "fedbuff", "--buffer-size", "5", "--staleness", STALENESS, *FIXED],
    "fedadam3": [
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "3",
        "--staleness",
        STALENESS,
        *FIXED,
        "--server-optimizer",
        "adam",
        "--server-lr",
        str(FEDADAM_SERVER_LR),
    ],
    # Control, not run by default: sync FedAvg is always example-weighted (coordinator/step.py),
    # the FedBuff arms weight the buffer uniformly (1/K); this separates weighting from asynchrony.
    "fedbuff3ew": [
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "3",
        "--staleness",
        STALENESS,
        *FIXED,
        "--example-weighted",
        "true",
    ],
}
DEFAULT_ARMS = ("fedavg", "fedasync", "fedbuff3", "fedbuff5", "fedadam3")
ARM_LABELS = {
    "fedavg": "sync FedAvg",
    "fedasync": "FedAsync (a=0.6, poly 0.5)",
    "fedbuff3": "FedBuff K=3",
    "fedbuff5": "FedBuff K=5",
    "fedadam3": f"FedBuff K=3 + FedAdam (lr {FEDADAM_SERVER_LR})",
    "fedbuff3ew": "FedBuff K=3, example-weighted",
}
ARM_COLOURS = {
    "fedavg": "black",
    "fedasync": "tab:orange",
    "fedbuff3": "tab:blue",
    "fedbuff5": "tab:green",
    "fedadam3": "tab:red",
    "fedbuff3ew": "tab:purple",
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    task: str
    params: dict[str, Any]
    workers: int  # worker processes, worker i trains on partition i
    target: float
    training: tuple[str, ...]
    preload: tuple[str, ...] = ()  # modules the task imports on a worker's first task


TASKS = {
    # The demo's local training settings (coordinator/demo.py DEMO_TRAINING).
    "digits": TaskSpec(
        "digits",
        "digits",
        {"num_partitions": 10, "alpha": 0.5},
        workers=10,
        target=0.90,
        training=("--local-epochs", "2", "--learning-rate", "0.1", "--batch-size", "16"),
        preload=("fedq.common.tasks.digits", "sklearn.datasets"),
    ),
    # One worker process per device (30 processes, ~250 MB each); concurrency 10
    # means 10 of the 30 devices train at any time, as in FedAvg's client
    # sampling. Local learning rate 0.01 (FedProx's, for this data set): 0.1
    # makes synchronous FedAvg's test loss oscillate. Target: see docs/async-vs-sync.md.
    "synthetic": TaskSpec(
        "synthetic",
        "synthetic",
        {"alpha": 1, "beta": 1, "num_partitions": 30},
        workers=30,
        target=0.60,
        training=("--local-epochs", "2", "--learning-rate", "0.01", "--batch-size", "16"),
        preload=("fedq.common.tasks.synthetic",),
    ),
}
CASES = ("lognormal", "stragglers")
# The coordinator's --max-seconds clock starts before it evaluates and commits
# version 0 (loading the test set: ~2.5 s for digits). It runs this much longer
# than the budget, and every figure is read at <= budget seconds after version 0.
COORDINATOR_SLACK = 8.0
# Async curves are noisy: besides the first version at the target, report the first time
# from which the accuracy stays at or above it for this long.
SUSTAIN_SECONDS = 5.0
LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA = 0.5, 1.0
STRAGGLER_BASE, STRAGGLER_EXTRA, STRAGGLER_FRACTION = 0.2, 2.0, 0.3


def slowdowns(case: str, workers: int, seed: int) -> tuple[list[float], list[int]]:
    """Per-worker extra seconds per task, and the indices of the designated slow workers."""
    rng = np.random.default_rng([seed, workers, CASES.index(case)])
    if case == "lognormal":
        delays = rng.lognormal(math.log(LOGNORMAL_MEDIAN), LOGNORMAL_SIGMA, workers)
        slow = sorted(int(i) for i in np.argsort(delays)[-max(1, round(STRAGGLER_FRACTION * workers)) :])
        return [round(float(d), 3) for d in delays], slow
    slow = sorted(int(i) for i in rng.choice(workers, size=round(STRAGGLER_FRACTION * workers), replace=False))
    return [STRAGGLER_BASE + (STRAGGLER_EXTRA if i in slow else 0.0) for i in range(workers)], slow
