"""``fedq demo``: a real federation on one machine.

Starts one coordinator and several worker *processes* that talk only through
RabbitMQ and Redis, follows the job's history stream in Redis to show progress,
and prints a summary once the coordinator stops (target reached or time out).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from fedq.broker.connection import connect
from fedq.common.cli import UserError
from fedq.common.records import VersionRecord
from fedq.common.settings import (
    CONNECTION_OPTIONS,
    Option,
    add_options,
    positive_float,
    positive_int,
    redact_url,
    resolve,
)
from fedq.common.store import ModelStore, connect_redis
from fedq.coordinator.algorithms.registry import ALGORITHMS

HELP = (
    "Run a coordinator and worker processes on the built-in digits task until the global model "
    "reaches the target accuracy, showing progress and a summary."
)

# Each run is a job of its own, so that people sharing one RabbitMQ and Redis never clobber each
# other's demo; the default is a description, not a name (no job name holds a space).
FRESH_JOB = "a new one each run, demo-<yyyymmdd-hhmmss UTC>-<4 hex digits>"
OPTIONS = (
    [
        Option(
            "job",
            CONNECTION_OPTIONS[0].parse,
            FRESH_JOB,
            "name of the federation; an existing job is continued only with --resume",
        )
    ]
    + CONNECTION_OPTIONS[1:]
    + [
        Option("workers", positive_int, 4, "worker processes to start"),
        Option("algorithm", str, "fedasync", "aggregation", choices=tuple(ALGORITHMS)),
        Option("target", positive_float, 0.90, "stop at this test accuracy"),
        Option("max_seconds", positive_float, 600.0, "give up after this many seconds"),
    ]
)
# Settings that make the small digits MLP converge in seconds: a few passes over
# each worker's ~300 examples per task, and every worker's partition covering a
# share of the data (num_partitions = workers) so the union is the full set.
DEMO_TRAINING = ["--local-epochs", "2", "--learning-rate", "0.1", "--batch-size", "16"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OPTIONS)
    parser.add_argument("--resume", action="store_true", help="continue the existing job named with --job")
    parser.add_argument("--log-dir", default=None, help="where process logs go (default: a temporary folder)")


def _fedq(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedq.common.cli", *args]


def _progress_line(entry: VersionRecord, started: float, applied: int, stalenesses: list[int]) -> str:
    accuracy = entry.metrics.get("accuracy")
    accuracy_text = "  n/a " if accuracy is None else f"{accuracy:.4f}"
    mean = sum(stalenesses) / len(stalenesses) if stalenesses else 0.0
    return (
        f"[{time.monotonic() - started:6.1f}s] version {entry.version:5d}  accuracy {accuracy_text}  "
        f"updates applied {applied:5d}  staleness mean {mean:4.2f} max {max(stalenesses, default=0):3d}"
    )


# Without a terminal (a log, CI), a line is printed when the head moves, or this often.
QUIET_SECONDS = 10.0


def follow(
    store: ModelStore, redis_url: str, coordinator: subprocess.Popen, started: float, workers: int = 0
) -> dict[str, Any]:
    """Print progress from the history stream until the coordinator exits; return totals.
    Until the first update is applied, say that the workers are still starting (each imports torch
    and loads its data: seconds, on a busy machine tens of seconds)."""
    reader = connect_redis(redis_url, job=store.job, blocking=True)
    last_id, applied = "0-0", 0
    stalenesses: list[int] = []
    last_entry: VersionRecord | None = None
    last_print, shown = 0.0, None
    interactive = sys.stdout.isatty()
    while True:
        exited = coordinator.poll() is not None
        last_id, records = store.versions.follow(reader, last_id)
        for entry in records:
            applied += len(entry.updates)
            stalenesses.extend(update.staleness for update in entry.updates)
            last_entry = entry
        quiet = time.monotonic() - last_print
        due = quiet > 1.0 if interactive else (quiet > QUIET_SECONDS or (quiet > 1.0 and last_entry is not shown))
        if last_entry is not None and (due or exited):
            line = _progress_line(last_entry, started, applied, stalenesses)
            if applied == 0 and workers:
                line += f"  waiting for the first update: {len(store.workers.live())} of {workers} workers up"
            print(("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True)
            last_print, shown = time.monotonic(), last_entry
        if exited and not records:
            if interactive:
                print()
            return {"applied": applied, "stalenesses": stalenesses, "last": last_entry}


# Two runs in the same second draw the same name once in 65536: a retry or two settles it.
FRESH_NAME_ATTEMPTS = 3


def fresh_job_name() -> str:
    return f"demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def job_exists(store: ModelStore, amqp_url: str) -> bool:
    """Whether anything of the job is on the servers: one of its queues, or a Redis key.
    (Connecting to RabbitMQ first also tells a user whose broker is down before anything starts.)"""
    import pika.exceptions

    from fedq.broker.topology import Topology

    connection = connect(amqp_url, name="fedq-demo-check", attempts=2)
    try:
        for queue in Topology(store.job).queues:
            try:
                connection.channel().queue_declare(queue, passive=True)
                return True
            except pika.exceptions.ChannelClosedByBroker:
                continue  # a missing queue closes only its channel
    finally:
        connection.close()
    return next(store.redis.scan_iter(match=store.keys.all(), count=1000), None) is not None


def choose_job(values: dict[str, Any], resume: bool, store_for) -> ModelStore:
    """The job this run trains: a fresh one, or the one named with --job. The demo deletes
    nothing, so a job it did not create is only ever continued, and only when asked to."""
    if values["job"] == FRESH_JOB:
        if resume:
            raise UserError("--resume continues an existing job: name it with --job NAME")
        for _ in range(FRESH_NAME_ATTEMPTS):
            store = store_for(fresh_job_name())
            if not job_exists(store, values["amqp_url"]):
                return store
        raise UserError(
            f"{FRESH_NAME_ATTEMPTS} fresh job names in a row already exist on these servers; "
            "name a new job with --job NAME"
        )
    store = store_for(values["job"])
    if not resume and job_exists(store, values["amqp_url"]):
        raise UserError(
            f"job {store.job!r} already exists on these servers; continue it with --resume, or leave "
            f"out --job to train a new one"
        )
    return store


def connection_flags_to_print(values: dict[str, Any]) -> str:
    """The connection flags the printed commands need: those that differ from the defaults, passwords hidden."""
    flags = []
    for option in CONNECTION_OPTIONS[1:]:
        value = values.get(option.name)
        if value is not None and value != option.default:
            flags += [option.flag, redact_url(value) if option.name.endswith("_url") else value]
    return "".join(f" {flag}" for flag in flags)


def print_next_steps(job: str, values: dict[str, Any]) -> None:
    flags = connection_flags_to_print(values)
    print(f"\njob {job!r} stays on the servers:")
    print(f"  inspect it   fedq history --job {job}{flags}")
    print(f"  remove it    fedq delete --job {job} --archive{flags}", flush=True)


def main(args: argparse.Namespace) -> int:
    values = resolve(args, OPTIONS)
    store = choose_job(values, args.resume, lambda name: ModelStore.open(values["redis_url"], name))
    job = store.job
    try:
        return run(store, values, args.log_dir)
    finally:
        print_next_steps(job, values)


def run(store: ModelStore, values: dict[str, Any], log_dir: str | None) -> int:
    job, amqp_url, redis_url = store.job, values["amqp_url"], values["redis_url"]
    log_dir = log_dir or tempfile.mkdtemp(prefix=f"fedq-{job}-")
    os.makedirs(log_dir, exist_ok=True)
    workers = values["workers"]
    connection_flags = ["--job", job, "--amqp-url", amqp_url, "--redis-url", redis_url]
    print(
        f"fedq demo: job {job!r}, {workers} worker processes, {values['algorithm']}, "
        f"target accuracy {values['target']:.2f}; logs in {log_dir}",
        flush=True,
    )
    started = time.monotonic()
    processes: list[subprocess.Popen] = []
    try:
        with open(os.path.join(log_dir, "coordinator.log"), "w") as log_file:
            coordinator = subprocess.Popen(
                _fedq(
                    "coordinator",
                    *connection_flags,
                    "--task",
                    "digits",
                    "--task-params",
                    json.dumps({"num_partitions": workers}),
                    "--algorithm",
                    values["algorithm"],
                    "--concurrency",
                    str(workers),
                    "--target",
                    str(values["target"]),
                    "--max-seconds",
                    str(values["max_seconds"]),
                    *DEMO_TRAINING,
                ),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        processes.append(coordinator)
        for index in range(workers):
            with open(os.path.join(log_dir, f"worker-{index}.log"), "w") as log_file:
                processes.append(
                    subprocess.Popen(
                        _fedq(
                            "worker",
                            *connection_flags,
                            "--worker-id",
                            f"demo-worker-{index}",
                            "--partition",
                            str(index),
                        ),
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                )
        totals = follow(store, redis_url, coordinator, started, workers)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    wall_seconds = time.monotonic() - started
    return print_summary(store, totals, wall_seconds, values["target"], coordinator.returncode, log_dir)


def print_summary(
    store: ModelStore, totals: dict[str, Any], wall_seconds: float, target: float, coordinator_exit: int, log_dir: str
) -> int:
    state = store.status.load()
    head = store.versions.head()
    accuracy = store.versions.load_meta(head).metrics.get("accuracy") if head is not None else None
    stalenesses = totals["stalenesses"]
    rejected = store.counters.get("rejected")
    skipped = store.counters.get("skipped")
    print("\nsummary")
    print(f"  versions committed   {head}")
    print(f"  updates applied      {totals['applied']}")
    print(f"  updates rejected     {sum(rejected.values())} {rejected or ''}")
    print(f"  duplicates skipped   {sum(skipped.values())}")
    if stalenesses:
        print(f"  staleness            mean {sum(stalenesses) / len(stalenesses):.2f}, max {max(stalenesses)}")
    print(f"  final accuracy       {'n/a' if accuracy is None else f'{accuracy:.4f}'}")
    print(f"  wall time            {wall_seconds:.1f} s")
    print(f"  stopped because      {state.get('reason', 'the coordinator exited with code %s' % coordinator_exit)}")
    if accuracy is not None and accuracy >= target:
        return 0
    print(f"fedq demo: the target accuracy {target:.2f} was not reached; see the logs in {log_dir}", file=sys.stderr)
    return 1
