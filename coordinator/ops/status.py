"""``fedq status``: a job's head version, queue depths and consumers, and how its history is kept:
the job's Redis memory against its budget, and the archive (its size and how far it trails the head)."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from fedq.broker.connection import connect
from fedq.broker.depth import queue_depths
from fedq.broker.topology import Topology
from fedq.common import privacy
from fedq.common.cli import human_size
from fedq.common.records import VersionRecord
from fedq.common.settings import CONNECTION_OPTIONS, add_options, resolve
from fedq.common.store import ModelStore, TamperedVersionError
from fedq.common.store.archive import Archive
from fedq.common.store.fleet import WorkerRecord
from fedq.coordinator.service.fleet import contribution, contribution_warnings

HELP = (
    "Show a job's head model version, the depth of each of its queues and their consumers, its Redis memory "
    "against its budget and its archive's size and lag, with a WARNING line for each that needs attention."
)

# Redis memory past this share of the job's budget is a warning (the coordinator's archiver logs the same).
MEMORY_WARNING_FRACTION = 0.8
# The archive may trail the head by this many hot windows before we call the archiver stuck...
ARCHIVE_LAG_WINDOWS = 2
# ...or by the versions the job commits in this long, whichever is more: a fast job commits many
# versions between two passes of the archiver (every 10 s by default), and that is no fault.
ARCHIVE_LAG_SECONDS = 60.0
# Listing an object store that does not answer must not hang `status` (s3fs retries for minutes).
ARCHIVE_READ_SECONDS = 10.0


def remove_job(amqp_url: str, store: ModelStore, *, archive: bool = False) -> None:
    """Delete every trace of a job: with ``archive``, its archive segments first (their URL is
    recorded in Redis, so a failure leaves the job whole to try again), then its Redis keys,
    then its queues and exchanges."""
    recorded_url = store.status.archive_url() if archive else None
    if recorded_url is not None:
        Archive(recorded_url).job(store.job).delete()
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


def _mib(nbytes: int | float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _within(seconds: float, function: Callable[[], Any]) -> Any:
    """``function()``, or TimeoutError when it takes longer than ``seconds`` (it is left running, in a
    daemon thread that cannot keep the process alive)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="fedq-archive-read", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class ArchiveReader:
    """Reads the size of a job's archive (a listing), keeping the opened filesystem between reads and
    each answer for ``max_age`` seconds: a monitor refreshing every second would otherwise list an
    object store every second. A failure is an answer too (kept as long): it becomes a warning."""

    def __init__(self, max_age: float = 0.0, timeout: float = ARCHIVE_READ_SECONDS):
        self.max_age = max_age
        self.timeout = timeout
        self._archives: dict[tuple[str, str], Any] = {}
        self._answers: dict[tuple[str, str], tuple[float, int | None, str | None]] = {}

    def size(self, url: str, job: str) -> tuple[int | None, str | None]:
        """(bytes, None), or (None, why the archive could not be read)."""
        key = (url, job)
        answer = self._answers.get(key)
        if answer is not None and time.monotonic() - answer[0] < self.max_age:
            return answer[1], answer[2]
        try:
            nbytes, problem = _within(self.timeout, lambda: self._job_archive(url, job).size()), None
        except Exception as error:  # noqa: BLE001 - any failure of any filesystem: a warning, not a traceback
            nbytes, problem = None, str(error) or type(error).__name__
            self._archives.pop(key, None)  # open it afresh next time (credentials or network may be back)
        self._answers[key] = (time.monotonic(), nbytes, problem)
        return nbytes, problem

    def _job_archive(self, url: str, job: str):
        from fedq.common.store.archive import Archive  # fsspec is imported only when there is an archive

        key = (url, job)
        if key not in self._archives:
            self._archives[key] = Archive(url).job(job)
        return self._archives[key]


def archive_lag_limit(hot_versions: int, versions_per_second: float) -> int:
    """How many versions the archive may trail the head before the archiver counts as stuck."""
    return max(ARCHIVE_LAG_WINDOWS * max(hot_versions, 1), int(versions_per_second * ARCHIVE_LAG_SECONDS + 0.5))


def _optional_int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)


def storage_health(
    store: ModelStore, head: int | None, versions_per_second: float = 0.0, archive_reader: ArchiveReader | None = None
) -> dict:
    """The job's Redis memory against its budget, its archive (size, lag), and warnings about either.

    {"redis_memory_bytes", "redis_memory_by_kind", "redis_budget_bytes", "archive": {"url", "bytes",
    "archived_through", "lag_versions", "hot_versions", "pruned_through", "recorded"}, "warnings": [...]}
    """
    settings = store.status.archive_settings()
    warnings: list[str] = []
    try:
        by_kind = store.memory_usage()
        used: int | None = sum(by_kind.values())
    except redis.ResponseError as error:  # an ACL without MEMORY USAGE or SCAN: the rest still helps
        by_kind, used = {}, None
        warnings.append(f"cannot measure the job's Redis memory: {error}")
    budget_mb = settings.get("redis_budget_mb")
    budget = int(budget_mb * 2**20) if budget_mb else None
    url = settings.get("url")
    hot_versions = int(settings.get("hot_versions") or 0)
    reads = store.redis.pipeline(transaction=False)
    reads.get(store.keys.archived_through)
    reads.get(store.keys.pruned_through)
    archived_through, pruned_through = (_optional_int(raw) for raw in reads.execute())

    archive: dict[str, Any] = {
        "url": url,
        "bytes": None,
        "archived_through": archived_through,
        "lag_versions": None,
        "hot_versions": hot_versions or None,
        "pruned_through": pruned_through,
        "recorded": bool(settings),
    }
    if used is not None and budget and used > MEMORY_WARNING_FRACTION * budget:
        advice = (
            "start the coordinator with --archive DIR or URL, so that older history leaves Redis"
            if settings and url is None
            else "lower --hot-versions (or --max-staleness), or raise --redis-budget-mb and Redis's maxmemory"
        )
        warnings.append(
            f"Redis memory of job {store.job!r} is {_mib(used)}, {100 * used / budget:.0f} % of its "
            f"{_mib(budget)} budget (warning above {MEMORY_WARNING_FRACTION:.0%}): {advice}"
        )
    if url is not None:
        archive["bytes"], problem = (archive_reader or ArchiveReader()).size(url, store.job)
        if problem is not None:
            warnings.append(f"cannot read the archive {url}: {problem}")
        if head is not None:
            archive["lag_versions"] = head - (archived_through if archived_through is not None else -1)
            limit = archive_lag_limit(hot_versions, versions_per_second)
            if archive["lag_versions"] > limit:
                warnings.append(
                    f"the archive is {archive['lag_versions']} versions behind the head (more than "
                    f"{limit}): is the archiver stuck? Look for event=archive_failed in the coordinator's "
                    f"log, or move the history now with `fedq archive --job {store.job}`"
                )
    return {
        "redis_memory_bytes": used,
        "redis_memory_by_kind": by_kind,
        "redis_budget_bytes": budget,
        "archive": archive,
        "warnings": warnings,
    }


def collect(
    amqp_url: str,
    redis_url: str,
    job: str,
    store: ModelStore | None = None,
    management_url: str | None = None,
    archive_reader: ArchiveReader | None = None,
) -> dict:
    """Everything `status` shows, as a dict (`status --json` prints it). ``archive_reader`` keeps
    archive sizes between calls (a monitor's refreshes)."""
    store = store or ModelStore.open(redis_url, job)
    try:
        head, problem = store.versions.head(), None
    except TamperedVersionError as error:
        head, problem = store.versions.last_committed(), str(error)
    source, depths = queue_depths(amqp_url, list(Topology(job).queues), management_url)
    head_record = store.versions.load_meta(head) if head is not None else None
    metrics = head_record.metrics if head_record is not None else {}
    now = time.time()
    progress = training_progress(store, now)
    live = store.workers.live()
    fleet = store.fleet.load()
    open_tasks = store.ledger.open_tasks().values()
    return {
        "job": job,
        "head": head,
        "problem": problem,
        "state": store.status.load(),
        "metrics": metrics,
        "uplink": _uplink(head_record),
        "privacy": _privacy(head_record),
        "in_flight": sum(not task.reserved for task in open_tasks),
        # Opened ahead of dispatch by the last commit (common/store/ledger.py): some may be out.
        "reserved": sum(task.reserved for task in open_tasks),
        "rejected": store.counters.get("rejected"),
        "skipped": store.counters.get("skipped"),
        "depth_source": source,
        "queues": [
            {
                "name": depth.name,
                "exists": depth.exists,
                "ready": depth.ready,
                "unacked": depth.unacked,
                "consumers": depth.consumers,
            }
            for depth in depths
        ],
        "workers": live,
        "progress": progress,
        "contribution": worker_rows(live, fleet),
        **_with_warnings(
            storage_health(store, head, progress["versions_per_second"], archive_reader),
            contribution_warnings(fleet, [worker["worker_id"] for worker in live], now),
        ),
    }


def _with_warnings(health: dict, warnings: list[str]) -> dict:
    return health | {"warnings": health["warnings"] + warnings}


def worker_rows(live: list[dict], fleet: dict) -> list[dict]:
    """One row per worker alive or that ever sent an update: its data (partition, or its own
    --data), speed, expected staleness, and its share of the applied updates against its share
    of the examples."""
    liveness = {worker["worker_id"]: worker for worker in live}
    # A live worker the coordinator has not measured yet gets an empty record's row.
    records = {worker_id: WorkerRecord(worker_id) for worker_id in liveness} | fleet
    return [
        {**row, "alive": row["worker_id"] in liveness, "data": _data_of(liveness.get(row["worker_id"], {}))}
        for row in contribution(records)
    ]


def _data_of(liveness: dict) -> str:
    if not liveness:
        return "-"
    if liveness.get("partition_source") == "data":
        return f"--data {liveness.get('data')}"
    partition = liveness.get("partition")
    if partition is None:
        return "waiting for a lease"
    return f"partition {partition}" + (" (leased)" if liveness.get("partition_source") == "lease" else "")


def worker_table_rows(report: dict) -> list[tuple[str, ...]]:
    """The per-worker table as text cells (status and monitor print the same)."""
    cells: list[tuple[str, ...]] = []
    for row in report["contribution"]:
        rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(row["rejected"].items())) or "-"
        cells.append(
            (
                row["worker_id"] + ("" if row["alive"] else " (gone)"),
                row["data"],
                "-" if row["round_trip_s"] is None else f"{row['round_trip_s']:.2f}",
                "-" if row["steps_per_second"] is None else f"{row['steps_per_second']:.0f}",
                "-" if row["expected_staleness"] is None else f"{row['expected_staleness']:.1f}",
                str(row["applied"]),
                f"{100 * row['applied_share']:.0f} %",
                f"{100 * row['weight_share']:.0f} %",
                f"{100 * row['data_share']:.0f} %",
                rejected,
            )
        )
    return cells


WORKER_COLUMNS = (
    "worker",
    "data",
    "s/task",
    "steps/s",
    "exp. staleness",
    "applied",
    "of updates",
    "of weight",
    "of examples",
    "rejected",
)


def memory_line(report: dict) -> str:
    """The job's Redis memory against its budget, in words."""
    used, budget = report["redis_memory_bytes"], report["redis_budget_bytes"]
    if used is None:
        return "Redis memory unknown"
    if not budget:
        return f"Redis memory {_mib(used)} (no budget recorded: no coordinator has run)"
    return f"Redis memory {_mib(used)} of a {_mib(budget)} budget ({100 * used / budget:.0f} %)"


def archive_line(report: dict) -> str:
    """Where the job's older history goes, how big it is and how far it trails the head, in words."""
    archive = report["archive"]
    if archive["url"] is None:
        if archive["recorded"]:
            return "no archive: Redis keeps everything"
        return "archive: not recorded (no coordinator has run)"
    size = "size unknown" if archive["bytes"] is None else human_size(archive["bytes"])
    through = archive["archived_through"]
    held = "holds no version yet" if through is None else f"holds versions 0..{through}"
    lag = "" if archive["lag_versions"] is None else f", {archive['lag_versions']} version(s) behind the head"
    oldest_hot = (archive["pruned_through"] if archive["pruned_through"] is not None else -1) + 1
    hot = "" if report["head"] is None else f"; Redis holds versions {oldest_hot}..{report['head']}"
    return f"archive {archive['url']}: {size}, {held}{lag}{hot}"


def _cell(value) -> str:
    return "?" if value is None else str(value)


def _uplink(record: VersionRecord | None) -> str | None:
    """The job's update encoding, as the head's config records it (None: full float32)."""
    config = (record.config if record is not None else None) or {}
    if "compression" not in config:
        return None
    return config["compression"] + (" with error feedback" if config.get("error_feedback") else "")


def _privacy(record: VersionRecord | None) -> dict | None:
    """Differential privacy spent at the head: mode, epsilon, delta, steps, budget (None: no DP)."""
    config = (record.config if record is not None else None) or {}
    if record is None or config.get("dp", "off") == "off":
        return None
    return {
        "mode": config["dp"],
        "epsilon": record.epsilon,
        "delta": config["dp_delta"],
        "steps": record.dp_steps,
        "budget": config.get("dp_epsilon_budget"),
        "summary": privacy.summary(config, record.epsilon, record.dp_steps),
    }


def main(args: argparse.Namespace) -> int:
    values = resolve(args, CONNECTION_OPTIONS)
    report = collect(values["amqp_url"], values["redis_url"], values["job"], management_url=values["management_url"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    head = "none (no coordinator has run)" if report["head"] is None else report["head"]
    state = report["state"].get("status", "unknown")
    ahead = f" (and {report['reserved']} opened ahead of dispatch)" if report["reserved"] else ""
    print(f"job {report['job']}: head version {head}, {state}, {report['in_flight']} task(s) in flight{ahead}")
    if report["problem"]:
        print(f"  PROBLEM: {report['problem']}")
    if report["metrics"]:
        print("  latest metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in report["metrics"].items()))
    if report["uplink"]:
        print(f"  updates sent as {report['uplink']}")
    if report["privacy"]:
        print(f"  privacy: {report['privacy']['summary']}")
    progress = report["progress"]
    if progress["mean_staleness"] is not None:
        print(
            f"  last {RATE_WINDOW_SECONDS:.0f} s: {progress['updates_per_second']:.2f} updates/s, staleness mean "
            f"{progress['mean_staleness']:.2f} max {progress['max_staleness']}"
        )
    print(
        f"  {len(report['workers'])} worker(s) alive: "
        + (", ".join(worker["worker_id"] for worker in report["workers"]) or "none")
    )
    rows = worker_table_rows(report)
    if rows:
        widths = [max(len(cell) for cell in column) for column in zip(WORKER_COLUMNS, *rows)]
        for cells in (WORKER_COLUMNS, *rows):
            print("    " + "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    if report["rejected"] or report["skipped"]:
        print(f"  rejected {report['rejected'] or '{}'}, skipped {report['skipped'] or '{}'}")
    print(f"  {memory_line(report)}")
    print(f"  {archive_line(report)}")
    for warning in report["warnings"]:
        print(f"  WARNING: {warning}")
    print(f"  {'queue':<32} {'ready':>7} {'unacked':>8} {'consumers':>10}")
    for queue in report["queues"]:
        if not queue["exists"]:
            print(f"  {queue['name']:<32} (not declared)")
            continue
        print(
            f"  {queue['name']:<32} {_cell(queue['ready']):>7} {_cell(queue['unacked']):>8} "
            f"{_cell(queue['consumers']):>10}"
        )
    if report["depth_source"] == "amqp":
        print(
            "  (management API not reachable: counts from AMQP, which reports ready messages only; "
            "enable it with 'rabbitmq-plugins enable rabbitmq_management')"
        )
    return 0
