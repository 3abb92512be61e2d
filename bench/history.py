"""The two-tier history under a long run: Redis memory stays flat while the archive grows with the updates.

Run from the repository root (the coordinator loads ``bench.models:MLPTask`` by module path):

    .venv/bin/python bench/history.py                           # 1M-parameter MLP, FedBuff K=10, 30 minutes
    .venv/bin/python bench/history.py --minutes 3               # the same, shorter
    .venv/bin/python bench/history.py --model images --minutes 8   # ResNet, >= 10M parameters, real training
    .venv/bin/python bench/history.py --archive s3://bucket/prefix # any fsspec URL (AWS_* in the environment)

It starts a real coordinator (``--archive`` a fresh folder, ``--hot-versions``)
and real ``fedq worker`` processes, all talking only through RabbitMQ and
Redis. Every ``--sample-seconds`` it samples the job's Redis memory (MEMORY
USAGE over the job's keys), Redis's own ``used_memory``, the archive's size,
and the versions and updates committed so far. At the end it stops the
coordinator (its archiver makes a last pass), runs ``fedq replay`` of the
whole run (reading the archive and Redis) and prints:

* the samples, and the job's Redis memory after warm-up: median, max, and the
  slope (MiB per minute, least squares; flat means about 0);
* the archive's growth rate against the rate at which update bytes arrived;
* throughput (updates/s, versions/s), and the replay's verdict and duration.

The job and its archive are deleted afterwards unless ``--keep``. The 1M
model's workers are paced (``--slowdown``) so a 30-minute run writes about
15 GB to the archive, not 200.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import cleanup, fedq_command, start, stop_all  # noqa: E402
from fedq.common.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL  # noqa: E402
from fedq.common.store import ModelStore  # noqa: E402
from fedq.common.store.archive import Archive  # noqa: E402

MODELS = {
    # name: (task, task params, coordinator flags, worker flags, parameters)
    "1M": (
        "bench.models:MLPTask",
        {"sizes": [1000, 990, 10]},
        ["--algorithm", "fedbuff", "--buffer-size", "10", "--concurrency", "12", "--max-staleness", "10"],
        ["--slowdown", "1.5"],
        1_000_900,
    ),
    "images": (
        "images",
        {},
        ["--algorithm", "fedbuff", "--buffer-size", "3", "--concurrency", "3", "--max-staleness", "4"],
        [],
        None,
    ),
}


def sample(store: ModelStore, archive_url: str) -> dict:
    records = store.versions.recent_history(1)
    head = store.versions.last_committed()
    job_bytes = sum(store.memory_usage().values())
    archive = Archive(archive_url).job(store.job)
    return {
        "t": time.time(),
        "head": head,
        "job_redis_bytes": job_bytes,
        "redis_used_memory": int(store.redis.info("memory")["used_memory"]),
        "archive_bytes": archive.size(),
        "archived_through": archive.last_archived(refresh=False),
        "last_commit": records[-1].created if records else None,
    }


def updates_applied(store: ModelStore, archive_url: str) -> int:
    """Updates applied over the whole run, counted in both tiers."""
    from fedq.common.store.tiers import TieredHistory

    history = TieredHistory(store, Archive(archive_url).job(store.job))
    return sum(len(record.updates) for record in history.records())


def slope_mib_per_minute(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    numerator = sum((t - mean_t) * (y - mean_y) for t, y in points)
    denominator = sum((t - mean_t) ** 2 for t, _ in points) or 1.0
    return numerator / denominator * 60 / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="1M")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sample-seconds", type=float, default=15.0)
    parser.add_argument("--warmup-fraction", type=float, default=0.2, help="samples before this share are warm-up")
    parser.add_argument("--archive", default=None, help="archive URL (default: a fresh temporary folder)")
    parser.add_argument("--redis-budget-mb", type=int, default=512)
    parser.add_argument("--keep", action="store_true", help="keep the job and its archive")
    parser.add_argument("--json", default=None, help="also write the samples and summary here")
    args = parser.parse_args(argv)

    task, task_params, coordinator_flags, worker_flags, _ = MODELS[args.model]
    job = f"bench-history-{args.model.lower()}-{uuid.uuid4().hex[:6]}"
    logs = Path(tempfile.mkdtemp(prefix="fedq-bench-history-"))
    archive_url = args.archive or str(logs / "archive")
    store = ModelStore.open(DEFAULT_REDIS_URL, job)
    print(
        f"job {job}: {args.model} model, {args.workers} workers, {args.minutes:g} minutes; archive {archive_url}; "
        f"logs {logs}",
        flush=True,
    )
    coordinator = start(
        fedq_command(
            "coordinator",
            "--job",
            job,
            "--task",
            task,
            "--task-params",
            json.dumps(task_params),
            *coordinator_flags,
            "--eval-every",
            "0",
            "--max-seconds",
            str(args.minutes * 60),
            "--archive",
            archive_url,
            "--archive-seconds",
            "10",
            "--checkpoint-every",
            "50",
            "--redis-budget-mb",
            str(args.redis_budget_mb),
        ),
        logs / "coordinator.log",
    )
    # A worker never imports code named in Redis: a plugin task is given to it explicitly.
    plugin = [] if "." not in task else ["--task", task, "--task-params", json.dumps(task_params)]
    workers = [
        start(
            fedq_command("worker", "--job", job, "--worker-id", f"bench-{index}", *plugin, *worker_flags),
            logs / f"worker-{index}.log",
        )
        for index in range(args.workers)
    ]
    samples: list[dict] = []
    started = time.time()
    try:
        while coordinator.poll() is None:
            time.sleep(args.sample_seconds)
            if all(worker.poll() is not None for worker in workers):
                print(f"every worker exited; see {logs}/worker-*.log")
                return 1
            if store.versions.last_committed() is None:
                continue
            point = sample(store, archive_url)
            samples.append(point)
            print(
                f"[{point['t'] - started:7.0f} s] head {point['head']:>6}  job Redis "
                f"{point['job_redis_bytes'] / 2**20:8.1f} MiB  Redis used {point['redis_used_memory'] / 2**20:8.1f}"
                f" MiB  archive {point['archive_bytes'] / 2**30:7.2f} GiB (through {point['archived_through']})",
                flush=True,
            )
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(120)
        if coordinator.returncode != 0:
            print(f"the coordinator exited with {coordinator.returncode}; see {logs / 'coordinator.log'}")
            return 1
        summary = summarise(store, archive_url, samples, started, args)
        replay_started = time.monotonic()
        replay = subprocess.run(
            fedq_command("replay", "--job", job, "--archive", archive_url), cwd=ROOT, capture_output=True, text=True
        )
        summary["replay_seconds"] = round(time.monotonic() - replay_started, 1)
        # Its verdict is on stdout; an error (one sentence) on stderr, after the progress line.
        summary["replay"] = (replay.stdout.strip() or replay.stderr.strip().replace("\r", "\n")).splitlines()[-1]
        summary["replay_ok"] = replay.returncode == 0
        print(f"fedq replay --from 0 --to HEAD ({summary['replay_seconds']} s): {summary['replay']}")
        if args.json:
            Path(args.json).write_text(json.dumps({"samples": samples, "summary": summary}, indent=2))
        return 0 if summary["replay_ok"] else 1
    finally:
        stop_all()
        if not args.keep:
            cleanup(job, DEFAULT_AMQP_URL, DEFAULT_REDIS_URL)
            Archive(archive_url).job(job).delete()  # also when the coordinator never recorded it
            if args.archive is None:
                shutil.rmtree(logs / "archive", ignore_errors=True)


def summarise(
    store: ModelStore, archive_url: str, samples: list[dict], started: float, args: argparse.Namespace
) -> dict:
    final = sample(store, archive_url)
    head = final["head"]
    updates = updates_applied(store, archive_url)
    elapsed = (final["last_commit"] or final["t"]) - started
    warm = samples[int(len(samples) * args.warmup_fraction) :] or samples
    job_mib = [point["job_redis_bytes"] / 2**20 for point in warm]
    first, last = warm[0], warm[-1]
    span = max(last["t"] - first["t"], 1e-9)
    versions_in_span = last["head"] - first["head"]
    archive_rate = (last["archive_bytes"] - first["archive_bytes"]) / span
    # Every update carries one delta the size of the model: what arrives, in bytes per second.
    model_bytes = store.redis.strlen(store.keys.model(head))
    update_rate = versions_in_span * args_buffer(args) * model_bytes / span
    summary = {
        "versions": head,
        "updates_applied": updates,
        "seconds": round(elapsed, 1),
        "updates_per_second": round(updates / max(elapsed, 1e-9), 2),
        "versions_per_second": round(head / max(elapsed, 1e-9), 3),
        "model_mib": round(model_bytes / 2**20, 2),
        "job_redis_mib_after_warmup": {
            "median": round(statistics.median(job_mib), 1),
            "max": round(max(job_mib), 1),
            "min": round(min(job_mib), 1),
            "slope_mib_per_minute": round(
                slope_mib_per_minute([(point["t"], point["job_redis_bytes"]) for point in warm]), 2
            ),
        },
        "redis_budget_mib": args.redis_budget_mb,
        "archive_gib": round(final["archive_bytes"] / 2**30, 2),
        "archive_mib_per_second": round(archive_rate / 2**20, 2),
        "update_mib_per_second": round(update_rate / 2**20, 2),
    }
    print("summary: " + json.dumps(summary, indent=2))
    return summary


def args_buffer(args: argparse.Namespace) -> int:
    flags = MODELS[args.model][2]
    return int(flags[flags.index("--buffer-size") + 1])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
