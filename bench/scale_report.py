"""``scale.py``'s output: per arm a table over time and a summary, then the comparison of the arms, and --json.

Sizes are in MB of 10^6 bytes, as the model's size is quoted (1,000,900 float32 = 4.0 MB).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.scale_run import BUFFER_SIZE, ArmResult, Sample

MB = 1e6
PERCENTILES = (50, 90, 99)
# An arm is steady when the tasks in flight never fell below this share of its workers (less a buffer).
STEADY_SHARE = 0.9


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def updates_between(result: ArmResult, start: float, end: float) -> int:
    """Updates applied by the versions created in (start, end], seconds since version 0."""
    return sum(applied for created, applied in result.versions[1:] if start < result.elapsed(created) <= end)


def _depth(ready: int | None, unacked: int | None) -> str:
    if ready is None:
        return "?"
    return str(ready) if unacked is None else f"{ready}/{unacked}"


def arm_rows(result: ArmResult, row_seconds: float) -> list[dict[str, Any]]:
    """One row per ``row_seconds`` of the arm: the last sample in it, its largest RSS, its update rate.

    Samples after the arm's end (the coordinator finishing, its archiver's last pass) are left out."""
    samples = [sample for sample in result.samples if 0 < result.elapsed(sample.at) <= result.seconds]
    if not samples:
        return []
    end = result.elapsed(samples[-1].at)
    rows: list[dict[str, Any]] = []
    previous: Sample | None = None  # the last sample of the row before: CPU is measured from there
    boundary = row_seconds
    while boundary - row_seconds < end:
        in_row = [sample for sample in samples if boundary - row_seconds < result.elapsed(sample.at) <= boundary]
        if in_row:
            last = in_row[-1]
            span = min(boundary, end) - (boundary - row_seconds)
            cpu = machine = None
            if previous is not None and last.at > previous.at:
                cpu = (last.cpu_seconds - previous.cpu_seconds) / (last.at - previous.at)
                machine = (last.machine_busy_seconds - previous.machine_busy_seconds) / (last.at - previous.at)
            rows.append(
                {
                    "seconds": boundary,
                    "rss_mb": last.rss_bytes / MB,
                    "rss_max_mb": max(sample.rss_bytes for sample in in_row) / MB,
                    "anon_mb": last.anon_bytes / MB,
                    "redis_mb": last.redis_used_bytes / MB,
                    "job_redis_mb": sum(last.job_redis_bytes.values()) / MB,
                    "tasks": _depth(last.tasks_ready, last.tasks_unacked),
                    "updates": _depth(last.updates_ready, last.updates_unacked),
                    "dead": "?" if last.dead_ready is None else str(last.dead_ready),
                    "version": last.head,
                    "updates_per_s": updates_between(result, boundary - row_seconds, boundary) / span,
                    "coordinator_cpu": cpu,
                    "machine_cpu": machine,
                }
            )
            previous = last
        boundary += row_seconds
    return rows


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[index]) for row in [headers, *rows]) for index in range(len(headers))]
    print("  ".join(header.rjust(width) for header, width in zip(headers, widths)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip())


def print_rows(rows: list[dict[str, Any]]) -> None:
    headers = ["t", "RSS MB", "max", "anon MB", "Redis MB", "job MB", "tasks", "updates", "dead", "version"]
    headers += ["upd/s", "coord CPU", "machine CPU"]
    print_table(
        headers,
        [
            [
                _clock(row["seconds"]),
                f"{row['rss_mb']:.1f}",
                f"{row['rss_max_mb']:.1f}",
                f"{row['anon_mb']:.1f}",
                f"{row['redis_mb']:.0f}",
                f"{row['job_redis_mb']:.0f}",
                row["tasks"],
                row["updates"],
                row["dead"],
                str(row["version"]),
                f"{row['updates_per_s']:.1f}",
                "" if row["coordinator_cpu"] is None else f"{row['coordinator_cpu']:.0%}",
                "" if row["machine_cpu"] is None else f"{row['machine_cpu']:.0%}",
            ]
            for row in rows
        ],
    )


def _median_mb(samples: list[Sample], attribute: str) -> float:
    return statistics.median(getattr(sample, attribute) for sample in samples) / MB


def arm_summary(result: ArmResult, warmup: float, tolerance_bytes: float) -> dict[str, Any]:
    """RSS over the steady window (after ``warmup``, up to the arm's end), its growth, rate and latencies."""
    steady = [sample for sample in result.samples if warmup <= result.elapsed(sample.at) <= result.seconds]
    summary: dict[str, Any] = {
        "workers": result.workers,
        "processes": result.processes,
        "mean_training_seconds": result.mean_training_seconds,
        "versions": len(result.versions) - 1,
        "updates_applied": sum(applied for _, applied in result.versions),
        "updates_published": result.published,
        "peak_rss_mb": result.peak_rss_bytes / MB,
        "log_events": result.log_events,
        "samples": len(steady),
    }
    if len(steady) < 3:
        summary["note"] = f"only {len(steady)} samples after the {warmup:.0f} s warm-up: too few to judge"
        return summary
    minutes = np.array([result.elapsed(sample.at) / 60 for sample in steady])
    rss = np.array([sample.rss_bytes / MB for sample in steady])
    anon = np.array([sample.anon_bytes / MB for sample in steady])
    span_seconds = (minutes[-1] - minutes[0]) * 60
    # "First and last minute": a minute each in a 10-minute arm, a quarter of a short one.
    compare_seconds = min(60.0, span_seconds / 4)
    first = [s for s in steady if result.elapsed(s.at) <= result.elapsed(steady[0].at) + compare_seconds]
    last = [s for s in steady if result.elapsed(s.at) >= result.elapsed(steady[-1].at) - compare_seconds]
    coefficients, covariance = np.polyfit(minutes, rss, 1, cov=True)
    slope, slope_error = float(coefficients[0]), float(np.sqrt(covariance[0, 0]))
    summary |= {
        "steady_from_s": result.elapsed(steady[0].at),
        "steady_to_s": result.elapsed(steady[-1].at),
        "rss_start_mb": float(rss[0]),
        "rss_end_mb": float(rss[-1]),
        "rss_median_mb": float(np.median(rss)),
        "rss_max_mb": float(rss.max()),
        "rss_slope_mb_per_min": slope,
        "rss_slope_error_mb_per_min": slope_error,  # its standard error: RSS saw-tooths by ~10 MB
        "anon_slope_mb_per_min": float(np.polyfit(minutes, anon, 1)[0]),
        "compare_seconds": compare_seconds,
        "rss_first_median_mb": _median_mb(first, "rss_bytes"),
        "rss_last_median_mb": _median_mb(last, "rss_bytes"),
        "redis_median_mb": _median_mb(steady, "redis_used_bytes"),
        "redis_max_mb": max(sample.redis_used_bytes for sample in steady) / MB,
        "job_redis_median_mb": statistics.median(sum(s.job_redis_bytes.values()) for s in steady) / MB,
        "job_redis_max_mb": max(sum(s.job_redis_bytes.values()) for s in steady) / MB,
        "update_queue_max": max((sample.updates_ready or 0) for sample in steady),
        "updates_per_s": updates_between(result, minutes[0] * 60, minutes[-1] * 60) / span_seconds,
    }
    # Tasks issued and not yet answered: ready in the task queue plus held by workers (unacked).
    # Only the management API counts the latter; without it, whether the arm was steady is unknown.
    counted = [sample for sample in steady if sample.tasks_unacked is not None]
    if len(counted) >= len(steady) / 2:
        in_flight = [(sample.tasks_ready or 0) + (sample.tasks_unacked or 0) for sample in counted]
        summary["tasks_in_flight_min"], summary["tasks_in_flight_median"] = min(in_flight), statistics.median(in_flight)
        # With every worker holding a task, only the buffer's tasks (and answers on the way) are missing.
        summary["steady"] = min(in_flight) >= STEADY_SHARE * result.workers - BUFFER_SIZE
    # The verdict rests on the line through every sample: the medians of two short windows are
    # shown too, but with RSS moving by ~10 MB from one sample to the next they are noisier.
    fitted_growth = slope * span_seconds / 60
    summary["rss_fitted_growth_mb"] = fitted_growth
    summary["rss_grows"] = bool(fitted_growth > tolerance_bytes / MB)
    # Latencies of the updates published after the warm-up.
    measured = [row for row in result.applied if result.elapsed(row["published_at"]) >= warmup]
    summary["latency_updates"] = len(measured)
    summary["publish_to_commit_s"] = percentiles([row["committed_at"] - row["published_at"] for row in measured])
    summary["issue_to_receive_s"] = percentiles([row["received_at"] - row["issued_at"] for row in measured])
    summary["worker_lag_s"] = percentiles([row["published_at"] - row["due_at"] for row in measured])
    summary["staleness"] = percentiles([row["staleness"] for row in measured])
    return summary


def _ms(values: dict[str, float]) -> str:
    return " / ".join(f"{values[f'p{p}'] * 1e3:.0f}" for p in PERCENTILES) + " ms"


def print_summary(summary: dict[str, Any], tolerance_bytes: float) -> None:
    print(
        f"  {summary['versions']} versions, {summary['updates_applied']} updates applied, "
        f"{summary['updates_published']} published by the simulated workers; peak RSS (VmHWM) "
        f"{summary['peak_rss_mb']:.1f} MB"
    )
    events = ", ".join(f"{name} {count}" for name, count in sorted(summary["log_events"].items())) or "none"
    print(f"  coordinator log: {events}")
    if "note" in summary:
        print(f"  {summary['note']}")
        return
    print(
        f"  steady window {_clock(summary['steady_from_s'])}-{_clock(summary['steady_to_s'])} "
        f"({summary['samples']} samples): {summary['updates_per_s']:.1f} updates/s, "
        f"update queue at most {summary['update_queue_max']} ready"
    )
    if "steady" not in summary:
        print("  tasks in flight: unknown (no management API), so is whether every worker had a task")
    else:
        verdict = "steady" if summary["steady"] else "NOT STEADY: workers went without tasks"
        print(
            f"  tasks in flight: min {summary['tasks_in_flight_min']}, median {summary['tasks_in_flight_median']:.0f} "
            f"of {summary['workers']} workers: {verdict}"
        )
    print(
        f"  RSS: {summary['rss_start_mb']:.1f} MB at its start, {summary['rss_end_mb']:.1f} MB at its end, "
        f"median {summary['rss_median_mb']:.1f}, max {summary['rss_max_mb']:.1f}"
    )
    verdict = "GROWS" if summary["rss_grows"] else "flat"
    print(
        f"  RSS growth: {summary['rss_slope_mb_per_min']:+.2f} +- {summary['rss_slope_error_mb_per_min']:.2f} MB/min "
        f"least squares, {summary['rss_fitted_growth_mb']:+.1f} MB over the window: {verdict} (tolerance "
        f"{tolerance_bytes / MB:.1f} MB; anonymous memory {summary['anon_slope_mb_per_min']:+.2f} MB/min); "
        f"median of the first {summary['compare_seconds']:.0f} s {summary['rss_first_median_mb']:.1f} MB, "
        f"of the last {summary['rss_last_median_mb']:.1f} MB"
    )
    print(
        f"  Redis used_memory (the whole server): median {summary['redis_median_mb']:.0f} MB, max "
        f"{summary['redis_max_mb']:.0f} MB; the job's keys: median {summary['job_redis_median_mb']:.0f} MB, "
        f"max {summary['job_redis_max_mb']:.0f} MB"
    )
    staleness = " / ".join(f"{summary['staleness'][f'p{p}']:.0f}" for p in PERCENTILES)
    print(
        f"  latency of {summary['latency_updates']} updates, p50 / p90 / p99: "
        f"publish -> commit {_ms(summary['publish_to_commit_s'])}; "
        f"task issue -> worker receives it {_ms(summary['issue_to_receive_s'])}; "
        f"simulated worker late by {_ms(summary['worker_lag_s'])}; "
        f"staleness {staleness} versions"
    )


def comparison(summaries: list[dict[str, Any]], model_bytes: int) -> dict[str, Any] | None:
    """The fewest-workers arm against the most-workers arm: steady RSS difference against 4x the model."""
    measured = [summary for summary in summaries if "rss_median_mb" in summary]
    if len(measured) < 2:
        return None
    small, large = min(measured, key=lambda s: s["workers"]), max(measured, key=lambda s: s["workers"])
    bound_mb = 4 * model_bytes / MB
    median_difference = large["rss_median_mb"] - small["rss_median_mb"]
    max_difference = large["rss_max_mb"] - small["rss_max_mb"]
    return {
        "small_workers": small["workers"],
        "large_workers": large["workers"],
        "median_difference_mb": median_difference,
        "max_difference_mb": max_difference,
        "bound_mb": bound_mb,
        "within_bound": median_difference <= bound_mb,
        "large_grows": large["rss_grows"],
        "small_grows": small["rss_grows"],
        # False when an arm's workers went without tasks: it did not measure that many workers.
        "both_steady": bool(small.get("steady", True) and large.get("steady", True)),
    }


def print_comparison(result: dict[str, Any] | None) -> None:
    if result is None:
        print("no comparison: it needs two arms with enough samples after the warm-up")
        return
    print(
        f"steady RSS, {result['large_workers']} workers minus {result['small_workers']}: "
        f"median {result['median_difference_mb']:+.1f} MB, max {result['max_difference_mb']:+.1f} MB; "
        f"bound 4x the model = {result['bound_mb']:.1f} MB: "
        f"{'within' if result['within_bound'] else 'EXCEEDED'}"
    )
    print(
        f"RSS over the arm: {result['small_workers']} workers {'GROWS' if result['small_grows'] else 'flat'}, "
        f"{result['large_workers']} workers {'GROWS' if result['large_grows'] else 'flat'}"
    )
    if not result["both_steady"]:
        print("NOT A VALID COMPARISON: an arm's tasks in flight fell well below its workers (see its summary)")


def write_json(path: str, settings: dict[str, Any], arms: list[tuple[ArmResult, list, dict]], compared) -> None:
    document = {
        "settings": settings,
        "arms": [
            {
                "summary": summary,
                "rows": rows,
                "samples": [asdict(sample) for sample in result.samples],
                "job": result.job,
                "log": result.log_path,
                "started_at": result.started_at,
            }
            for result, rows, summary in arms
        ],
        "comparison": compared,
    }
    Path(path).write_text(json.dumps(document, indent=2))
