"""What ``compression.py`` runs: the tasks (and their budgets), the coordinator's settings and the arms."""

from __future__ import annotations

from dataclasses import dataclass

from bench.async_vs_sync_config import TASKS, TaskSpec

# FedBuff K=3 with the coordinator's default (adaptive) staleness bound: heterogeneous.py's
# "adaptive" arm. Central DP needs the fixed cut (its noise is calibrated to weights <= 1/K), so
# the DP runs and their non-DP baselines use it.
ALGORITHM = ("--algorithm", "fedbuff", "--buffer-size", "3")
DP_ALGORITHM = (*ALGORITHM, "--staleness-bound", "fixed")
HIDDEN_1M = 1262  # digits28's MLP 784-1262-10: 1,003,300 parameters (bench/downlink.py's model)


@dataclass(frozen=True)
class BenchTask:
    name: str
    spec: TaskSpec
    budget: float  # seconds of training per arm
    quick_budget: float
    concurrency: int = 10


DIGITS = TASKS["digits"]
BENCH_TASKS = {
    "digits": BenchTask("digits", DIGITS, budget=40.0, quick_budget=15.0),
    "synthetic": BenchTask("synthetic", TASKS["synthetic"], budget=40.0, quick_budget=15.0),
    # digits28 (the 8x8 digits upsampled to 28x28) with a 1262-wide hidden layer: a real learning
    # signal (~0.93 test accuracy after a few passes) at 1M parameters, 3.8 MiB a version.
    "1m": BenchTask(
        "1m",
        TaskSpec(
            "1m",
            "digits28",
            {"num_partitions": 10, "alpha": 0.5, "hidden": HIDDEN_1M},
            workers=10,
            target=0.90,
            training=DIGITS.training,
            preload=DIGITS.preload,
        ),
        budget=60.0,
        quick_budget=20.0,
    ),
}


@dataclass(frozen=True)
class Arm:
    name: str
    compression: str = "none"
    error_feedback: bool | None = None  # None: lossless, the flag is not given
    downlink: str | None = None  # None: the coordinator's default (auto)

    @property
    def flags(self) -> list[str]:
        flags = ["--compression", self.compression]
        if self.error_feedback is not None:
            flags += ["--error-feedback", "true" if self.error_feedback else "false"]
        if self.downlink is not None:
            flags += ["--downlink", self.downlink]
        return flags

    @property
    def method(self) -> str:
        return self.name.rsplit("-", 1)[0] if self.error_feedback is not None else self.name


LOSSY = {
    "fp16": "fp16",
    "bf16": "bf16",
    "int8": "int8",  # blocks of 256 values per scale (the default)
    "topk1": "topk:fraction=0.01",
    "topk10": "topk:fraction=0.1",
    "prune10": "prune:fraction=0.1",
}
ARMS = {"none": Arm("none")}
for _method, _spec in LOSSY.items():
    ARMS[f"{_method}-ef"] = Arm(f"{_method}-ef", _spec, True)
    ARMS[f"{_method}-noef"] = Arm(f"{_method}-noef", _spec, False)
# Uncompressed, with diffs stored after every version (--downlink auto stores them only for topk
# and prune): what dense steps' diffs save a worker in practice.
ARMS["none-diffs"] = Arm("none-diffs", downlink="diffs")
COMPRESSION_ARMS = tuple(name for name in ARMS if name != "none-diffs")
DEFAULT_ARMS = {
    "digits": (*COMPRESSION_ARMS, "none-diffs"),
    "synthetic": COMPRESSION_ARMS,
    # Trimmed for time: error feedback on for every method, off only where it matters most.
    "1m": (
        "none",
        "fp16-ef",
        "bf16-ef",
        "int8-ef",
        "int8-noef",
        "topk1-ef",
        "topk1-noef",
        "topk10-ef",
        "prune10-ef",
        "none-diffs",
    ),
}
QUICK_ARMS = {"digits": ("none", "int8-ef", "topk1-ef", "topk1-noef"), "1m": ("none", "topk1-ef")}
