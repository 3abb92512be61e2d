"""The result of one ``async_vs_sync.py`` run, its derived figures, and the CSVs that store results."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.async_vs_sync_config import ARMS, CASES, SUSTAIN_SECONDS, TASKS

SUMMARY_CSV = "async_vs_sync.csv"
CURVES_CSV = "async_vs_sync_curves.csv"


@dataclass
class RunResult:
    task: str
    case: str
    arm: str
    job: str
    target: float
    budget: float
    concurrency: int
    workers: int
    curve: list[dict[str, Any]] = field(default_factory=list)  # version, t, accuracy, loss, updates
    stalenesses: list[int] = field(default_factory=list)
    per_worker: dict[str, int] = field(default_factory=dict)
    weight_per_worker: dict[str, float] = field(default_factory=dict)  # the summed weights of its updates
    rejected_by_worker: dict[str, dict[str, int]] = field(default_factory=dict)
    slow_workers: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    startup_seconds: float = 0.0
    coordinator_cpu: float = 0.0
    workers_cpu: float = 0.0
    machine_busy: float = 0.0
    wall: float = 0.0
    slow_share_value: float | None = None  # when rebuilt from the CSV, per_worker is not known

    # derived figures
    def time_to_target(self) -> tuple[float | None, int | None, int | None]:
        for point in self.curve:
            if point["t"] > self.budget:
                break
            if point["accuracy"] is not None and point["accuracy"] >= self.target:
                return point["t"], point["updates"], point["version"]
        return None, None, None

    def time_to_sustained_target(self, hold: float = SUSTAIN_SECONDS) -> float | None:
        """The first time from which every version of the next ``hold`` seconds is at or above the target."""
        points = [p for p in self.curve if p["accuracy"] is not None]
        for index, point in enumerate(points):
            if point["t"] + hold > self.budget:
                return None
            if all(later["accuracy"] >= self.target for later in points[index:] if later["t"] <= point["t"] + hold):
                return point["t"]
        return None

    def updates_within_budget(self) -> int:
        within = [p["updates"] for p in self.curve if p["t"] <= self.budget]
        return within[-1] if within else 0

    def final_accuracy(self) -> float | None:
        within = [p for p in self.curve if p["accuracy"] is not None and p["t"] <= self.budget]
        return within[-1]["accuracy"] if within else None

    def final_mean_accuracy(self, window: float = 10.0) -> float | None:
        """Mean accuracy of the versions committed in the last ``window`` seconds of the budget."""
        end = max((p["t"] for p in self.curve), default=0.0)
        end = min(end, self.budget)
        values = [p["accuracy"] for p in self.curve if p["accuracy"] is not None and end - window <= p["t"] <= end]
        return float(np.mean(values)) if values else None

    def slow_share(self) -> float | None:
        if self.slow_share_value is not None:
            return self.slow_share_value
        total = sum(self.per_worker.values())
        if not total:
            return None
        slow = sum(
            count for worker, count in self.per_worker.items() if int(worker.rsplit("-", 1)[1]) in self.slow_workers
        )
        return slow / total

    def row(self) -> dict[str, Any]:
        t_target, updates_target, version_target = self.time_to_target()
        sustained = self.time_to_sustained_target()
        histogram = Counter(self.stalenesses)
        t_v1 = next((p["t"] for p in self.curve if p["version"] == 1), None)
        final, final_mean = self.final_accuracy(), self.final_mean_accuracy()
        slow_share = self.slow_share()
        return {
            "task": self.task,
            "case": self.case,
            "arm": self.arm,
            "workers": self.workers,
            "concurrency": self.concurrency,
            "target": self.target,
            "budget_s": self.budget,
            "t_target_s": None if t_target is None else round(t_target, 2),
            "updates_to_target": updates_target,
            "versions_to_target": version_target,
            "t_target_sustained_s": None if sustained is None else round(sustained, 2),
            "final_acc": None if final is None else round(final, 4),
            "final_acc_last10s": None if final_mean is None else round(final_mean, 4),
            "best_acc": round(max((p["accuracy"] for p in self.curve if p["accuracy"] is not None), default=0), 4),
            "versions": self.curve[-1]["version"] if self.curve else 0,
            "updates_applied": len(self.stalenesses),
            "updates_per_s": round(self.updates_within_budget() / self.budget, 2),
            "rejected": sum(self.rejected.values()),
            "rejected_reasons": " ".join(f"{k}:{v}" for k, v in sorted(self.rejected.items())),
            "skipped": sum(self.skipped.values()),
            "staleness_mean": round(float(np.mean(self.stalenesses)), 2) if self.stalenesses else None,
            "staleness_max": max(self.stalenesses, default=None),
            "staleness_hist": " ".join(f"{k}:{histogram[k]}" for k in sorted(histogram)),
            "slow_workers": " ".join(map(str, self.slow_workers)),
            "slow_update_share": None if slow_share is None else round(slow_share, 3),
            "t_v1_s": None if t_v1 is None else round(t_v1, 2),
            "startup_s": round(self.startup_seconds, 1),
            "coordinator_cpu_s": round(self.coordinator_cpu, 1),
            "workers_cpu_s": round(self.workers_cpu, 1),
            "machine_busy": round(self.machine_busy, 3),
            "coordinator_warnings": " ".join(f"{k}:{v}" for k, v in sorted(self.warnings.items())),
            "reason": self.reason,
            "job": self.job,
        }


# -- CSVs ----------------------------------------------------------------------


def merged(results: list[RunResult], out_dir: Path) -> list[RunResult]:
    """Earlier results in ``out_dir`` whose (task, case, arm) was not re-run, then ``results``."""
    if not (out_dir / SUMMARY_CSV).exists() or not (out_dir / CURVES_CSV).exists():
        return list(results)
    fresh = {(r.task, r.case, r.arm) for r in results}
    kept = [r for r in load_results(out_dir) if (r.task, r.case, r.arm) not in fresh]
    order = {name: index for index, name in enumerate([*TASKS, *CASES, *ARMS])}
    return sorted(
        kept + list(results), key=lambda r: (order.get(r.task, 99), order.get(r.case, 99), order.get(r.arm, 99))
    )


def write_csvs(results: list[RunResult], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [result.row() for result in results]
    sync_time = {(r["task"], r["case"]): r["t_target_s"] for r in rows if r["arm"] == "fedavg"}
    for row in rows:
        base, t = sync_time.get((row["task"], row["case"])), row["t_target_s"]
        row["speedup_vs_fedavg"] = round(base / t, 2) if (base and t) else None
    if rows:
        with open(out_dir / SUMMARY_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(out_dir / CURVES_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "case", "arm", "version", "t_s", "accuracy", "loss", "updates", "staleness"])
        for result in results:
            index = 0
            for point in result.curve:
                # staleness of the updates in this version, ';'-separated
                count = point["updates"] - index
                stale = result.stalenesses[index : index + count]
                index += count
                writer.writerow(
                    [
                        result.task,
                        result.case,
                        result.arm,
                        point["version"],
                        f"{point['t']:.3f}",
                        "" if point["accuracy"] is None else f"{point['accuracy']:.4f}",
                        "" if point["loss"] is None else f"{point['loss']:.4f}",
                        point["updates"],
                        ";".join(map(str, stale)),
                    ]
                )


def load_results(out_dir: Path) -> list[RunResult]:
    """Rebuild results (curves, staleness, summary fields) from the CSVs, for --plot-only."""
    with open(out_dir / SUMMARY_CSV) as handle:
        summary = {(row["task"], row["case"], row["arm"]): row for row in csv.DictReader(handle)}
    with open(out_dir / CURVES_CSV) as handle:
        curve_rows = list(csv.DictReader(handle))
    results: dict[tuple[str, str, str], RunResult] = {}
    for row in curve_rows:
        key = (row["task"], row["case"], row["arm"])
        info = summary[key]
        if key not in results:
            results[key] = RunResult(
                row["task"],
                row["case"],
                row["arm"],
                info["job"],
                float(info["target"]),
                float(info["budget_s"]),
                int(info["concurrency"]),
                int(info["workers"]),
                slow_workers=[int(x) for x in info["slow_workers"].split()],
            )
            result = results[key]
            result.rejected = {k: int(v) for k, v in (item.split(":") for item in info["rejected_reasons"].split())}
            result.reason = info["reason"]
            result.startup_seconds = float(info["startup_s"])
            result.coordinator_cpu, result.workers_cpu = float(info["coordinator_cpu_s"]), float(info["workers_cpu_s"])
            result.machine_busy = float(info["machine_busy"])
            result.warnings = {k: int(v) for k, v in (item.split(":") for item in info["coordinator_warnings"].split())}
            result.skipped = {"all": int(info["skipped"])} if int(info["skipped"]) else {}
            result.slow_share_value = float(info["slow_update_share"]) if info["slow_update_share"] else None
        result = results[key]
        result.curve.append(
            {
                "version": int(row["version"]),
                "t": float(row["t_s"]),
                "accuracy": float(row["accuracy"]) if row["accuracy"] else None,
                "loss": float(row["loss"]) if row["loss"] else None,
                "updates": int(row["updates"]),
            }
        )
        result.stalenesses.extend(int(x) for x in row["staleness"].split(";") if x)
    return list(results.values())
