"""``fedq monitor``: a live terminal view of one job's queues, training, workers, Redis memory and archive."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedq.common.settings import CONNECTION_OPTIONS, add_options, resolve
from fedq.common.store import ModelStore
from fedq.coordinator.ops.status import (
    RATE_WINDOW_SECONDS,
    WORKER_COLUMNS,
    ArchiveReader,
    archive_line,
    collect,
    memory_line,
    worker_table_rows,
)

HELP = (
    "Live view of a job: queue depths (ready / unacked / consumers), head version, update rate, "
    "staleness, latest accuracy, the workers seen recently, Redis memory against the job's budget and "
    "the archive's size and lag."
)

# The archive's size is a listing (of an object store, perhaps): read it this often, not every frame.
ARCHIVE_REFRESH_SECONDS = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CONNECTION_OPTIONS)
    parser.add_argument(
        "--interval", type=_interval, default=1.0, metavar="SECONDS", help="seconds between refreshes (default: 1)"
    )
    parser.add_argument("--once", action="store_true", help="print one frame and exit (for scripts and logs)")


def _interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0.05 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a refresh interval: give seconds from 0.05 to 3600")
    return seconds


def _number(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(report: dict, now: float) -> Group:
    progress = report["progress"]
    state = report["state"].get("status", "not started")
    metrics = ", ".join(f"{name} {value:.4f}" for name, value in progress["latest_metrics"].items()) or "-"
    headline = Text.from_markup(
        f"[bold]job[/] {report['job']}   [bold]state[/] {state}   [bold]head version[/] {_number(report['head'])}"
        f"   [bold]tasks in flight[/] {report['in_flight']}\n"
        f"[bold]latest[/] {metrics}\n"
        f"[bold]last {RATE_WINDOW_SECONDS:.0f} s[/]: {progress['updates_per_second']:.2f} updates/s, "
        f"{progress['versions_per_second']:.2f} versions/s, staleness mean {_number(progress['mean_staleness'])}"
        f" max {_number(progress['max_staleness'])}\n"
        f"[bold]rejected[/] {sum(report['rejected'].values())} {report['rejected'] or ''}   "
        f"[bold]duplicates skipped[/] {sum(report['skipped'].values())}"
    )
    lines = [memory_line(report), archive_line(report)]
    if report["uplink"]:
        lines.append(f"updates sent as {report['uplink']}")
    if report["privacy"]:
        lines.append(f"privacy: {report['privacy']['summary']}")
    storage = Text("\n".join(lines))
    warnings = [Text(f"WARNING: {warning}", style="bold red") for warning in report["warnings"]]

    queues = Table(title="queues", title_justify="left")
    for column in ("queue", "ready", "unacked", "consumers"):
        queues.add_column(column, justify="left" if column == "queue" else "right")
    for queue in report["queues"]:
        if queue["exists"]:
            queues.add_row(
                queue["name"], _number(queue["ready"]), _number(queue["unacked"]), _number(queue["consumers"])
            )
        else:
            queues.add_row(queue["name"], "[dim]not declared[/]", "", "")
    source_note = (
        ""
        if report["depth_source"] == "management"
        else "[yellow]management API not reachable: AMQP counts ready messages only; unacked unknown[/]"
    )

    workers = Table(title=f"workers seen in the last 30 s ({len(report['workers'])})", title_justify="left")
    for column in ("worker", "host", "partition", "tasks done", "working on", "last seen"):
        workers.add_column(column)
    for worker in report["workers"]:
        workers.add_row(
            worker["worker_id"],
            worker.get("host", "?"),
            str(worker.get("partition", "?")),
            str(worker.get("tasks_done", 0)),
            (worker.get("current_task") or "idle")[:12],
            f"{now - worker['last_seen']:.0f} s ago",
        )
    contributions = Table(title="contribution (as the coordinator measured it)", title_justify="left")
    for column in WORKER_COLUMNS:
        contributions.add_column(column, justify="left" if column in ("worker", "data", "rejected") else "right")
    for cells in worker_table_rows(report):
        contributions.add_row(*cells)
    parts: list[RenderableType] = [headline, storage, *warnings, queues]
    if source_note:
        parts.append(source_note)
    parts.append(workers)
    if report["contribution"]:
        parts.append(contributions)
    return Group(*parts)


def main(args: argparse.Namespace) -> int:
    values = resolve(args, CONNECTION_OPTIONS)
    store = ModelStore.open(values["redis_url"], values["job"])
    # Piped into a file or a log, rich would wrap at 80 columns and cut long queue names.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    archive_reader = ArchiveReader(max_age=ARCHIVE_REFRESH_SECONDS)

    def frame() -> Group:
        return render(
            collect(
                values["amqp_url"], values["redis_url"], values["job"], store, values["management_url"], archive_reader
            ),
            time.time(),
        )

    if args.once:
        console.print(frame())
        return 0
    with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(args.interval)
            live.update(frame())
