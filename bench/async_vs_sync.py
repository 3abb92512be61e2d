"""Asynchronous vs synchronous aggregation under stragglers: real federations, wall-clock time.

Run from the repository root:

    .venv/bin/python bench/async_vs_sync.py            # everything: ~35-40 minutes on 2 cores
    .venv/bin/python bench/async_vs_sync.py --quick    # digits, stragglers, fedavg vs fedbuff3: ~2-3 minutes
    .venv/bin/python bench/async_vs_sync.py --tasks digits --cases lognormal --arms fedavg,fedbuff3
    .venv/bin/python bench/async_vs_sync.py --plot-only  # redraw figures/table from docs/figures/*.csv

Every run is a real federation: one ``python -m fedq.common.cli coordinator``
process and N ``fedq worker`` processes (worker i with ``--partition i`` and
``--slowdown s_i``) that talk only through RabbitMQ and Redis, as in ``fedq
demo``. Each run has its own job name and is deleted afterwards (Redis keys,
RabbitMQ queues and exchanges); every process this script started is stopped at
the end, also on Ctrl-C or SIGTERM.

Timing: the workers are started first and the coordinator only once every
worker has logged ``event=worker_ready``. Times are measured from the
``created`` timestamp of version 0 in the job's Redis history (the initial
model, committed by the coordinator before it dispatches anything); the
coordinator gets ``--max-seconds`` = budget + 8 s, since its clock starts
before it loads the test set and commits version 0 (~2.5 s for digits); time to
target, final accuracy and the plots only use versions created at most
``--budget`` seconds after version 0. The delay before version 1 is reported
(column ``t_v1``).

Worker start-up (``--launch``). A worker loads its task plugin lazily, on its
first task: for digits that imports scikit-learn (~2.5 s of CPU), and torch's
first forward/backward pass costs another ~1.3 s. Ten cold workers doing that
at once on two cores delayed version 1 by ~30 s in a pilot run (for every arm
alike), which would swamp the differences measured here. And 30 processes each
importing torch (~3.5 s of CPU) take 1-2 minutes to become ready, per run.
So by default (``fork``) one "zygote" process imports torch, the worker and
task modules, runs one forward/backward/SGD step on a 2x2 layer (with one torch
thread, as workers use, so no thread pool exists at fork time), and then forks
one process per worker that calls ``fedq.common.cli.main(["worker", ...])`` -- the
function behind ``python -m fedq.common.cli worker`` -- with its output sent to its
own log. The workers are still separate processes with their own connections;
only imports and torch's warm-up are shared. ``spawn`` starts one ``python -c
"<imports>; <warm-up>; fedq.common.cli.main()" worker ...`` per worker instead, and
``cold`` plain ``python -m fedq.common.cli worker ...`` exactly like ``fedq demo``.

Arms (same concurrency, same workers and delays within one task/case):

    fedavg     --algorithm fedavg                  (synchronous barrier, example-weighted mean)
    fedasync   --algorithm fedasync --staleness polynomial:a=0.5   (mixing rate 0.6, the default)
    fedbuff3   --algorithm fedbuff --buffer-size 3 --staleness polynomial:a=0.5
    fedbuff5   --algorithm fedbuff --buffer-size 5 --staleness polynomial:a=0.5
    fedadam3   fedbuff3 + --server-optimizer adam --server-lr 0.01
    fedbuff3ew fedbuff3 + --example-weighted true   (a control, only with --arms: sync FedAvg is
               always example-weighted, the FedBuff arms weight their buffer uniformly)

Heterogeneity cases (per-task slowdowns are drawn once from --seed, the same for every arm):

    lognormal   worker i sleeps s_i ~ LogNormal(ln 0.5, 1) extra seconds per task (median 0.5 s)
    stragglers  every worker sleeps 0.2 s per task; 30% of the workers (3 of 10, 9 of 30) sleep 2.2 s

Outputs: a table on stdout, ``docs/figures/async_vs_sync.csv`` (one row per
run), ``docs/figures/async_vs_sync_curves.csv`` (every version: time, accuracy,
updates so far) and ``docs/figures/async_vs_sync_<task>_<case>.png`` (accuracy
vs wall-clock time, and the staleness histogram, for every arm).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np

from fedq.coordinator.ops.status import remove_job
from fedq.common.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from fedq.common.store import ModelStore, connect_redis

FIGURES = ROOT / "docs" / "figures"
SUMMARY_CSV = "async_vs_sync.csv"
CURVES_CSV = "async_vs_sync_curves.csv"

# FedAdam's server learning rate, chosen before any run and not tuned: adaptive
# server optimizers move each coordinate by at most about server_lr per step
# (|m / sqrt(v)| <~ 1), and one client's delta after the first local training
# measures 0.005-0.015 per coordinate on average on both tasks, so 0.01 makes a
# FedAdam step about as large as a plain FedBuff step. It is the lower end of
# the 0.01-0.05 range suggested for this benchmark.
FEDADAM_SERVER_LR = 0.01
STALENESS = "polynomial:a=0.5"

ARMS: dict[str, list[str]] = {
    "fedavg": ["--algorithm", "fedavg"],
    "fedasync": ["--algorithm", "fedasync", "--staleness", STALENESS],
    "fedbuff3": ["--algorithm", "fedbuff", "--buffer-size", "3", "--staleness", STALENESS],
    "fedbuff5": ["--algorithm", "fedbuff", "--buffer-size", "5", "--staleness", STALENESS],
    "fedadam3": ["--algorithm", "fedbuff", "--buffer-size", "3", "--staleness", STALENESS,
                 "--server-optimizer", "adam", "--server-lr", str(FEDADAM_SERVER_LR)],
    # Control, not run by default: sync FedAvg is always example-weighted (coordinator/step.py),
    # the FedBuff arms weight the buffer uniformly (1/K); this separates weighting from asynchrony.
    "fedbuff3ew": ["--algorithm", "fedbuff", "--buffer-size", "3", "--staleness", STALENESS,
                   "--example-weighted", "true"],
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
ARM_COLOURS = {"fedavg": "black", "fedasync": "tab:orange", "fedbuff3": "tab:blue", "fedbuff5": "tab:green",
               "fedadam3": "tab:red", "fedbuff3ew": "tab:purple"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    task: str
    params: dict[str, Any]
    workers: int          # worker processes, worker i trains on partition i
    target: float
    training: tuple[str, ...]
    preload: tuple[str, ...] = ()  # modules the task imports on a worker's first task


TASKS = {
    # The demo's local training settings (coordinator/demo.py DEMO_TRAINING).
    "digits": TaskSpec("digits", "digits", {"num_partitions": 10, "alpha": 0.5}, workers=10, target=0.90,
                       training=("--local-epochs", "2", "--learning-rate", "0.1", "--batch-size", "16"),
                       preload=("fedq.common.tasks.digits", "sklearn.datasets")),
    # One worker process per device (30 processes, ~250 MB each); concurrency 10
    # means 10 of the 30 devices train at any time, as in FedAvg's client
    # sampling. Local learning rate 0.01 (FedProx's, for this data set): 0.1
    # makes synchronous FedAvg's test loss oscillate. Target: see docs/async-vs-sync.md.
    "synthetic": TaskSpec("synthetic", "synthetic", {"alpha": 1, "beta": 1, "num_partitions": 30}, workers=30,
                          target=0.60,
                          training=("--local-epochs", "2", "--learning-rate", "0.01", "--batch-size", "16"),
                          preload=("fedq.common.tasks.synthetic",)),
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
        slow = sorted(int(i) for i in np.argsort(delays)[-max(1, round(STRAGGLER_FRACTION * workers)):])
        return [round(float(d), 3) for d in delays], slow
    slow = sorted(int(i) for i in rng.choice(workers, size=round(STRAGGLER_FRACTION * workers), replace=False))
    return [STRAGGLER_BASE + (STRAGGLER_EXTRA if i in slow else 0.0) for i in range(workers)], slow


# -- process bookkeeping ---------------------------------------------------

PROCESSES: list[subprocess.Popen] = []
FORKED: list[int] = []  # worker pids forked by a zygote we started (see launch_workers)


def _fedq(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedq.common.cli", *args]


def warm_up_torch() -> None:
    """torch's first forward/backward pass in a process costs ~1.3 s of CPU (lazy initialisation)."""
    import torch

    torch.set_num_threads(1)  # as the worker does; also: no OpenMP pool exists when the zygote forks
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    layer(torch.zeros(1, 2)).sum().backward()
    optimizer.step()


def zygote(spec_path: str) -> int:
    """``--launch fork``: import and warm up once, then fork one ``fedq worker`` per entry of the spec.

    Each child redirects stdout/stderr to its log and runs ``fedq.common.cli.main(["worker", ...])``,
    the function behind ``python -m fedq.common.cli worker``. The zygote prints the children's pids
    as one JSON line, forwards SIGTERM to them and exits when they all have.
    """
    spec = json.loads(Path(spec_path).read_text())
    import importlib

    for module in ["fedq.common.cli", "fedq.common.tasks", "fedq.worker.cli", "fedq.worker.service", *spec["preload"]]:
        importlib.import_module(module)
    warm_up_torch()
    from fedq.common.cli import main as fedq_main

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers themselves
    children: list[int] = []
    for worker in spec["workers"]:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                fd = os.open(worker["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                code = fedq_main(worker["argv"])
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child must never return into the zygote's loop
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        children.append(pid)
    print(json.dumps(children), flush=True)

    def forward(_signum, _frame):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
    signal.signal(signal.SIGTERM, forward)
    remaining = set(children)
    while remaining:
        try:
            pid, _status = os.wait()
        except ChildProcessError:
            break
        remaining.discard(pid)
    return 0


def start(args: list[str], log_path: Path, **popen: Any) -> subprocess.Popen:
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(args, stdout=popen.pop("stdout", log_file), stderr=log_file, cwd=ROOT, **popen)
    PROCESSES.append(process)
    return process


def launch_workers(mode: str, preload: tuple[str, ...], argvs: list[list[str]], logs: list[Path],
                   log_dir: Path) -> list[int]:
    """Start one worker process per argv (``fedq worker`` arguments); return their pids.

    fork:  one zygote imports torch and the task's modules, warms torch up, and forks the workers
    spawn: one ``python -c "<imports>; <warm-up>; fedq.common.cli.main()" worker ...`` process per worker
    cold:  ``python -m fedq.common.cli worker ...`` per worker, exactly like ``fedq demo``
    """
    if mode == "fork":
        spec_path = log_dir / "zygote.json"
        spec_path.write_text(json.dumps({"preload": list(preload), "workers": [
            {"argv": argv, "log": str(log)} for argv, log in zip(argvs, logs)]}))
        process = start([sys.executable, str(Path(__file__).resolve()), "_zygote", str(spec_path)],
                        log_dir / "zygote.log", stdout=subprocess.PIPE, text=True)
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker zygote exited early; see {log_dir / 'zygote.log'}")
        pids = json.loads(line)
        FORKED.extend(pids)
        return pids
    pids = []
    for argv, log in zip(argvs, logs):
        if mode == "cold":
            command = _fedq(*argv)
        else:
            code = (f"import sys, {', '.join(('fedq.common.tasks', *preload))}; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                    "from async_vs_sync import warm_up_torch; warm_up_torch(); "
                    "from fedq.common.cli import main; sys.exit(main())")
            command = [sys.executable, "-c", code, *argv]
        pids.append(start(command, log).pid)
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal_all(signum: int) -> None:
    """Send ``signum`` to every started process and forked worker that still runs."""
    targets = [process.pid for process in PROCESSES if process.poll() is None]
    targets += [pid for pid in FORKED if alive(pid)]
    for pid in targets:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_all(grace: float = 15.0) -> None:
    """SIGTERM every process we started that still runs, then SIGKILL what is left after ``grace``.

    Forked workers get SIGTERM from their zygote and, as a fallback, by pid.
    """
    _signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (any(p.poll() is None for p in PROCESSES) or any(map(alive, FORKED))):
        time.sleep(0.2)
    _signal_all(signal.SIGKILL)
    for process in PROCESSES:
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    PROCESSES.clear()
    FORKED.clear()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# -- one run -----------------------------------------------------------------

@dataclass
class RunResult:
    task: str
    case: str
    arm: str
    job: str
    target: float
    budget: float
    concurrency: int
    workers: int
    curve: list[dict[str, Any]] = field(default_factory=list)  # version, t, accuracy, loss, updates
    stalenesses: list[int] = field(default_factory=list)
    per_worker: dict[str, int] = field(default_factory=dict)
    slow_workers: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    startup_seconds: float = 0.0
    coordinator_cpu: float = 0.0
    workers_cpu: float = 0.0
    machine_busy: float = 0.0
    wall: float = 0.0
    slow_share_value: float | None = None  # when rebuilt from the CSV, per_worker is not known

    # derived figures
    def time_to_target(self) -> tuple[float | None, int | None, int | None]:
        for point in self.curve:
            if point["t"] > self.budget:
                break
            if point["accuracy"] is not None and point["accuracy"] >= self.target:
                return point["t"], point["updates"], point["version"]
        return None, None, None

    def time_to_sustained_target(self, hold: float = SUSTAIN_SECONDS) -> float | None:
        """The first time from which every version of the next ``hold`` seconds is at or above the target."""
        points = [p for p in self.curve if p["accuracy"] is not None]
        for index, point in enumerate(points):
            if point["t"] + hold > self.budget:
                return None
            if all(later["accuracy"] >= self.target for later in points[index:]
                   if later["t"] <= point["t"] + hold):
                return point["t"]
        return None

    def updates_within_budget(self) -> int:
        within = [p["updates"] for p in self.curve if p["t"] <= self.budget]
        return within[-1] if within else 0

    def final_accuracy(self) -> float | None:
        within = [p for p in self.curve if p["accuracy"] is not None and p["t"] <= self.budget]
        return within[-1]["accuracy"] if within else None

    def final_mean_accuracy(self, window: float = 10.0) -> float | None:
        """Mean accuracy of the versions committed in the last ``window`` seconds of the budget."""
        end = max((p["t"] for p in self.curve), default=0.0)
        end = min(end, self.budget)
        values = [p["accuracy"] for p in self.curve
                  if p["accuracy"] is not None and end - window <= p["t"] <= end]
        return float(np.mean(values)) if values else None

    def slow_share(self) -> float | None:
        if self.slow_share_value is not None:
            return self.slow_share_value
        total = sum(self.per_worker.values())
        if not total:
            return None
        slow = sum(count for worker, count in self.per_worker.items()
                   if int(worker.rsplit("-", 1)[1]) in self.slow_workers)
        return slow / total

    def row(self) -> dict[str, Any]:
        t_target, updates_target, version_target = self.time_to_target()
        sustained = self.time_to_sustained_target()
        histogram = Counter(self.stalenesses)
        t_v1 = next((p["t"] for p in self.curve if p["version"] == 1), None)
        final, final_mean = self.final_accuracy(), self.final_mean_accuracy()
        slow_share = self.slow_share()
        return {
            "task": self.task, "case": self.case, "arm": self.arm, "workers": self.workers,
            "concurrency": self.concurrency, "target": self.target, "budget_s": self.budget,
            "t_target_s": None if t_target is None else round(t_target, 2),
            "updates_to_target": updates_target, "versions_to_target": version_target,
            "t_target_sustained_s": None if sustained is None else round(sustained, 2),
            "final_acc": None if final is None else round(final, 4),
            "final_acc_last10s": None if final_mean is None else round(final_mean, 4),
            "best_acc": round(max((p["accuracy"] for p in self.curve if p["accuracy"] is not None), default=0), 4),
            "versions": self.curve[-1]["version"] if self.curve else 0,
            "updates_applied": len(self.stalenesses),
            "updates_per_s": round(self.updates_within_budget() / self.budget, 2),
            "rejected": sum(self.rejected.values()),
            "rejected_reasons": " ".join(f"{k}:{v}" for k, v in sorted(self.rejected.items())),
            "skipped": sum(self.skipped.values()),
            "staleness_mean": round(float(np.mean(self.stalenesses)), 2) if self.stalenesses else None,
            "staleness_max": max(self.stalenesses, default=None),
            "staleness_hist": " ".join(f"{k}:{histogram[k]}" for k in sorted(histogram)),
            "slow_workers": " ".join(map(str, self.slow_workers)),
            "slow_update_share": None if slow_share is None else round(slow_share, 3),
            "t_v1_s": None if t_v1 is None else round(t_v1, 2),
            "startup_s": round(self.startup_seconds, 1),
            "coordinator_cpu_s": round(self.coordinator_cpu, 1), "workers_cpu_s": round(self.workers_cpu, 1),
            "machine_busy": round(self.machine_busy, 3),
            "coordinator_warnings": " ".join(f"{k}:{v}" for k, v in sorted(self.warnings.items())),
            "reason": self.reason, "job": self.job,
        }


def wait_ready(logs: list[Path], pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(range(len(logs)))
    while pending:
        for index in list(pending):
            if not alive(pids[index]):
                raise RuntimeError(f"worker {index} exited early; see {logs[index]}")
            # a forked worker may not have opened its log yet
            if logs[index].exists() and "event=worker_ready" in logs[index].read_text(errors="replace"):
                pending.discard(index)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(pending)} not ready after {timeout:.0f} s")
        time.sleep(0.25)


def run_one(spec: TaskSpec, case: str, arm: str, *, budget: float, concurrency: int, seed: int, amqp_url: str,
            redis_url: str, log_root: Path, launch: str = "fork") -> RunResult:
    job = f"avs-{spec.name}-{case}-{arm}-{uuid.uuid4().hex[:6]}"
    log_dir = log_root / job
    log_dir.mkdir(parents=True)
    store = ModelStore(connect_redis(redis_url), job)
    remove_job(amqp_url, store)
    delays, slow = slowdowns(case, spec.workers, seed)
    result = RunResult(spec.name, case, arm, job, spec.target, budget, concurrency, spec.workers, slow_workers=slow)
    connection_flags = ["--job", job, "--amqp-url", amqp_url, "--redis-url", redis_url]
    try:
        started = time.monotonic()
        worker_logs = [log_dir / f"worker-{index}.log" for index in range(spec.workers)]
        argvs = [["worker", *connection_flags, "--worker-id", f"{job}-w-{index}", "--partition", str(index),
                  "--slowdown", f"{delays[index]:.3f}"] for index in range(spec.workers)]
        workers = launch_workers(launch, spec.preload, argvs, worker_logs, log_dir)
        wait_ready(worker_logs, workers, timeout=300)
        result.startup_seconds = time.monotonic() - started
        busy0, total0 = machine_busy()
        coordinator_log = log_dir / "coordinator.log"
        coordinator = start(_fedq(
            "coordinator", *connection_flags, "--task", spec.task, "--task-params", json.dumps(spec.params),
            *ARMS[arm], "--concurrency", str(concurrency), "--max-seconds", str(budget + COORDINATOR_SLACK),
            "--eval-every", "1",
            "--seed", str(seed), *spec.training), coordinator_log)
        run_started = time.monotonic()
        coordinator_cpu, worker_cpu = 0.0, {}
        while coordinator.poll() is None:
            value = cpu_seconds(coordinator.pid)
            coordinator_cpu = value if value is not None else coordinator_cpu
            for pid in workers:
                value = cpu_seconds(pid)
                if value is not None:
                    worker_cpu[pid] = value
            if time.monotonic() - run_started > budget + 120:
                raise RuntimeError(f"coordinator of {job} still running {budget + 120:.0f} s after start")
            time.sleep(0.5)
        busy1, total1 = machine_busy()
        result.wall = time.monotonic() - run_started
        result.machine_busy = (busy1 - busy0) / max(total1 - total0, 1)
        result.coordinator_cpu = coordinator_cpu
        result.workers_cpu = sum(worker_cpu.values())
        if coordinator.returncode != 0:
            raise RuntimeError(f"coordinator of {job} exited with {coordinator.returncode}; see {coordinator_log}")
        history = store.versions.history()
        created0 = history[0].created
        applied = 0
        for entry in history:
            applied += len(entry.updates)
            metrics = entry.metrics or {}
            result.curve.append({"version": entry.version, "t": entry.created - created0,
                                 "accuracy": metrics.get("accuracy"), "loss": metrics.get("loss"),
                                 "updates": applied})
            for update in entry.updates:
                result.stalenesses.append(int(update.staleness))
                result.per_worker[update.worker_id] = result.per_worker.get(update.worker_id, 0) + 1
        result.rejected = store.counters.get("rejected")
        result.skipped = store.counters.get("skipped")
        result.reason = store.status.load().get("reason", "")
        warnings = Counter(match.group(1) for match in
                           re.finditer(r" WARNING \S+ event=(\S+)", coordinator_log.read_text(errors="replace")))
        result.warnings = dict(warnings)
    finally:
        stop_all()
        try:
            remove_job(amqp_url, store)
        except Exception as error:  # noqa: BLE001 - cleanup must not hide the run's own error
            print(f"  cleanup of {job} failed: {error}", file=sys.stderr)
    return result


# -- reporting ---------------------------------------------------------------

def merged(results: list[RunResult], out_dir: Path) -> list[RunResult]:
    """Earlier results in ``out_dir`` whose (task, case, arm) was not re-run, then ``results``."""
    if not (out_dir / SUMMARY_CSV).exists() or not (out_dir / CURVES_CSV).exists():
        return list(results)
    fresh = {(r.task, r.case, r.arm) for r in results}
    kept = [r for r in load_results(out_dir) if (r.task, r.case, r.arm) not in fresh]
    order = {name: index for index, name in enumerate([*TASKS, *CASES, *ARMS])}
    return sorted(kept + list(results), key=lambda r: (order.get(r.task, 99), order.get(r.case, 99),
                                                       order.get(r.arm, 99)))


def write_csvs(results: list[RunResult], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [result.row() for result in results]
    sync_time = {(r["task"], r["case"]): r["t_target_s"] for r in rows if r["arm"] == "fedavg"}
    for row in rows:
        base, t = sync_time.get((row["task"], row["case"])), row["t_target_s"]
        row["speedup_vs_fedavg"] = round(base / t, 2) if (base and t) else None
    if rows:
        with open(out_dir / SUMMARY_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(out_dir / CURVES_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "case", "arm", "version", "t_s", "accuracy", "loss", "updates", "staleness"])
        for result in results:
            index = 0
            for point in result.curve:
                # staleness of the updates in this version, ';'-separated
                count = point["updates"] - index
                stale = result.stalenesses[index:index + count]
                index += count
                writer.writerow([result.task, result.case, result.arm, point["version"], f"{point['t']:.3f}",
                                 "" if point["accuracy"] is None else f"{point['accuracy']:.4f}",
                                 "" if point["loss"] is None else f"{point['loss']:.4f}", point["updates"],
                                 ";".join(map(str, stale))])


def load_results(out_dir: Path) -> list[RunResult]:
    """Rebuild results (curves, staleness, summary fields) from the CSVs, for --plot-only."""
    with open(out_dir / SUMMARY_CSV) as handle:
        summary = {(row["task"], row["case"], row["arm"]): row for row in csv.DictReader(handle)}
    with open(out_dir / CURVES_CSV) as handle:
        curve_rows = list(csv.DictReader(handle))
    results: dict[tuple[str, str, str], RunResult] = {}
    for row in curve_rows:
        key = (row["task"], row["case"], row["arm"])
        info = summary[key]
        if key not in results:
            results[key] = RunResult(row["task"], row["case"], row["arm"], info["job"], float(info["target"]),
                                     float(info["budget_s"]), int(info["concurrency"]), int(info["workers"]),
                                     slow_workers=[int(x) for x in info["slow_workers"].split()])
            result = results[key]
            result.rejected = {k: int(v) for k, v in (item.split(":") for item in info["rejected_reasons"].split())}
            result.reason = info["reason"]
            result.startup_seconds = float(info["startup_s"])
            result.coordinator_cpu, result.workers_cpu = float(info["coordinator_cpu_s"]), float(info["workers_cpu_s"])
            result.machine_busy = float(info["machine_busy"])
            result.warnings = {k: int(v) for k, v in (item.split(":") for item in info["coordinator_warnings"].split())}
            result.skipped = {"all": int(info["skipped"])} if int(info["skipped"]) else {}
            result.slow_share_value = float(info["slow_update_share"]) if info["slow_update_share"] else None
        result = results[key]
        result.curve.append({"version": int(row["version"]), "t": float(row["t_s"]),
                             "accuracy": float(row["accuracy"]) if row["accuracy"] else None,
                             "loss": float(row["loss"]) if row["loss"] else None, "updates": int(row["updates"])})
        result.stalenesses.extend(int(x) for x in row["staleness"].split(";") if x)
    return list(results.values())


def print_table(results: list[RunResult]) -> None:
    header = (f"{'task':9} {'case':10} {'arm':10} {'t->target':>9} {'speedup':>7} {'held5s':>6} {'upd->tgt':>8} {'final':>6} "
              f"{'last10s':>7} {'best':>6} {'vers':>5} {'upd':>5} {'upd/s':>5} {'rej':>4} {'stale':>9} {'slow%':>5} "
              f"{'t_v1':>5} {'coordCPU':>8} {'busy':>5}")
    print(header)
    print("-" * len(header))
    sync_time = {(r.task, r.case): r.time_to_target()[0] for r in results if r.arm == "fedavg"}
    for result in results:
        row = result.row()
        t = row["t_target_s"]
        base = sync_time.get((result.task, result.case))
        speedup = f"{base / t:6.2f}x" if (t and base) else "    - "
        stale = f"{row['staleness_mean']}/{row['staleness_max']}" if row["staleness_mean"] is not None else "-"
        share = f"{100 * row['slow_update_share']:.0f}" if row["slow_update_share"] is not None else "-"

        def fmt(value: Any, spec: str) -> str:
            return "-" if value is None else format(value, spec)
        print(f"{result.task:9} {result.case:10} {result.arm:10} {fmt(t, '9.1f'):>9} {speedup:>7} "
              f"{fmt(row['t_target_sustained_s'], '6.1f'):>6} "
              f"{fmt(row['updates_to_target'], 'd'):>8} {fmt(row['final_acc'], '.4f'):>6} "
              f"{fmt(row['final_acc_last10s'], '.4f'):>7} {row['best_acc']:6.4f} {row['versions']:5d} "
              f"{row['updates_applied']:5d} {row['updates_per_s']:5.1f} {row['rejected']:4d} {stale:>9} {share:>5} {fmt(row['t_v1_s'], '.1f'):>5} "
              f"{row['coordinator_cpu_s']:8.1f} {row['machine_busy']:5.2f}")


def plot(results: list[RunResult], out_dir: Path) -> list[Path]:
    """One PNG per (task, case): accuracy vs time (whole budget, and zoomed on the sync time to target),
    and the staleness histogram of the applied updates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.task, result.case), []).append(result)
    for (task, case), group in groups.items():
        figure = plt.figure(figsize=(13, 9))
        grid = figure.add_gridspec(2, 2, height_ratios=[1, 1], width_ratios=[3, 2])
        full, zoom, right = figure.add_subplot(grid[0, :]), figure.add_subplot(grid[1, 0]), figure.add_subplot(grid[1, 1])
        target = group[0].target
        budget = max(r.budget for r in group)
        sync = next((r.time_to_target()[0] for r in group if r.arm == "fedavg"), None)
        zoom_end = min(budget, 1.3 * sync if sync else budget / 3)
        for result in group:
            points = [p for p in result.curve if p["accuracy"] is not None and p["t"] <= result.budget]
            colour = ARM_COLOURS.get(result.arm)
            t_target, updates, _ = result.time_to_target()
            name = ARM_LABELS.get(result.arm, result.arm)
            label = name + (f": {t_target:.1f} s, {updates} updates to {target:.2f}" if t_target is not None
                            else f": {target:.2f} not reached")
            final = result.final_mean_accuracy()
            if final is not None:
                label += f"; last 10 s {final:.3f}"
            for axis in (full, zoom):
                axis.plot([p["t"] for p in points], [p["accuracy"] for p in points], color=colour, label=label,
                          linewidth=1.8 if result.arm == "fedavg" else 1.0,
                          drawstyle="steps-post" if result.arm == "fedavg" else "default",
                          alpha=1.0 if result.arm in ("fedavg", "fedbuff3") else 0.8)
                if t_target is not None:
                    axis.axvline(t_target, color=colour, linestyle=":", linewidth=1)
            hist = Counter(result.stalenesses)
            if hist:
                xs = np.arange(0, max(hist) + 2)
                total = sum(hist.values())
                right.step(xs, [hist.get(int(x), 0) / total for x in xs], where="mid", color=colour,
                           label=f"{name} (mean {np.mean(result.stalenesses):.1f}, "
                                 f"{sum(result.rejected.values())} rejected)")
        lows = [p["accuracy"] for r in group for p in r.curve if p["accuracy"] is not None]
        example = group[0]
        for axis in (full, zoom):
            axis.axhline(target, color="grey", linestyle="--", linewidth=1)
            axis.set_xlabel("wall-clock seconds since version 0")
            axis.set_ylabel("test accuracy of the global model")
            axis.set_ylim(max(0.0, target - 0.4), min(1.0, max(lows, default=target) + 0.03))
            axis.grid(alpha=0.3)
        full.set_xlim(0, budget)
        zoom.set_xlim(0, zoom_end)
        full.legend(loc="lower right", fontsize=8)
        full.set_title(f"{task}, {case}: {example.workers} workers, concurrency {example.concurrency}, "
                       f"target {target:.2f} (dotted lines: time to target)")
        zoom.set_title(f"zoom: first {zoom_end:.0f} s")
        right.set_xlabel("staleness (versions)")
        right.set_ylabel("share of applied updates")
        right.set_title("staleness of applied updates")
        right.grid(alpha=0.3)
        right.legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / f"async_vs_sync_{task}_{case}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


# -- main --------------------------------------------------------------------

def _names(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_zygote"]:
        return zygote(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated, default {','.join(DEFAULT_ARMS)}; also: fedbuff3ew (control)")
    parser.add_argument("--budget", type=float, default=90.0,
                        help="wall-clock seconds per run, counted from version 0 (default 90)")
    parser.add_argument("--concurrency", type=int, default=10, help="tasks in flight, the same for every arm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slowdowns and of the initial model")
    parser.add_argument("--quick", action="store_true",
                        help="digits, stragglers, fedavg and fedbuff3 only, 45 s budget (~2-3 minutes)")
    parser.add_argument("--out-dir", default=None,
                        help=f"where the CSVs and PNGs go (default {FIGURES.relative_to(ROOT)}; --quick: a temporary "
                             "folder). Rows of (task, case, arm) not re-run are kept from its CSVs")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows in --out-dir instead of keeping them")
    parser.add_argument("--log-dir", default=None, help="process logs (default: a temporary folder)")
    parser.add_argument("--launch", choices=("fork", "spawn", "cold"), default="fork",
                        help="how worker processes start (see the module docstring); default fork")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the table and PNGs from the CSVs (and recompute their derived columns)")
    parser.add_argument("--amqp-url", default=os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("FEDQ_REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="fedq-async-vs-sync-quick-") if args.quick else str(FIGURES)
    out_dir = Path(args.out_dir)

    if args.plot_only:
        results = load_results(out_dir)
        write_csvs(results, out_dir)  # recomputes the derived columns
        print_table(results)
        for path in plot(results, out_dir):
            print(f"wrote {path}")
        return 0

    if args.quick:
        args.tasks, args.cases, args.arms, args.budget = "digits", "stragglers", "fedavg,fedbuff3", 45.0
    tasks = _names(args.tasks, list(TASKS), "tasks")
    cases = _names(args.cases, CASES, "cases")
    arms = _names(args.arms, list(ARMS), "arms")
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="fedq-async-vs-sync-"))
    log_root.mkdir(parents=True, exist_ok=True)

    def on_sigterm(_signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)

    print(f"async vs sync: tasks {tasks}, cases {cases}, arms {arms}, budget {args.budget:.0f} s per run, "
          f"concurrency {args.concurrency}, seed {args.seed}; logs in {log_root}", flush=True)
    for name in tasks:
        for case in cases:
            delays, slow = slowdowns(case, TASKS[name].workers, args.seed)
            print(f"  {name}/{case}: slowdowns {delays} (slow workers {slow})", flush=True)
    results: list[RunResult] = []

    def everything() -> list[RunResult]:
        return list(results) if args.fresh else merged(results, out_dir)
    try:
        for name in tasks:
            for case in cases:
                for arm in arms:
                    print(f"[{time.strftime('%H:%M:%S')}] {name} {case} {arm} ...", flush=True)
                    result = run_one(TASKS[name], case, arm, budget=args.budget, concurrency=args.concurrency,
                                     seed=args.seed, amqp_url=args.amqp_url, redis_url=args.redis_url,
                                     log_root=log_root, launch=args.launch)
                    results.append(result)
                    row = result.row()
                    print(f"    t_target {row['t_target_s']} s, updates {row['updates_to_target']}, "
                          f"final {row['final_acc']} (last 10 s {row['final_acc_last10s']}), versions "
                          f"{row['versions']}, rejected {row['rejected_reasons'] or 0}, staleness mean "
                          f"{row['staleness_mean']} max {row['staleness_max']}, startup {row['startup_s']} s, "
                          f"coordinator CPU {row['coordinator_cpu_s']} s, machine busy {row['machine_busy']}",
                          flush=True)
                    write_csvs(everything(), out_dir)
    except KeyboardInterrupt:
        print("interrupted: stopping processes and cleaning up", file=sys.stderr)
        stop_all(grace=5)
        write_csvs(everything(), out_dir)
        return 130
    finally:
        stop_all()
    results = everything()
    print()
    print_table(results)
    for path in plot(results, out_dir):
        print(f"wrote {path}")
    print(f"wrote {out_dir / SUMMARY_CSV} and {out_dir / CURVES_CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
