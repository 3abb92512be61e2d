"""``fedq report``: a self-contained HTML report of a run, drawn from its history (Redis and the archive)."""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from fedq.common import privacy
from fedq.common.records import VersionRecord
from fedq.common.settings import add_options
from fedq.coordinator.ops.history import HISTORY_OPTIONS, open_history

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HELP = (
    "Write an HTML report of a job from its history: accuracy against wall-clock time and version, "
    "the staleness histogram, updates per worker, and each worker's contribution against its data."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, HISTORY_OPTIONS)
    parser.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    parser.add_argument("--png-dir", default=None, help="also write each figure as a PNG file into this folder")


def figures(history: list[VersionRecord]) -> dict[str, Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = history[0].created
    scored = [entry for entry in history if entry.metrics]
    metric_names = sorted({name for entry in scored for name in entry.metrics if name != "loss"}) or ["loss"]
    drawn: dict[str, Figure] = {}
    for axis_name, x_of in (("time", lambda entry: entry.created - start), ("version", lambda entry: entry.version)):
        figure, axes = plt.subplots(figsize=(7, 4))
        for name in metric_names:
            points = [(x_of(entry), entry.metrics[name]) for entry in scored if name in entry.metrics]
            axes.plot([x for x, _ in points], [y for _, y in points], label=name)
        axes.set_xlabel("wall-clock seconds since version 0" if axis_name == "time" else "version")
        axes.set_ylabel(", ".join(metric_names))
        axes.grid(alpha=0.3)
        axes.legend()
        drawn[f"score_vs_{axis_name}"] = figure
    staleness = Counter(update.staleness for entry in history for update in entry.updates)
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.bar(list(staleness), list(staleness.values()))
    axes.set_xlabel("staleness (versions)")
    axes.set_ylabel("updates applied")
    drawn["staleness_histogram"] = figure
    per_worker = Counter(update.worker_id for entry in history for update in entry.updates)
    figure, axes = plt.subplots(figsize=(7, max(3, 0.3 * len(per_worker))))
    names = sorted(per_worker)
    axes.barh(names, [per_worker[name] for name in names])
    axes.set_xlabel("updates applied")
    drawn["updates_per_worker"] = figure
    for figure in drawn.values():
        figure.tight_layout()
    return drawn


def contribution_rows(history: list, fleet: dict) -> list[dict]:
    """Per worker, from the history: updates applied and their summed weight, its latest example
    count, their shares; from the coordinator's measurements (``fleet``, may be empty): its
    rejections by reason and seconds per task."""
    applied: Counter[str] = Counter()
    weight: defaultdict[str, float] = defaultdict(float)
    examples: dict[str, int] = {}
    for entry in history:
        for update in entry.updates:
            applied[update.worker_id] += 1
            weight[update.worker_id] += update.weight
            examples[update.worker_id] = update.num_examples
    workers = sorted(set(applied) | set(fleet))
    totals = (sum(applied.values()) or 1, sum(weight.values()) or 1.0, sum(examples.values()) or 1)
    rows = []
    for worker in workers:
        record = fleet.get(worker)
        rows.append(
            {
                "worker": worker,
                "applied": applied[worker],
                "of updates": applied[worker] / totals[0],
                "of weight": weight[worker] / totals[1],
                "of examples": examples.get(worker, 0) / totals[2],
                "rejected": dict(record.rejected) if record else {},
                "s/task": record.round_trip_s if record else None,
            }
        )
    return rows


def _contribution_html(rows: list[dict]) -> str:
    columns = ("worker", "applied", "of updates", "of weight", "of examples", "s/task", "rejected")
    lines = []
    for row in rows:
        cells = (
            row["worker"],
            str(row["applied"]),
            *(f"{100 * row[name]:.1f} %" for name in columns[2:5]),
            "-" if row["s/task"] is None else f"{row['s/task']:.2f}",
            ", ".join(f"{reason} {count}" for reason, count in sorted(row["rejected"].items())) or "-",
        )
        lines.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    head = "".join(f"<th>{name}</th>" for name in columns)
    return f"<h2>contribution per worker</h2><table><tr>{head}</tr>{''.join(lines)}</table>"


def main(args: argparse.Namespace) -> int:
    tiers = open_history(args)
    store = tiers.store
    history = list(tiers.records())  # both tiers: the whole run, not just what Redis still holds
    drawn = figures(history)
    sections = []
    for name, figure in drawn.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        if args.png_dir:
            os.makedirs(args.png_dir, exist_ok=True)
            with open(os.path.join(args.png_dir, f"{name}.png"), "wb") as handle:
                handle.write(buffer.getvalue())
        encoded = base64.b64encode(buffer.getvalue()).decode()
        sections.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2><img src='data:image/png;base64,{encoded}'>")
    updates = [update for entry in history for update in entry.updates]
    last_scored = next((entry for entry in reversed(history) if entry.metrics), history[-1])
    summary = {
        "versions": history[-1].version,
        "updates applied": len(updates),
        "rejected": sum(store.counters.get("rejected").values()),
        "mean staleness": f"{sum(u.staleness for u in updates) / max(len(updates), 1):.2f}",
        "max staleness": max((u.staleness for u in updates), default=0),
        "wall-clock seconds": f"{history[-1].created - history[0].created:.1f}",
        "latest metrics": ", ".join(f"{k}={v:.4f}" for k, v in last_scored.metrics.items()),
    }
    head = history[-1]
    if head.config and "compression" in head.config:
        summary["updates sent as"] = head.config["compression"] + (
            " with error feedback" if head.config.get("error_feedback") else ""
        )
    spent = privacy.summary(head.config, head.epsilon, head.dp_steps)
    if spent:
        summary["privacy"] = spent
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    document = (
        f"<!doctype html><meta charset='utf-8'><title>fedq report: {html.escape(store.job)}</title>"
        f"<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}th{{text-align:left;"
        f"padding-right:1em}}</style><h1>fedq report: job {html.escape(store.job)}</h1>"
        f"<table>{rows}</table>{_contribution_html(contribution_rows(history, store.fleet.load()))}"
        f"{''.join(sections)}"
    )
    with open(args.output, "w") as handle:
        handle.write(document)
    print(f"wrote {args.output} ({len(history)} versions, {len(updates)} updates)")
    return 0
