"""One ``throughput.py`` run: a coordinator subprocess on a fresh job, fake workers, and what it measured."""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
import timeit
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.harness import cleanup, mlp_coordinator_command, start, stop_all, wait_exit
from bench.models import HUGE, LARGE, SMALL, MLPTask, parameter_count
from bench.throughput_monitor import CpuMonitor
from bench.throughput_profile import summarise_profile
from bench.throughput_workers import FakeWorkers, ZeroDelta
from fedq.broker.connection import connect
from fedq.broker.topology import Topology
from fedq.common.store import ModelStore
from fedq.common.store.tiers import whole_history


@dataclass(frozen=True)
class Config:
    model: str  # label, e.g. "10k"
    sizes: tuple[int, ...]
    algorithm: str  # fedasync | fedbuff
    buffer_size: int  # updates per version (1 for fedasync)
    versions: int  # --max-versions (full run)
    quick_versions: int

    @property
    def parameters(self) -> int:
        return parameter_count(list(self.sizes))


# Version counts sized so that each run takes ~20 s (quick: ~5 s) on a 2-core machine.
CONFIGS = [
    Config("10k", tuple(SMALL), "fedasync", 1, 4000, 400),
    Config("10k", tuple(SMALL), "fedbuff", 10, 500, 60),
    Config("1M", tuple(LARGE), "fedasync", 1, 400, 80),
    Config("1M", tuple(LARGE), "fedbuff", 10, 90, 20),
    Config("10M", tuple(HUGE), "fedasync", 1, 40, 10),
    Config("10M", tuple(HUGE), "fedbuff", 10, 12, 9),
]


# -- reference arithmetic ----------------------------------------------------


def numpy_add_seconds(elements: int, repeats: int = 30) -> float:
    """Median time of ``acc += w * x`` over ``elements`` float32 values (one update's math)."""
    acc = np.zeros(elements, dtype=np.float32)
    x = np.ones(elements, dtype=np.float32)
    w = np.float32(0.5)
    number = max(1, 200_000 // elements)

    def step():
        nonlocal acc
        acc += w * x

    step()
    return statistics.median(timeit.repeat(step, number=number, repeat=repeats)) / number


def zero_delta(config: Config) -> ZeroDelta:
    """The delta the fake workers send for ``config``: made before the run, so that the limit can
    be measured for its size first."""
    return ZeroDelta(MLPTask(list(config.sizes)).initial_weights(0))


# -- one run -------------------------------------------------------------------


@dataclass
class Result:
    config: Config
    versions: int = 0
    measured: int = 0
    interval_median: float = float("nan")
    interval_p90: float = float("nan")
    updates_per_s_median: float = float("nan")
    updates_per_s_mean: float = float("nan")
    # The bare Redis and RabbitMQ operations of one update, back to back (throughput_limit.py).
    limit_updates_per_s: float = float("nan")
    quorum_limit_updates_per_s: float = float("nan")  # the same through quorum queues (throughput_limit.py)
    # Every measurement of the (classic) limit for this run's sizes, just before and just after it.
    limit_measurements: list[float] = field(default_factory=list)
    aggregation_median: float = float("nan")
    numpy_add: float = float("nan")
    mean_staleness: float = float("nan")
    payload_bytes: int = 0
    inline: bool = True
    worker_updates: int = 0
    wall_seconds: float = 0.0
    redis_bytes_per_version: float = float("nan")
    redis_peak_bytes: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of one core, measured window
    notes: list[str] = field(default_factory=list)


def run_config(config: Config, args: argparse.Namespace, numpy_add: float, delta: ZeroDelta) -> Result:
    result = Result(config, numpy_add=numpy_add)
    versions = config.quick_versions if args.quick else config.versions
    if args.versions_scale != 1.0:
        versions = max(10, int(versions * args.versions_scale))
    job = f"bench-{config.model}-{config.algorithm}-{uuid.uuid4().hex[:8]}"
    topology = Topology(job)
    store = ModelStore.open(args.redis_url, job)

    # Declared here first so the fake workers can consume before the coordinator is up.
    connection = connect(args.amqp_url, name="fedq-bench-admin")
    topology.declare(connection.channel())
    connection.close()

    workers = FakeWorkers(
        job, args.amqp_url, args.redis_url, delta, threads=args.worker_threads, prefetch=max(1, args.concurrency)
    )
    result.payload_bytes, result.inline = len(workers.delta.payload), workers.delta.inline
    command = mlp_coordinator_command(
        job,
        list(config.sizes),
        config.algorithm,
        args.concurrency,
        args.max_seconds,
        args.amqp_url,
        args.redis_url,
        "--max-versions",
        str(versions),
        log_level=args.log_level,
    )
    if config.algorithm == "fedbuff":
        command += ["--buffer-size", str(config.buffer_size)]
    command += shlex.split(args.coordinator_args)
    profile_path = None
    if args.profile:
        profile_path = Path(args.profile_dir) / f"{config.model}-{config.algorithm}.txt"
        command = [
            args.py_spy,
            "record",
            "--idle",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(profile_path),
            "--",
        ] + command
    log_path = Path(args.log_dir) / f"{config.model}-{config.algorithm}.log"
    started = time.monotonic()
    try:
        workers.start()
        process = start(command, log_path)
        monitor = CpuMonitor(process.pid, store, profiled=args.profile)
        code = wait_exit(
            process,
            timeout=args.max_seconds + 60,
            interval=0.25,
            sample=monitor.sample,
            timeout_message=f"coordinator of {job} did not finish; see {log_path}",
        )
        if code != 0:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"coordinator of {job} exited with {code}:\n{tail}")
        result.wall_seconds = time.monotonic() - started
        result.worker_updates = workers.close()
        if workers.errors:
            raise RuntimeError(f"fake worker failed: {workers.errors[0]!r}")
        analyse(result, whole_history(store), args)  # both tiers
        if result.measured:
            result.cpu = monitor.usage(first_version=result.versions - result.measured)
        result.redis_bytes_per_version = monitor.memory_per_version()
        result.redis_peak_bytes = max((used for _, used in monitor.memory), default=0)
        if profile_path is not None:
            result.notes.append(f"profile: {profile_path}")
            result.notes.extend(summarise_profile(profile_path))
    finally:
        stop_all(grace=0)  # a coordinator that still runs (the run failed) is killed at once
        workers.close()
        cleanup(job, args.amqp_url, args.redis_url)
    return result


def analyse(result: Result, history: list[dict], args: argparse.Namespace) -> None:
    entries = sorted(history, key=lambda entry: entry.version)
    result.versions = entries[-1].version if entries else 0
    # Version 0 is the initial model; skip it and a warm-up (connection set-up,
    # first allocations, the workers' first prefetch filling the pipeline).
    warmup = max(args.warmup, int(len(entries) * args.warmup_fraction))
    window = entries[1 + warmup :]
    if len(window) < 3:
        result.notes.append(f"only {len(entries)} versions committed: too few to measure")
        return
    created = [entry.created for entry in entries]
    intervals = [created[index] - created[index - 1] for index in range(1 + warmup, len(entries))]
    result.measured = len(intervals)
    result.interval_median = statistics.median(intervals)
    result.interval_p90 = float(np.percentile(intervals, 90))
    result.updates_per_s_median = result.config.buffer_size / result.interval_median
    span = created[-1] - created[warmup]
    result.updates_per_s_mean = sum(entry.updates_applied for entry in window) / span
    result.aggregation_median = statistics.median(entry.aggregation_seconds for entry in window)
    result.mean_staleness = statistics.fmean(entry.mean_staleness for entry in window)
