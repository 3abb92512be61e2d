"""One arm of ``scale.py``: a coordinator on a fresh job, N simulated workers, samples while it runs.

``run_arm`` starts the simulated-worker processes (``scale_workers.py``), then the coordinator
(``--max-seconds`` = the arm's length, so it ends by itself), samples every few seconds until it
exits, stops the workers and reads back what happened: the job's history (both tiers) and the
workers' stamps. ``ArmResult`` holds the raw figures; ``scale_report.py`` derives the tables.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import cleanup, cpu_seconds, machine_busy, mlp_coordinator_command, start, stop_all, wait_exit
from bench.scale_workers import launch, read_stamps
from fedq.broker.connection import connect
from fedq.broker.depth import queue_depths
from fedq.broker.topology import Topology
from fedq.common.store import ModelStore
from fedq.common.store.tiers import whole_history

BUFFER_SIZE = 10
# Coordinator log events worth counting: each says the coordinator held back, refused or lost work.
LOG_EVENTS = ("dispatch_held", "tasks_expired", "redis_budget", "archive_failed", "connection_lost", "Traceback")


@dataclass
class Sample:
    at: float  # time.time()
    rss_bytes: int  # the coordinator's VmRSS
    anon_bytes: int  # ... of it, RssAnon: heap and anonymous maps, without torch's shared libraries
    cpu_seconds: float  # the coordinator's utime + stime so far
    machine_busy_seconds: float  # every core's busy time so far (/proc/stat): other sessions show here
    redis_used_bytes: int  # INFO memory used_memory: the whole server, other jobs too
    job_redis_bytes: dict[str, int]  # this job's keys by kind (MEMORY USAGE), as the coordinator measures them
    head: int | None
    # Queue depths: ready, and unacknowledged when the management API answers (None: unknown).
    tasks_ready: int | None = None
    tasks_unacked: int | None = None
    updates_ready: int | None = None
    updates_unacked: int | None = None
    dead_ready: int | None = None


@dataclass
class ArmResult:
    workers: int
    processes: int
    job: str
    mean_training_seconds: float
    seconds: float
    log_path: str
    started_at: float = 0.0  # version 0's created: the arm's clock starts here
    depth_source: str = ""
    samples: list[Sample] = field(default_factory=list)
    peak_rss_bytes: int = 0  # VmHWM at the last sample
    # Per version, oldest first: (created, updates applied).
    versions: list[tuple[float, int]] = field(default_factory=list)
    # Per applied update answered by a simulated worker: its stamps and its version's created.
    applied: list[dict[str, float]] = field(default_factory=list)
    published: int = 0  # updates the simulated workers published
    log_events: dict[str, float] = field(default_factory=dict)

    def elapsed(self, at: float) -> float:
        return at - self.started_at


def read_memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and VmHWM of ``pid`` in bytes, from /proc/<pid>/status (empty once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {name: int(kilobytes) * 1024 for name, kilobytes in re.findall(r"^(\w+):\s+(\d+) kB$", text, re.M)}


class Sampler:
    """Samples the coordinator, Redis and the job's queues; fails if a simulated-worker process died."""

    def __init__(self, result: ArmResult, coordinator: subprocess.Popen, workers: list[subprocess.Popen], args):
        self.result, self.coordinator, self.workers = result, coordinator, workers
        self.store = ModelStore.open(args.redis_url, result.job)
        self.queues = list(Topology(result.job).queues)
        self.amqp_url = args.amqp_url

    def sample(self) -> None:
        for index, process in enumerate(self.workers):
            if process.poll() is not None:
                raise RuntimeError(f"simulated-worker process {index} exited with {process.returncode}")
        memory = read_memory(self.coordinator.pid)
        cpu = cpu_seconds(self.coordinator.pid)
        if not memory or cpu is None:
            return  # it has just exited
        source, depths = queue_depths(self.amqp_url, self.queues)
        tasks, updates, dead = depths
        self.result.depth_source = source
        self.result.peak_rss_bytes = memory.get("VmHWM", 0)
        self.result.samples.append(
            Sample(
                at=time.time(),
                rss_bytes=memory["VmRSS"],
                anon_bytes=memory.get("RssAnon", 0),
                cpu_seconds=cpu,
                machine_busy_seconds=machine_busy()[0],
                redis_used_bytes=int(self.store.redis.info("memory")["used_memory"]),
                job_redis_bytes=self.store.memory_usage(),
                head=self.store.versions.head(),
                tasks_ready=tasks.ready,
                tasks_unacked=tasks.unacked,
                updates_ready=updates.ready,
                updates_unacked=updates.unacked,
                dead_ready=dead.ready,
            )
        )


def coordinator_command(job: str, workers: int, seconds: float, args: argparse.Namespace, sizes: list[int]) -> list:
    # Every simulated worker can hold a task: concurrency = workers.
    return mlp_coordinator_command(
        job,
        sizes,
        "fedbuff",
        workers,
        seconds,
        args.amqp_url,
        args.redis_url,
        "--buffer-size",
        str(BUFFER_SIZE),
        *shlex.split(args.coordinator_args),
    )


def worker_specs(job: str, workers: int, mean_seconds: float, tensor_specs: dict, args, log_dir: Path) -> list[dict]:
    """One spec per process, the worker ids split into contiguous blocks (scale-0000, scale-0001, ...)."""
    processes = min(args.processes, workers)
    worker_ids = [f"scale-{index:04d}" for index in range(workers)]
    bounds = [workers * index // processes for index in range(processes + 1)]
    return [
        {
            "index": index,
            "job": job,
            "amqp_url": args.amqp_url,
            "redis_url": args.redis_url,
            "worker_ids": worker_ids[bounds[index] : bounds[index + 1]],
            "tensor_specs": tensor_specs,
            "mean_seconds": mean_seconds,
            "spread": args.spread,
            "seed": f"{args.seed}-{workers}-{index}",  # random.Random takes a string seed as is
            "stamps_path": str(log_dir / f"{job}-stamps-{index}.csv"),
        }
        for index in range(processes)
    ]


def run_arm(workers: int, seconds: float, args: argparse.Namespace, sizes: list[int], tensor_specs: dict) -> ArmResult:
    """Run one arm and return its figures; the job is deleted afterwards, whatever happened."""
    job = f"bench-scale-{workers}-{uuid.uuid4().hex[:8]}"
    log_dir = Path(args.log_dir)
    # The same update rate in every arm: only the number of workers (and tasks in flight) differs.
    mean_seconds = workers / args.rate
    result = ArmResult(workers, min(args.processes, workers), job, mean_seconds, seconds, str(log_dir / f"{job}.log"))
    store = ModelStore.open(args.redis_url, job)
    try:
        # Declared here first, so that the workers consume before the coordinator dispatches.
        connection = connect(args.amqp_url, name="fedq-bench-admin")
        Topology(job).declare(connection.channel())
        connection.close()
        specs = worker_specs(job, workers, mean_seconds, tensor_specs, args, log_dir)
        worker_processes = [
            launch(
                spec, log_dir / f"{job}-workers-{spec['index']}.json", log_dir / f"{job}-workers-{spec['index']}.log"
            )
            for spec in specs
        ]
        coordinator = start(coordinator_command(job, workers, seconds, args, sizes), Path(result.log_path))
        sampler = Sampler(result, coordinator, worker_processes, args)
        code = wait_exit(
            coordinator,
            timeout=seconds + 300,  # start-up, and the archiver's last pass after --max-seconds
            interval=args.sample_seconds,
            sample=sampler.sample,
            timeout_message=f"the coordinator of {job} did not finish; see {result.log_path}",
        )
        if code != 0:
            tail = Path(result.log_path).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the coordinator of {job} exited with {code}:\n{tail}")
        for process in worker_processes:
            process.terminate()  # they write their stamps on SIGTERM
        for process in worker_processes:
            process.wait(timeout=60)
        stamps = [row for spec in specs for row in read_stamps(Path(spec["stamps_path"]))]
        analyse_history(result, whole_history(store), stamps)
        result.log_events = count_log_events(Path(result.log_path))
    finally:
        stop_all(grace=5)
        cleanup(job, args.amqp_url, args.redis_url)
    return result


def analyse_history(result: ArmResult, history: list, stamps: list[dict[str, Any]]) -> None:
    """Versions and their times; each applied update joined with its worker's stamps."""
    records = sorted(history, key=lambda record: record.version)
    result.started_at = records[0].created
    result.versions = [(record.created, record.updates_applied) for record in records]
    result.published = len(stamps)
    stamps_by_task = {row["task_id"]: row for row in stamps}
    for record in records:
        for update in record.updates:
            row = stamps_by_task.get(update.task_id)
            if row is not None:
                result.applied.append({**row, "committed_at": record.created, "staleness": update.staleness})


def _log_time(line: str) -> float | None:
    """The time of a line of fedq's log format (``2026-12-07 12:13:25,285 LEVEL ...``), None if it has none."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def count_log_events(log_path: Path) -> dict[str, float]:
    """How often each of LOG_EVENTS was logged, warnings and errors, and the seconds dispatch was held."""
    counts: Counter[str] = Counter()
    held_since: float | None = None
    held_seconds = 0.0
    last_time = None
    for line in log_path.read_text(errors="replace").splitlines():
        last_time = _log_time(line) or last_time
        for event in LOG_EVENTS:
            if f"event={event}" in line or (event == "Traceback" and line.startswith("Traceback")):
                counts[event] += 1
        if " WARNING " in line or " ERROR " in line:  # the levelname field of fedq's log format
            counts["warnings and errors"] += 1
        if "event=update_rejected" in line:
            reason = re.search(r"reason=(\S+)", line)
            counts[f"rejected {reason.group(1) if reason else '?'}"] += 1
        if "event=dispatch_held" in line and held_since is None:
            held_since = last_time
        elif "event=dispatch_resumed" in line and held_since is not None and last_time is not None:
            held_seconds += last_time - held_since
            held_since = None
    if held_since is not None and last_time is not None:  # held until the coordinator finished
        held_seconds += last_time - held_since
    return {**counts, "dispatch held seconds": round(held_seconds, 1)} if held_seconds else dict(counts)
