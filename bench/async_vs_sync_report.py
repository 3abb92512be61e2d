"""``async_vs_sync.py``'s output: the table on stdout and one PNG per (task, case)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.async_vs_sync_config import ARM_COLOURS, ARM_LABELS
from bench.async_vs_sync_results import RunResult


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'task':9} {'case':10} {'arm':10} {'t->target':>9} {'speedup':>7} {'held5s':>6} {'upd->tgt':>8} {'final':>6} "
        f"{'last10s':>7} {'best':>6} {'vers':>5} {'upd':>5} {'upd/s':>5} {'rej':>4} {'stale':>9} {'slow%':>5} "
        f"{'t_v1':>5} {'coordCPU':>8} {'busy':>5}"
    )
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

        print(
            f"{result.task:9} {result.case:10} {result.arm:10} {fmt(t, '9.1f'):>9} {speedup:>7} "
            f"{fmt(row['t_target_sustained_s'], '6.1f'):>6} "
            f"{fmt(row['updates_to_target'], 'd'):>8} {fmt(row['final_acc'], '.4f'):>6} "
            f"{fmt(row['final_acc_last10s'], '.4f'):>7} {row['best_acc']:6.4f} {row['versions']:5d} "
            f"{row['updates_applied']:5d} {row['updates_per_s']:5.1f} {row['rejected']:4d} {stale:>9} {share:>5} "
            f"{fmt(row['t_v1_s'], '.1f'):>5} "
            f"{row['coordinator_cpu_s']:8.1f} {row['machine_busy']:5.2f}"
        )


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
        full, zoom, right = (
            figure.add_subplot(grid[0, :]),
            figure.add_subplot(grid[1, 0]),
            figure.add_subplot(grid[1, 1]),
        )
        target = group[0].target
        budget = max(r.budget for r in group)
        sync = next((r.time_to_target()[0] for r in group if r.arm == "fedavg"), None)
        zoom_end = min(budget, 1.3 * sync if sync else budget / 3)
        for result in group:
            points = [p for p in result.curve if p["accuracy"] is not None and p["t"] <= result.budget]
            colour = ARM_COLOURS.get(result.arm)
            t_target, updates, _ = result.time_to_target()
            name = ARM_LABELS.get(result.arm, result.arm)
            label = name + (
                f": {t_target:.1f} s, {updates} updates to {target:.2f}"
                if t_target is not None
                else f": {target:.2f} not reached"
            )
            final = result.final_mean_accuracy()
            if final is not None:
                label += f"; last 10 s {final:.3f}"
            for axis in (full, zoom):
                axis.plot(
                    [p["t"] for p in points],
                    [p["accuracy"] for p in points],
                    color=colour,
                    label=label,
                    linewidth=1.8 if result.arm == "fedavg" else 1.0,
                    drawstyle="steps-post" if result.arm == "fedavg" else "default",
                    alpha=1.0 if result.arm in ("fedavg", "fedbuff3") else 0.8,
                )
                if t_target is not None:
                    axis.axvline(t_target, color=colour, linestyle=":", linewidth=1)
            hist = Counter(result.stalenesses)
            if hist:
                xs = np.arange(0, max(hist) + 2)
                total = sum(hist.values())
                right.step(
                    xs,
                    [hist.get(int(x), 0) / total for x in xs],
                    where="mid",
                    color=colour,
                    label=f"{name} (mean {np.mean(result.stalenesses):.1f}, {sum(result.rejected.values())} rejected)",
                )
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
        full.set_title(
            f"{task}, {case}: {example.workers} workers, concurrency {example.concurrency}, "
            f"target {target:.2f} (dotted lines: time to target)"
        )
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
