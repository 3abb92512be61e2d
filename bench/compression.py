"""Uplink compression, downlink diffs and differential privacy: bytes, accuracy, time and CPU.

Run from the repository root:

    .venv/bin/python bench/compression.py                 # everything: ~45 minutes on 2 cores
    .venv/bin/python bench/compression.py --quick         # smoke test, ~5 minutes, outputs to a temp dir
    .venv/bin/python bench/compression.py --only cost     # the in-process microbenchmark alone
    .venv/bin/python bench/compression.py --tasks 1m --arms none,topk1-ef --only runs
    .venv/bin/python bench/compression.py --only dp-long  # ~5 minutes, after a run of dp
    .venv/bin/python bench/compression.py --plot-only     # tables and PNGs from the CSVs

Three parts (``--only runs,dp,cost``), and a fourth on request:

- ``runs``: real federations (a coordinator and ``fedq worker`` processes on RabbitMQ and Redis),
  one fresh job per arm, FedBuff K=3 with the default (adaptive) staleness bound, 10 tasks in
  flight, no simulated delays. Tasks: digits (10 workers, target 0.90, 40 s), Synthetic(1,1)
  (30 devices, 10 at a time, target 0.60, 40 s) and ``1m``: digits28 with a 784-1262-10 MLP
  (1,003,300 parameters, 10 workers, target 0.90, 60 s). Arms: ``none`` and, for fp16, bf16,
  int8, topk 1 %, topk 10 % and prune 10 %, error feedback on (``-ef``) and off (``-noef``);
  the 1m task runs nine of them (see DEFAULT_ARMS). ``--downlink`` is the coordinator's default
  (``auto``: diffs with topk and prune only). Reported: uplink bytes per update (the workers'
  ``sent_bytes``) and its ratio to ``none``, downlink bytes per task (``read_bytes``) and the
  share of reads served by diffs, time to the target, accuracy at the budget (the last version,
  and the mean of the last 10 s), and the chains of diffs a worker 1, 3 and 10 versions behind
  would read (the run's last ~22 versions, diffed again with the coordinator's ``make_diff``).
- ``dp``: digits, FedBuff K=3 with the fixed cut (central DP needs it). A non-DP baseline gives
  the clip (the median norm of its applied updates) and the steps it made in the budget; the
  noise is the smallest multiplier that keeps that many steps within epsilon 8 at delta 1e-5
  (``privacy.epsilon``), and ``--dp-epsilon 8`` stops the run before it would exceed it. Central
  DP with sampling rate 1 (no assumption), then 20 workers on 20 partitions with
  ``--dp-population 20`` (rate 3/20) next to their own baseline, then local DP (planned for the
  baseline's busiest worker's updates).
- ``dp-long`` (``--only dp-long``, after ``dp``): dp20-central's clip and noise again, given up
  to 480 s to make the steps it was planned for (it stops itself at epsilon 8).
- ``cost``: in-process (bench/compression_cost.py): encode, decode, roundtrip, make_diff and
  apply_diff against one training step, per model.

Outputs: tables on stdout; in ``--out-dir`` (default docs/figures; a temp dir with --quick)
compression.csv, compression_curves.csv, compression_downlink.csv, compression_cost.csv (rows
of earlier runs that were not re-run are kept), compression_uplink.png and compression_curves.png.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import compression_report as report  # noqa: E402
from bench.async_vs_sync_config import TaskSpec  # noqa: E402
from bench.compression_config import ALGORITHM, ARMS, BENCH_TASKS, DEFAULT_ARMS, DP_ALGORITHM, QUICK_ARMS  # noqa: E402
from bench.compression_run import (  # noqa: E402
    ArmResult,
    downlink_rows,
    run_arm,
    summary_row,
)
from bench.harness import stop_all, wait_for_quiet_machine  # noqa: E402

FIGURES = ROOT / "docs" / "figures"
PARTS = ("runs", "dp", "dp-long", "cost")
DP_DELTA = 1e-5
DP_EPSILON = 8.0
DP_POPULATION = 20
# dp-long: dp20-central's settings, given the time to make the steps it was planned for (the
# coordinator stops itself at epsilon 8): with a sampling rate below 1, each step's accounting
# costs the coordinator ~0.15-0.25 s (measured), so the 40-s run makes a fraction of them.
DP_LONG_BUDGET = 480.0
BUFFER_SIZE = 3


def plan_noise(sample_rate: float, steps: int, delta: float = DP_DELTA, budget: float = DP_EPSILON) -> float:
    """The smallest noise multiplier (to 0.01) whose ``steps`` mechanisms at ``sample_rate``
    spend at most ``budget``."""
    from fedq.common.privacy import epsilon

    low, high = 0.01, 1000.0
    while high - low > 0.002:
        middle = (low + high) / 2
        if epsilon(middle, sample_rate, steps, delta) <= budget:
            high = middle
        else:
            low = middle
    return math.ceil(high * 100) / 100


class Session:
    """The run's settings and what it has measured so far."""

    def __init__(self, args: argparse.Namespace, log_root: Path):
        self.args = args
        self.log_root = log_root
        self.results: list[ArmResult] = []

    def run(self, task: str, arm: str, flags: list[str], budget: float | None = None, **extra) -> ArmResult:
        args = self.args
        bench = BENCH_TASKS[task]
        budget = budget or args.budget or (bench.quick_budget if args.quick else bench.budget)
        load = wait_for_quiet_machine(args.wait_quiet, threshold=0.5)  # at least one 1-s sample
        quiet = f"machine {load:.2f} cores busy before it"
        spec = extra.get("spec") or bench.spec
        print(f"{task} / {arm}: {spec.workers} workers, {budget:.0f} s, {' '.join(flags)}  [{quiet}]", flush=True)
        started = time.monotonic()
        result = run_arm(
            bench,
            arm,
            flags,
            budget=budget,
            seed=args.seed,
            amqp_url=args.amqp_url,
            redis_url=args.redis_url,
            log_root=self.log_root,
            **extra,
        )
        result.load_before = load
        self.results.append(result)
        row = summary_row(result)
        print(
            f"  {time.monotonic() - started:.0f} s: t→{row['target']} {row['t_target_s']}, final {row['final_acc']}, "
            f"last10s {row['final_acc_last10s']}, up {row['up_bytes_median']} B, down {row['down_bytes_mean']} B/task, "
            f"reads full/diffs/cache/held {row['reads_full']}/{row['reads_diffs']}/{row['reads_cache']}/"
            f"{row['reads_held']}, versions {row['versions_in_budget']}, rejected {row['rejected'] or '-'}"
            + (f", epsilon {row['epsilon']} after {row['dp_steps']} steps" if row["epsilon"] is not None else ""),
            flush=True,
        )
        return result


def compression_runs(session: Session, tasks: list[str], arms: list[str] | None) -> None:
    for task in tasks:
        chosen = arms or (QUICK_ARMS.get(task, ()) if session.args.quick else DEFAULT_ARMS[task])
        for arm in chosen:
            session.run(task, arm, [*ALGORITHM, *ARMS[arm].flags])


def dp_runs(session: Session) -> None:
    """Baselines, then central DP (rate 1; 20 workers with a population), then local DP."""
    base = session.run("digits", "dp-baseline", [*DP_ALGORITHM], group="dp", measure_diffs=False)
    clip = _clip(base)
    steps = base.versions_in_budget
    noise = plan_noise(1.0, steps)
    print(f"  plan: clip {clip:.4g} (median of {len(base.norms)} norms), {steps} steps at rate 1 -> noise {noise}")
    _dp_run(session, "digits", "dp-central", "central", clip, noise, 1.0, steps)
    if session.args.quick:
        return
    spec20 = digits20()
    base20 = session.run("digits", "dp20-baseline", [*DP_ALGORITHM], group="dp", measure_diffs=False, spec=spec20)
    clip20, steps20, rate = _clip(base20), base20.versions_in_budget, BUFFER_SIZE / DP_POPULATION
    noise20 = plan_noise(rate, steps20)
    print(f"  plan: clip {clip20:.4g}, {steps20} steps at rate {rate:.2f} -> noise {noise20}")
    _dp_run(session, "digits", "dp20-central", "central", clip20, noise20, rate, steps20, spec=spec20)
    updates = max(base.updates_in_budget.values(), default=1)
    noise_local = plan_noise(1.0, updates)
    print(f"  plan (local): clip {clip:.4g}, {updates} updates of the busiest worker at rate 1 -> noise {noise_local}")
    _dp_run(session, "digits", "dp-local", "local", clip, noise_local, 1.0, updates)


def digits20() -> TaskSpec:
    """Digits on DP_POPULATION partitions, one worker each."""
    digits = BENCH_TASKS["digits"].spec
    return replace(
        digits, name="digits20", params={**digits.params, "num_partitions": DP_POPULATION}, workers=DP_POPULATION
    )


def dp_long_run(session: Session, out_dir: Path) -> None:
    """dp20-central's clip and noise (from compression.csv) until epsilon 8 or DP_LONG_BUDGET seconds."""
    from bench.compression_report import SUMMARY_CSV, num, read_rows

    row = next((row for row in read_rows(out_dir / SUMMARY_CSV) if row["arm"] == "dp20-central"), None)
    if row is None:
        raise SystemExit(f"dp-long needs dp20-central's row in {out_dir / SUMMARY_CSV}: run --only dp first")
    clip, noise, steps = num(row["dp_clip"]), num(row["dp_noise"]), int(num(row["dp_planned_steps"]))
    rate = BUFFER_SIZE / DP_POPULATION
    print(f"  dp20-central's plan: clip {clip:g}, noise {noise:g}, {steps} steps at rate {rate:.2f}")
    _dp_run(
        session,
        "digits",
        "dp20-central-long",
        "central",
        clip,
        noise,
        rate,
        steps,
        spec=digits20(),
        budget=DP_LONG_BUDGET,
    )


def _clip(base: ArmResult) -> float:
    if not base.norms:
        raise RuntimeError(f"the baseline {base.run.job} applied no update: no norm to clip to")
    return float(f"{statistics.median(base.norms):.4g}")


def _dp_run(
    session: Session,
    task: str,
    arm: str,
    mode: str,
    clip: float,
    noise: float,
    rate: float,
    steps: int,
    spec: TaskSpec | None = None,
    budget: float | None = None,
) -> None:
    flags = [*DP_ALGORITHM, "--dp", mode, "--dp-clip", f"{clip:g}", "--dp-noise", f"{noise:g}"]
    flags += ["--dp-delta", f"{DP_DELTA:g}", "--dp-epsilon", f"{DP_EPSILON:g}"]
    population = DP_POPULATION if spec is not None else None
    if population:
        flags += ["--dp-population", str(population)]
    result = session.run(task, arm, flags, budget=budget, group="dp", measure_diffs=False, spec=spec)
    result.dp_settings = {
        "mode": mode,
        "clip": clip,
        "noise": noise,
        "population": population,
        "sample_rate": rate,
        "planned_steps": steps,
    }


def cost_rows(quick: bool, tasks: list[str]) -> list[dict]:
    from bench.compression_cost import measure

    rows = []
    for task in tasks:
        bench = BENCH_TASKS[task]
        repeats = (3 if quick else 11) if task == "1m" else (11 if quick else 51)
        wait_for_quiet_machine(20, threshold=0.5)
        print(f"cost: {task} ({repeats} repeats) ...", flush=True)
        rows += measure(task, bench.spec, repeats)
    return rows


def curve_rows(result: ArmResult) -> list[dict]:
    return [
        {
            "task": result.task,
            "arm": result.arm,
            "version": point["version"],
            "t_s": round(point["t"], 3),
            "accuracy": "" if point["accuracy"] is None else round(point["accuracy"], 4),
            "updates": point["updates"],
        }
        for point in result.run.curve
    ]


def write_outputs(session: Session, costs: list[dict], out_dir: Path) -> None:
    results = session.results
    rows = report.write_merged(out_dir, report.SUMMARY_CSV, [summary_row(result) for result in results])
    curves = report.write_merged(out_dir, report.CURVES_CSV, [row for r in results for row in curve_rows(r)])
    downlink = report.write_merged(
        out_dir,
        report.DOWNLINK_CSV,
        [row for result in results if result.diff_sizes for row in downlink_rows(result)],
    )
    costs = report.write_merged(out_dir, report.COST_CSV, costs)
    show(rows, curves, downlink, costs, out_dir)


def show(rows: list[dict], curves: list[dict], downlink: list[dict], costs: list[dict], out_dir: Path) -> None:
    report.print_arms(rows)
    report.print_downlink(downlink)
    report.print_dp(rows)
    report.print_cost(costs)
    for path in (report.plot_uplink(rows, out_dir), report.plot_curves(rows, curves, out_dir)):
        if path:
            print(f"figure: {path}")
    print(f"CSVs in {out_dir}")


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(BENCH_TASKS), help="digits, synthetic, 1m")
    parser.add_argument("--arms", help=f"default: per task (the 1m task runs fewer); any of {', '.join(ARMS)}")
    parser.add_argument("--only", default="runs,dp,cost", help="runs, dp, cost, dp-long (not by default: ~5 minutes)")
    parser.add_argument("--budget", type=float, help="seconds of training per run (default: per task)")
    parser.add_argument("--quick", action="store_true", help="few arms, short budgets, outputs to a temp dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-quiet", type=float, default=10.0, help="wait up to this long for a quiet machine")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out-dir", help="default: docs/figures (with --quick: a temp dir)")
    parser.add_argument("--plot-only", action="store_true", help="tables and PNGs from the CSVs in --out-dir")
    args = parser.parse_args(argv)
    tasks, parts = args.tasks.split(","), args.only.split(",")
    arms = args.arms.split(",") if args.arms else None
    unknown = [t for t in tasks if t not in BENCH_TASKS] + [p for p in parts if p not in PARTS]
    unknown += [a for a in arms or () if a not in ARMS]
    if unknown:
        parser.error(f"unknown {unknown}; tasks: {', '.join(BENCH_TASKS)}; parts: {', '.join(PARTS)}")
    if args.quick and not args.arms:
        tasks = [task for task in tasks if task in QUICK_ARMS]
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="fedq-compression-out-") if args.quick else str(FIGURES)))
    if args.plot_only:
        show(*(report.read_rows(out_dir / name) for name in report.KEYS), out_dir)
        return 0
    log_root = Path(tempfile.mkdtemp(prefix="fedq-compression-"))
    print(f"logs in {log_root}; outputs to {out_dir}; parts {', '.join(parts)}; tasks {', '.join(tasks)}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    session = Session(args, log_root)
    costs: list[dict] = []
    try:
        if "runs" in parts:
            compression_runs(session, tasks, arms)
        if "dp" in parts:
            dp_runs(session)
        if "dp-long" in parts:
            dp_long_run(session, out_dir)
        if "cost" in parts:
            costs = cost_rows(args.quick, tasks)
    except BaseException:
        print("stopped: writing what was measured so far", file=sys.stderr)
        raise
    finally:
        stop_all()
        if session.results or costs:
            write_outputs(session, costs, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
