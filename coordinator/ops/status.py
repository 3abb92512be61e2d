"""``fedq status``: a job's head version, queue depths and consumers."""
from __future__ import annotations

import argparse
import json
import time

from fedq.broker.connection import connect
from fedq.broker.depth import queue_depths
from fedq.broker.topology import Topology
from fedq.common.settings import CONNECTION_OPTIONS, add_options, resolve
from fedq.common.store import ModelStore, TamperedVersionError, connect_redis

HELP = "Show a job's head model version, the depth of each of its queues and their consumers."


def remove_job(amqp_url: str, store: ModelStore) -> None:
    """Delete every trace of a job: its Redis keys, then its queues and exchanges."""
    store.delete_job()
    connection = connect(amqp_url, name="fedq-admin", attempts=2)
    try:
        Topology(store.job).delete(connection.channel())
    finally:
        connection.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CONNECTION_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


# The window over which `status`/`monitor` report rates and staleness.
RATE_WINDOW_SECONDS = 30.0


def training_progress(store: ModelStore, now: float) -> dict:
    """Update rate, staleness and latest metrics from the recent history."""
    recent = [entry for entry in store.versions.recent_history(500) if entry.version > 0]
    window = [entry for entry in recent if entry.created >= now - RATE_WINDOW_SECONDS]
    staleness = [update.staleness for entry in window for update in entry.updates]
    scored = [entry for entry in recent if entry.metrics]
    return {
        "versions_per_second": len(window) / RATE_WINDOW_SECONDS,
        "updates_per_second": sum(len(entry.updates) for entry in window) / RATE_WINDOW_SECONDS,
        "mean_staleness": sum(staleness) / len(staleness) if staleness else None,
        "max_staleness": max(staleness) if staleness else None,
        "latest_metrics": scored[-1].metrics if scored else {},
        "last_commit": recent[-1].created if recent else None,
    }


def collect(amqp_url: str, redis_url: str, job: str, store: ModelStore | None = None,
            management_url: str | None = None) -> dict:
    store = store or ModelStore(connect_redis(redis_url), job)
    try:
        head, problem = store.versions.head(), None
    except TamperedVersionError as error:
        head, problem = store.versions.last_committed(), str(error)
    source, depths = queue_depths(amqp_url, list(Topology(job).queues), management_url)
    metrics = store.versions.load_meta(head).metrics if head is not None else {}
    return {
        "job": job, "head": head, "problem": problem, "state": store.status.load(), "metrics": metrics,
        "in_flight": len(store.ledger.open_tasks()), "rejected": store.counters.get("rejected"),
        "skipped": store.counters.get("skipped"), "depth_source": source,
        "queues": [{"name": depth.name, "exists": depth.exists, "ready": depth.ready, "unacked": depth.unacked,
                    "consumers": depth.consumers} for depth in depths],
        "workers": store.workers.live(), "progress": training_progress(store, time.time()),
    }


def _cell(value) -> str:
    return "?" if value is None else str(value)


def main(args: argparse.Namespace) -> int:
    values = resolve(args, CONNECTION_OPTIONS)
    report = collect(values["amqp_url"], values["redis_url"], values["job"], management_url=values["management_url"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    head = "none (no coordinator has run)" if report["head"] is None else report["head"]
    state = report["state"].get("status", "unknown")
    print(f"job {report['job']}: head version {head}, {state}, {report['in_flight']} task(s) in flight")
    if report["problem"]:
        print(f"  PROBLEM: {report['problem']}")
    if report["metrics"]:
        print("  latest metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in report["metrics"].items()))
    progress = report["progress"]
    if progress["mean_staleness"] is not None:
        print(f"  last {RATE_WINDOW_SECONDS:.0f} s: {progress['updates_per_second']:.2f} updates/s, staleness mean "
              f"{progress['mean_staleness']:.2f} max {progress['max_staleness']}")
    print(f"  {len(report['workers'])} worker(s) alive: "
          + (", ".join(worker["worker_id"] for worker in report["workers"]) or "none"))
    if report["rejected"] or report["skipped"]:
        print(f"  rejected {report['rejected'] or '{}'}, skipped {report['skipped'] or '{}'}")
    print(f"  {'queue':<32} {'ready':>7} {'unacked':>8} {'consumers':>10}")
    for queue in report["queues"]:
        if not queue["exists"]:
            print(f"  {queue['name']:<32} (not declared)")
            continue
        print(f"  {queue['name']:<32} {_cell(queue['ready']):>7} {_cell(queue['unacked']):>8} "
              f"{_cell(queue['consumers']):>10}")
    if report["depth_source"] == "amqp":
        print("  (management API not reachable: counts from AMQP, which reports ready messages only; "
              "enable it with 'rabbitmq-plugins enable rabbitmq_management')")
    return 0
