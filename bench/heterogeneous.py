"""Heterogeneous workers: does every worker's data count, and how soon is the target reached?

Run from the repository root:

    .venv/bin/python bench/heterogeneous.py --budget 60     # three cases, four arms: ~21 minutes on 2 cores
    .venv/bin/python bench/heterogeneous.py --cases unique --arms fixed,adaptive --budget 60
    .venv/bin/python bench/heterogeneous.py --task synthetic --budget 60   # stragglers and lognormal: ~12 minutes

Real federations (one coordinator, ten ``fedq worker`` processes, RabbitMQ and Redis), through
``async_vs_sync_run.run_one``. Digits, ten workers, Dirichlet(0.5) partitions, the demo's local
training (2 epochs, batch 16, learning rate 0.1), target 0.90. Every worker sleeps 0.2 s per
task; three are slow *devices*: each of their training steps takes STEP_DELAY s more (about
2 s per task), so that device-sized tasks can help them.

Synthetic(1,1) (``--task synthetic``): thirty devices of power-law sizes, ten training at a
time, async_vs_sync's settings (learning rate 0.01, target 0.60). Its slow devices are
async_vs_sync's: 30 % chosen at random take 2 s longer per task (stragglers), or every device
a LogNormal draw longer (lognormal); the extra time is spread over the device's own steps
per task, so that device-sized tasks can help. ``unique`` is a digits case only.

Cases:

    unique      the three slow workers alone hold digits 7-9 (``exclusive_classes``): starving
                them costs accuracy (without them the model cannot exceed ~0.7)
    stragglers  the same three workers are slow, with the ordinary Dirichlet split
    lognormal   every worker's device is slower by a LogNormal(ln 0.5 s, 1) draw per task
                (async_vs_sync's lognormal case, as a per-step delay); "slow" are the three slowest

Arms (the same workers, delays and data within a case):

    sync       --algorithm fedavg: fair synchronous rounds (each worker at most once)
    fixed      FedBuff K=3, the fixed cut (--max-staleness 20) and 1/sqrt(1 + tau) weights
    adaptive   FedBuff K=3, --staleness-bound adaptive (per-worker expected staleness, fair
               weights, damping)
    sized      adaptive + --task-seconds auto (device-sized tasks)

Reported per run: time to the target (first version at or above it), final accuracy, the
slow workers' share of the applied updates and of the update weight against their share of
the examples, the smallest ratio (share of updates / share of data) over all workers, and
rejections by reason. Outputs: a table on stdout, ``docs/figures/heterogeneous.csv`` and
``docs/figures/heterogeneous_<case>.png`` (accuracy against time, and each worker's share of
updates against its share of data).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.async_vs_sync_config import TASKS, TaskSpec  # noqa: E402
from bench.async_vs_sync_results import RunResult  # noqa: E402
from bench.async_vs_sync_run import run_one  # noqa: E402
from bench.harness import stop_all  # noqa: E402

FIGURES = ROOT / "docs" / "figures"
SLOW = [2, 5, 8]
BASE_SLOWDOWN = 0.2  # seconds per task, every worker (its link)
STEP_DELAY = 0.11  # seconds per training step, slow workers only: ~18 steps a task, ~2 s
CASES = ("unique", "stragglers", "lognormal")
TASK_CASES = {"digits": CASES, "synthetic": ("stragglers", "lognormal")}
STEPS_PER_TASK = 18  # digits: ~144 examples a worker, batch 16, 2 epochs
STALENESS = "polynomial:a=0.5"
ARMS = {
    "sync": ["--algorithm", "fedavg"],
    "fixed": ["--algorithm", "fedbuff", "--buffer-size", "3", "--staleness", STALENESS, "--staleness-bound", "fixed"],
    "adaptive": ["--algorithm", "fedbuff", "--buffer-size", "3", "--staleness-bound", "adaptive"],
    "sized": [
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "3",
        "--staleness-bound",
        "adaptive",
        "--task-seconds",
        "auto",
    ],
}
LABELS = {
    "sync": "sync FedAvg (fair rounds)",
    "fixed": "FedBuff K=3, fixed cut",
    "adaptive": "FedBuff K=3, adaptive",
    "sized": "FedBuff K=3, adaptive + device-sized",
}
COLOURS = {"sync": "black", "fixed": "tab:blue", "adaptive": "tab:green", "sized": "tab:red"}


def task_spec(task: str, case: str) -> TaskSpec:
    if task == "synthetic":
        synthetic = TASKS["synthetic"]
        return TaskSpec(
            f"synthetic-{case}",
            synthetic.task,
            dict(synthetic.params),
            synthetic.workers,
            synthetic.target,
            synthetic.training,
            synthetic.preload,
        )
    digits = TASKS["digits"]
    params = dict(digits.params)
    if case == "unique":
        params |= {"exclusive_classes": [7, 8, 9], "exclusive_partitions": SLOW}
    return TaskSpec(
        f"digits-{case}", digits.task, params, digits.workers, digits.target, digits.training, digits.preload
    )


def partition_sizes(spec: TaskSpec) -> list[int]:
    """Each worker's number of examples (worker i trains on partition i)."""
    from fedq.common.tasks import load_task

    task = load_task(spec.task, spec.params)
    return [len(task.local_data(index)) for index in range(spec.workers)]


def steps_per_task(spec: TaskSpec, sizes: list[int]) -> list[int]:
    """Each device's training steps in one task of the run's local training (epochs x batches)."""
    settings = dict(zip(spec.training[::2], spec.training[1::2]))
    epochs, batch = int(settings["--local-epochs"]), int(settings["--batch-size"])
    return [epochs * -(-size // batch) for size in sizes]


def step_delays(spec: TaskSpec, case: str, seed: int, sizes: list[int]) -> tuple[list[float], list[int]]:
    """Per-worker extra seconds per training step (``sizes``: each worker's examples), and the slow workers."""
    workers = spec.workers
    if spec.task == "synthetic":  # async_vs_sync's per-task extra (less the common link), over each device's steps
        from bench.async_vs_sync_config import STRAGGLER_BASE, slowdowns

        per_task, slow = slowdowns(case, workers, seed)
        extra = [delay - STRAGGLER_BASE if case == "stragglers" else delay for delay in per_task]
        return [round(seconds / steps, 5) for seconds, steps in zip(extra, steps_per_task(spec, sizes))], slow
    if case != "lognormal":
        return [STEP_DELAY if index in SLOW else 0.0 for index in range(workers)], SLOW
    from bench.async_vs_sync_config import slowdowns

    per_task, slow = slowdowns("lognormal", workers, seed)
    return [round(extra / STEPS_PER_TASK, 4) for extra in per_task], slow


def worker_flags(delays: list[float]) -> list[list[str]]:
    return [["--slowdown", str(BASE_SLOWDOWN), *(["--step-delay", str(delay)] if delay else [])] for delay in delays]


def slow_of(result: RunResult) -> list[int]:
    return result.slow_workers or SLOW


def shares(result: RunResult, counts: dict[str, float], workers: int) -> list[float]:
    total = sum(counts.values()) or 1.0
    return [counts.get(f"{result.job}-w-{index}", 0) / total for index in range(workers)]


def row(result: RunResult, data: list[float]) -> dict:
    t, _, _ = result.time_to_target()
    updates = shares(result, result.per_worker, result.workers)
    weights = shares(result, result.weight_per_worker, result.workers)
    final = [point["accuracy"] for point in result.curve if point["t"] <= result.budget and point["accuracy"]]
    return {
        "case": result.case,
        "arm": result.arm,
        "time_to_target_s": None if t is None else round(t, 1),
        "final_accuracy": round(final[-1], 4) if final else None,
        "best_accuracy": round(max(final), 4) if final else None,
        "versions": len(result.curve) - 1,
        "updates_applied": sum(result.per_worker.values()),
        "slow_workers": " ".join(map(str, slow_of(result))),
        "slow_data_share": round(sum(data[index] for index in slow_of(result)), 3),
        "slow_update_share": round(sum(updates[index] for index in slow_of(result)), 3),
        "slow_weight_share": round(sum(weights[index] for index in slow_of(result)), 3),
        "min_update_to_data_ratio": round(min(u / d for u, d in zip(updates, data)), 2),
        "rejected": ";".join(f"{reason}={count}" for reason, count in sorted(result.rejected.items())) or "-",
        "update_shares": " ".join(f"{share:.3f}" for share in updates),
        "weight_shares": " ".join(f"{share:.3f}" for share in weights),
        "data_shares": " ".join(f"{share:.3f}" for share in data),
    }


def plot(case: str, results: list[RunResult], rows: list[dict], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for result in results:
        points = [p for p in result.curve if p["accuracy"] is not None and p["t"] <= result.budget]
        curves.plot(
            [p["t"] for p in points],
            [p["accuracy"] for p in points],
            label=LABELS[result.arm],
            color=COLOURS[result.arm],
            linewidth=1,
        )
    curves.axhline(results[0].target, color="grey", linestyle=":", linewidth=1)
    curves.set(xlabel="seconds since version 0", ylabel="test accuracy", title=results[0].task, ylim=(0, 1))
    curves.legend(loc="lower right", fontsize=8)
    workers = results[0].workers
    width = 0.8 / (len(rows) + 1)
    data = [float(value) for value in rows[0]["data_shares"].split()]
    bars.bar([index - 0.4 + width / 2 for index in range(workers)], data, width, label="share of data", color="grey")
    for offset, entry in enumerate(rows, start=1):
        values = [float(value) for value in entry["update_shares"].split()]
        bars.bar(
            [index - 0.4 + width / 2 + offset * width for index in range(workers)],
            values,
            width,
            label=LABELS[entry["arm"]],
            color=COLOURS[entry["arm"]],
        )
    bars.set(
        xlabel=f"worker (slow: {', '.join(map(str, slow_of(results[0])))})",
        ylabel="share of applied updates",
        xticks=range(workers),
        title="each worker's share of updates against its share of data",
    )
    bars.legend(fontsize=7)
    figure.tight_layout()
    path = (
        out_dir / f"heterogeneous_{case}.png"
        if results[0].task.startswith("digits")
        else out_dir / f"heterogeneous_{results[0].task}.png"
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASK_CASES), default="digits")
    parser.add_argument(
        "--cases",
        help="default: every case of the task (digits: unique, stragglers, lognormal; "
        "synthetic: stragglers, lognormal)",
    )
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of training per run")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out-dir", default=str(FIGURES))
    args = parser.parse_args(argv)
    task_cases = TASK_CASES[args.task]
    cases, arms = (args.cases or ",".join(task_cases)).split(","), args.arms.split(",")
    unknown = [name for name in cases if name not in task_cases] + [name for name in arms if name not in ARMS]
    if unknown:
        parser.error(
            f"unknown case or arm {unknown}; cases of {args.task}: {', '.join(task_cases)}; arms: {', '.join(ARMS)}"
        )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_root = Path(tempfile.mkdtemp(prefix="fedq-heterogeneous-"))
    print(f"logs in {log_root}", flush=True)
    rows: list[dict] = []
    try:
        for case in cases:
            spec = task_spec(args.task, case)
            sizes = partition_sizes(spec)
            data = [size / sum(sizes) for size in sizes]
            delays, slow = step_delays(spec, case, args.seed, sizes)
            results = []
            for arm in arms:
                print(f"{case} / {arm} ...", flush=True)
                result = run_one(
                    spec,
                    case,
                    arm,
                    budget=args.budget,
                    concurrency=args.concurrency,
                    seed=args.seed,
                    amqp_url=args.amqp_url,
                    redis_url=args.redis_url,
                    log_root=log_root,
                    arm_flags=ARMS[arm],
                    worker_flags=worker_flags(delays),
                    slow=slow,
                )
                results.append(result)
                rows.append(row(result, data))
                print(
                    "  "
                    + ", ".join(
                        f"{key}={value}"
                        for key, value in rows[-1].items()
                        if key not in ("update_shares", "weight_shares", "data_shares")
                    ),
                    flush=True,
                )
            print(f"  figure: {plot(case, results, [r for r in rows if r['case'] == case], out_dir)}")
    finally:
        stop_all()
    csv_path = out_dir / ("heterogeneous.csv" if args.task == "digits" else f"heterogeneous_{args.task}.csv")
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"\n{'case':<11} {'arm':<9} {'t→' + str(spec.target):>7} {'final':>6} {'slow data':>9} {'slow upd':>8} "
        f"{'slow wt':>7} {'min u/d':>7}  rejected"
    )
    for entry in rows:
        t = "-" if entry["time_to_target_s"] is None else f"{entry['time_to_target_s']:.1f}"
        print(
            f"{entry['case']:<11} {entry['arm']:<9} {t:>7} {entry['final_accuracy']!s:>6} "
            f"{entry['slow_data_share']:>9.3f} {entry['slow_update_share']:>8.3f} {entry['slow_weight_share']:>7.3f} "
            f"{entry['min_update_to_data_ratio']:>7.2f}  {entry['rejected']}"
        )
    print(f"\nCSV: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
