"""One real run of ``compression.py`` (``run_arm``), and the figures and CSV rows of a run.

A run is a fresh job: ``fedq worker`` processes forked from the harness's zygote, then a
coordinator with the arm's flags for ``budget`` seconds (plus ``COORDINATOR_SLACK``). Before the
job is deleted, its history (accuracy curve, applied updates and their norms, privacy spent) and
the weights of the versions still in Redis (for the downlink diff chains) are read back; every
worker's ``event=task_done`` lines give the bytes it sent and read.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.async_vs_sync_config import COORDINATOR_SLACK, TaskSpec
from bench.async_vs_sync_results import RunResult
from bench.compression_config import ARMS, BenchTask
from bench.harness import (
    CLOCK_TICKS,
    cleanup,
    cpu_seconds,
    fedq_command,
    launch_workers,
    machine_busy,
    start,
    stop_all,
    wait_exit,
    wait_ready,
)
from fedq.common.store import ModelStore
from fedq.common.store.tiers import whole_history
from fedq.common.wire.downlink import make_diff

BEHIND = (1, 3, 10)  # the stale workers of the downlink table, in versions
DP_FIELDS = ("mode", "clip", "noise", "population", "sample_rate", "planned_steps")


# -- one run -------------------------------------------------------------------


@dataclass
class ArmResult:
    task: str
    arm: str
    group: str  # "compression" or "dp"
    flags: list[str]
    run: RunResult
    sent_bytes: list[int] = field(default_factory=list)  # per task done, every worker
    reads: list[tuple[str, int]] = field(default_factory=list)  # (read_as, read_bytes) per task done
    norms: list[float] = field(default_factory=list)  # L2 norms of the applied updates (as decoded)
    updates_in_budget: Counter[str] = field(default_factory=Counter)  # worker -> applied within the budget
    versions_in_budget: int = 0
    full_bytes: int = 0  # the head's stored weights (safetensors)
    diff_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # v -> (make_diff(v-1, v), stored)
    epsilon: float | None = None  # at the last version within the budget
    dp_steps: int | None = None
    epsilon_final: float | None = None  # at the run's last version
    dp_settings: dict[str, object] = field(default_factory=dict)  # DP_FIELDS of a DP run
    load_before: float | None = None  # cores busy on the machine just before the run


def _task_done_fields(log: Path) -> list[dict[str, str]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if "event=task_done " in line:
            lines.append({key: value.strip("'\"") for key, value in re.findall(r"(\w+)=(\S+)", line)})
    return lines


def run_arm(
    bench: BenchTask,
    arm: str,
    flags: list[str],
    *,
    budget: float,
    seed: int,
    amqp_url: str,
    redis_url: str,
    log_root: Path,
    group: str = "compression",
    spec: TaskSpec | None = None,
    measure_diffs: bool = True,
) -> ArmResult:
    """One run of ``flags`` (the coordinator's, besides task, concurrency and budget) on ``spec``
    (default: the bench task's), worker i on partition i."""
    spec = spec or bench.spec
    job = f"cmp-{spec.name}-{arm}-{uuid.uuid4().hex[:6]}"
    log_dir = log_root / job
    log_dir.mkdir(parents=True)
    store = ModelStore.open(redis_url, job)
    cleanup(job, amqp_url, redis_url)
    run = RunResult(spec.name, group, arm, job, spec.target, budget, bench.concurrency, spec.workers)
    result = ArmResult(bench.name, arm, group, list(flags), run)
    connection = ["--job", job, "--amqp-url", amqp_url, "--redis-url", redis_url]
    worker_logs = [log_dir / f"worker-{index}.log" for index in range(spec.workers)]
    try:
        started = time.monotonic()
        argvs = [
            ["worker", *connection, "--worker-id", f"{job}-w-{index}", "--partition", str(index)]
            + ["--state-dir", str(log_dir / "state")]  # error-feedback residuals: not in ~/.local/state
            for index in range(spec.workers)
        ]
        workers = launch_workers("fork", spec.preload, argvs, worker_logs, log_dir)
        wait_ready(worker_logs, workers, timeout=300)
        run.startup_seconds = time.monotonic() - started
        busy0, total0 = machine_busy()
        coordinator_log = log_dir / "coordinator.log"
        command = fedq_command(
            "coordinator",
            *connection,
            "--task",
            spec.task,
            "--task-params",
            json.dumps(spec.params),
            *flags,
            "--concurrency",
            str(bench.concurrency),
            "--max-seconds",
            str(budget + COORDINATOR_SLACK),
            "--eval-every",
            "1",
            "--seed",
            str(seed),
            *spec.training,
        )
        (log_dir / "coordinator.cmd").write_text(" ".join(command[3:]) + "\n")
        coordinator = start(command, coordinator_log)
        cpu: dict[int, float] = {}

        def sample() -> None:
            for pid in [coordinator.pid, *workers]:
                value = cpu_seconds(pid)
                if value is not None:
                    cpu[pid] = value

        run_started = time.monotonic()
        code = wait_exit(
            coordinator,
            timeout=budget + 180,
            interval=0.5,
            sample=sample,
            timeout_message=f"coordinator of {job} still running {budget + 180:.0f} s after start",
        )
        busy1, total1 = machine_busy()
        run.wall = time.monotonic() - run_started
        run.machine_busy = (busy1 - busy0) / max(total1 - total0, 1 / CLOCK_TICKS)
        run.coordinator_cpu = cpu.pop(coordinator.pid, 0.0)
        run.workers_cpu = sum(cpu.values())
        if code != 0:
            raise RuntimeError(f"coordinator of {job} exited with {code}; see {coordinator_log}")
        stop_all()  # the workers: their logs are complete, and Redis is read undisturbed
        _read_history(store, result, budget)
        run.rejected = store.counters.get("rejected")
        run.skipped = store.counters.get("skipped")
        run.reason = store.status.load().get("reason", "")
        if measure_diffs:
            _read_diffs(store, result)
    finally:
        stop_all()
        try:
            cleanup(job, amqp_url, redis_url)
        except Exception as error:  # noqa: BLE001 - cleanup must not hide the run's own error
            print(f"  cleanup of {job} failed: {error}", file=sys.stderr)
        shutil.rmtree(log_dir / "state", ignore_errors=True)
    for log in worker_logs:
        for entry in _task_done_fields(log):
            result.sent_bytes.append(int(entry.get("sent_bytes", 0)))
            result.reads.append((entry.get("read_as", "?"), int(entry.get("read_bytes", 0))))
    return result


def _read_history(store: ModelStore, result: ArmResult, budget: float) -> None:
    run = result.run
    history = whole_history(store)  # both tiers: the archiver moves older versions out of Redis
    created0 = history[0].created
    applied = 0
    for entry in history:
        t = entry.created - created0
        applied += len(entry.updates)
        metrics = entry.metrics or {}
        run.curve.append(
            {
                "version": entry.version,
                "t": t,
                "accuracy": metrics.get("accuracy"),
                "loss": metrics.get("loss"),
                "updates": applied,
            }
        )
        for update in entry.updates:
            run.stalenesses.append(int(update.staleness))
            run.per_worker[update.worker_id] = run.per_worker.get(update.worker_id, 0) + 1
            if update.norm is not None:
                result.norms.append(float(update.norm))
            if t <= budget:
                result.updates_in_budget[update.worker_id] += 1
        if t <= budget:
            result.versions_in_budget = entry.version
            result.epsilon, result.dp_steps = entry.epsilon, entry.dp_steps
        result.epsilon_final = entry.epsilon


def _read_diffs(store: ModelStore, result: ArmResult) -> None:
    """Consecutive diffs of the versions still in Redis (the hot window, ~22 at the end of a run):
    made again with the coordinator's own ``make_diff`` (every arm, dense ones included), and
    the size of the one the coordinator stored (0: none, e.g. ``--downlink auto`` with a dense
    compression)."""
    head = store.versions.head()
    if head is None:
        return
    result.full_bytes = int(store.redis.strlen(store.keys.model(head)))
    weights = {}
    for version in range(head, max(head - 24, -1), -1):
        try:
            weights[version] = store.versions.load_weights(version)
        except Exception:  # noqa: BLE001 - archived (left Redis): the window ends here
            break
    for version in sorted(weights):
        if version - 1 in weights:
            made = len(make_diff(weights[version - 1], weights[version]))
            stored = int(store.redis.strlen(store.keys.model_diff(version)))
            result.diff_sizes[version] = (made, stored)


# -- derived figures -------------------------------------------------------------


def chain_bytes(result: ArmResult, behind: int) -> float | None:
    """Median, over the windows available, of the bytes of ``behind`` consecutive diffs ending at a version."""
    sizes = {version: made for version, (made, _) in result.diff_sizes.items()}
    chains = [
        sum(sizes[v] for v in range(end - behind + 1, end + 1))
        for end in sizes
        if all(v in sizes for v in range(end - behind + 1, end + 1))
    ]
    return statistics.median(chains) if chains else None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary_row(result: ArmResult) -> dict:
    """The arm's row of compression.csv."""
    run = result.run
    t_target, updates_target, _ = run.time_to_target()
    final, final_mean = run.final_accuracy(), run.final_mean_accuracy()
    reads = Counter(source for source, _ in result.reads)
    read_bytes = [count for _, count in result.reads]
    arm = ARMS.get(result.arm)
    stored = [size for _, size in result.diff_sizes.values() if size]
    mismatched = sum(1 for made, size in result.diff_sizes.values() if size and size != made)
    return {
        "task": result.task,
        "group": result.group,
        "arm": result.arm,
        "compression": arm.compression if arm else "none",
        "error_feedback": "" if arm is None or arm.error_feedback is None else str(arm.error_feedback).lower(),
        "workers": run.workers,
        "budget_s": run.budget,
        "target": run.target,
        "t_target_s": None if t_target is None else round(t_target, 2),
        "updates_to_target": updates_target,
        "final_acc": None if final is None else round(final, 4),
        "final_acc_last10s": None if final_mean is None else round(final_mean, 4),
        "best_acc": round(max((p["accuracy"] for p in run.curve if p["accuracy"] is not None), default=0.0), 4),
        "versions_in_budget": result.versions_in_budget,
        "updates_in_budget": sum(result.updates_in_budget.values()),
        "tasks_done": len(result.sent_bytes),
        "up_bytes_median": median(result.sent_bytes),
        "up_bytes_mean": round(sum(result.sent_bytes) / len(result.sent_bytes), 1) if result.sent_bytes else None,
        "down_bytes_mean": round(sum(read_bytes) / len(read_bytes), 1) if read_bytes else None,
        "reads_full": reads["full"],
        "reads_diffs": reads["diffs"],
        "reads_cache": reads["cache"],
        "reads_held": reads["held"],
        "full_model_bytes": result.full_bytes,
        "diffs_stored": len(stored),
        "diff_size_mismatches": mismatched,
        "norm_median": None if not result.norms else round(statistics.median(result.norms), 5),
        "rejected": " ".join(f"{k}:{v}" for k, v in sorted(run.rejected.items())),
        "epsilon": None if result.epsilon is None else round(result.epsilon, 3),
        "dp_steps": result.dp_steps,
        "epsilon_final": None if result.epsilon_final is None else round(result.epsilon_final, 3),
        **{f"dp_{key}": result.dp_settings.get(key) for key in DP_FIELDS},
        "coordinator_cpu_s": round(run.coordinator_cpu, 1),
        "workers_cpu_s": round(run.workers_cpu, 1),
        "machine_busy": round(run.machine_busy, 3),
        "load_before": None if result.load_before is None else round(result.load_before, 2),
        "reason": run.reason,
        "flags": " ".join(result.flags),
        "job": run.job,
    }


def downlink_rows(result: ArmResult) -> list[dict]:
    """The arm's rows of compression_downlink.csv: chains of 1, 3, 10 stored diffs against the full model."""
    rows = []
    for behind in BEHIND:
        chain = chain_bytes(result, behind)
        rows.append(
            {
                "task": result.task,
                "arm": result.arm,
                "behind": behind,
                "full_bytes": result.full_bytes,
                "chain_bytes_median": None if chain is None else round(chain),
                "chain_to_full": None
                if chain is None or not result.full_bytes
                else round(chain / result.full_bytes, 4),
                "windows": sum(
                    1
                    for end in result.diff_sizes
                    if all(v in result.diff_sizes for v in range(end - behind + 1, end + 1))
                ),
            }
        )
    return rows
