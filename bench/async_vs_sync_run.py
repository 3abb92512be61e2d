"""One ``async_vs_sync.py`` run: workers, then a coordinator, on a fresh job; read back its history."""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.async_vs_sync_config import ARMS, COORDINATOR_SLACK, TaskSpec, slowdowns
from bench.async_vs_sync_results import RunResult
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


def run_one(
    spec: TaskSpec,
    case: str,
    arm: str,
    *,
    budget: float,
    concurrency: int,
    seed: int,
    amqp_url: str,
    redis_url: str,
    log_root: Path,
    launch: str = "fork",
    arm_flags: list[str] | None = None,
    worker_flags: list[list[str]] | None = None,
    slow: list[int] | None = None,
) -> RunResult:
    """One run. ``arm_flags`` (default ARMS[arm]) go to the coordinator; ``worker_flags`` (default
    each worker's --slowdown of ``case``) to worker i, with ``slow`` the designated slow ones."""
    job = f"avs-{spec.name}-{case}-{arm}-{uuid.uuid4().hex[:6]}"
    log_dir = log_root / job
    log_dir.mkdir(parents=True)
    store = ModelStore.open(redis_url, job)
    cleanup(job, amqp_url, redis_url)
    if worker_flags is None:
        delays, slow = slowdowns(case, spec.workers, seed)
        worker_flags = [["--slowdown", f"{delay:.3f}"] for delay in delays]
    result = RunResult(
        spec.name, case, arm, job, spec.target, budget, concurrency, spec.workers, slow_workers=slow or []
    )
    connection_flags = ["--job", job, "--amqp-url", amqp_url, "--redis-url", redis_url]
    try:
        started = time.monotonic()
        worker_logs = [log_dir / f"worker-{index}.log" for index in range(spec.workers)]
        argvs = [
            [
                "worker",
                *connection_flags,
                "--worker-id",
                f"{job}-w-{index}",
                "--partition",
                str(index),
                *worker_flags[index],
            ]
            for index in range(spec.workers)
        ]
        workers = launch_workers(launch, spec.preload, argvs, worker_logs, log_dir)
        wait_ready(worker_logs, workers, timeout=300)
        result.startup_seconds = time.monotonic() - started
        busy0, total0 = machine_busy()
        coordinator_log = log_dir / "coordinator.log"
        coordinator = start(
            fedq_command(
                "coordinator",
                *connection_flags,
                "--task",
                spec.task,
                "--task-params",
                json.dumps(spec.params),
                *(ARMS[arm] if arm_flags is None else arm_flags),
                "--concurrency",
                str(concurrency),
                "--max-seconds",
                str(budget + COORDINATOR_SLACK),
                "--eval-every",
                "1",
                "--seed",
                str(seed),
                *spec.training,
            ),
            coordinator_log,
        )
        run_started = time.monotonic()
        cpu: dict[int, float] = {}  # pid -> its CPU seconds when last seen alive: the coordinator and each worker

        def sample() -> None:
            for pid in [coordinator.pid, *workers]:
                value = cpu_seconds(pid)
                if value is not None:
                    cpu[pid] = value

        code = wait_exit(
            coordinator,
            timeout=budget + 120,
            interval=0.5,
            sample=sample,
            timeout_message=f"coordinator of {job} still running {budget + 120:.0f} s after start",
        )
        busy1, total1 = machine_busy()
        result.wall = time.monotonic() - run_started
        # At least one clock tick, so an instant run does not divide by zero.
        result.machine_busy = (busy1 - busy0) / max(total1 - total0, 1 / CLOCK_TICKS)
        result.coordinator_cpu = cpu.pop(coordinator.pid, 0.0)
        result.workers_cpu = sum(cpu.values())
        if code != 0:
            raise RuntimeError(f"coordinator of {job} exited with {code}; see {coordinator_log}")
        history = whole_history(store)  # both tiers: the archiver moves older versions out of Redis
        created0 = history[0].created
        applied = 0
        for entry in history:
            applied += len(entry.updates)
            metrics = entry.metrics or {}
            result.curve.append(
                {
                    "version": entry.version,
                    "t": entry.created - created0,
                    "accuracy": metrics.get("accuracy"),
                    "loss": metrics.get("loss"),
                    "updates": applied,
                }
            )
            for update in entry.updates:
                result.stalenesses.append(int(update.staleness))
                result.per_worker[update.worker_id] = result.per_worker.get(update.worker_id, 0) + 1
                result.weight_per_worker[update.worker_id] = (
                    result.weight_per_worker.get(update.worker_id, 0.0) + update.weight
                )
        result.rejected = store.counters.get("rejected")
        result.rejected_by_worker = {
            worker: dict(record.rejected) for worker, record in store.fleet.load().items() if record.rejected
        }
        result.skipped = store.counters.get("skipped")
        result.reason = store.status.load().get("reason", "")
        warnings = Counter(
            match.group(1)
            for match in re.finditer(r" WARNING \S+ event=(\S+)", coordinator_log.read_text(errors="replace"))
        )
        result.warnings = dict(warnings)
    finally:
        stop_all()
        try:
            cleanup(job, amqp_url, redis_url)
        except Exception as error:  # noqa: BLE001 - cleanup must not hide the run's own error
            print(f"  cleanup of {job} failed: {error}", file=sys.stderr)
    return result
