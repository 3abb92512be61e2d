"""Asynchronous vs synchronous aggregation under stragglers: real federations, wall-clock time.

Run from the repository root:

    .venv/bin/python bench/async_vs_sync.py            # everything: ~35-40 minutes on 2 cores
    .venv/bin/python bench/async_vs_sync.py --quick    # digits, stragglers, fedavg vs fedbuff3: ~2-3 minutes
    .venv/bin/python bench/async_vs_sync.py --tasks digits --cases lognormal --arms fedavg,fedbuff3
    .venv/bin/python bench/async_vs_sync.py --plot-only  # redraw figures/table from docs/figures/*.csv

Every run is a real federation: one ``python -m fedq.common.cli coordinator``
process and N ``fedq worker`` processes (worker i with ``--partition i`` and
``--slowdown s_i``) that talk only through RabbitMQ and Redis, as in ``fedq
demo``. Each run has its own job name and is deleted afterwards (Redis keys,
RabbitMQ queues and exchanges); every process this script started is stopped at
the end, also on Ctrl-C or SIGTERM.

Timing: the workers are started first and the coordinator only once every
worker has logged ``event=worker_ready``. Times are measured from the
``created`` timestamp of version 0 in the job's Redis history (the initial
model, committed by the coordinator before it dispatches anything); the
coordinator gets ``--max-seconds`` = budget + 8 s, since its clock starts
before it loads the test set and commits version 0 (~2.5 s for digits); time to
target, final accuracy and the plots only use versions created at most
``--budget`` seconds after version 0. The delay before version 1 is reported
(column ``t_v1``).

Worker start-up (``--launch``). A worker loads its task plugin lazily, on its
first task: for digits that imports scikit-learn (~2.5 s of CPU), and torch's
first forward/backward pass costs another ~1.3 s. Ten cold workers doing that
at once on two cores delayed version 1 by ~30 s in a pilot run (for every arm
alike), which would swamp the differences measured here. And 30 processes each
importing torch (~3.5 s of CPU) take 1-2 minutes to become ready, per run.
So by default (``fork``) one "zygote" process imports torch, the worker and
task modules, runs one forward/backward/SGD step on a 2x2 layer (with one torch
thread, as workers use, so no thread pool exists at fork time), and then forks
one process per worker that calls ``fedq.common.cli.main(["worker", ...])`` -- the
function behind ``python -m fedq.common.cli worker`` -- with its output sent to its
own log. The workers are still separate processes with their own connections;
only imports and torch's warm-up are shared. ``spawn`` starts one ``python -c
"<imports>; <warm-up>; fedq.common.cli.main()" worker ...`` per worker instead, and
``cold`` plain ``python -m fedq.common.cli worker ...`` exactly like ``fedq demo``.

Arms (same concurrency, same workers and delays within one task/case):

    fedavg     --algorithm fedavg                  (synchronous barrier, example-weighted mean)
    fedasync   --algorithm fedasync --staleness polynomial:a=0.5   (mixing rate 0.6, the default)
    fedbuff3   --algorithm fedbuff --buffer-size 3 --staleness polynomial:a=0.5
    fedbuff5   --algorithm fedbuff --buffer-size 5 --staleness polynomial:a=0.5
    fedadam3   fedbuff3 + --server-optimizer adam --server-lr 0.01
    fedbuff3ew fedbuff3 + --example-weighted true   (a control, only with --arms: sync FedAvg is
               always example-weighted, the FedBuff arms weight their buffer uniformly)

Heterogeneity cases (per-task slowdowns are drawn once from --seed, the same for every arm):

    lognormal   worker i sleeps s_i ~ LogNormal(ln 0.5, 1) extra seconds per task (median 0.5 s)
    stragglers  every worker sleeps 0.2 s per task; 30% of the workers (3 of 10, 9 of 30) sleep 2.2 s

Outputs: a table on stdout, ``docs/figures/async_vs_sync.csv`` (one row per
run), ``docs/figures/async_vs_sync_curves.csv`` (every version: time, accuracy,
updates so far) and ``docs/figures/async_vs_sync_<task>_<case>.png`` (accuracy
vs wall-clock time, and the staleness histogram, for every arm).

The pieces: ``async_vs_sync_config.py`` (arms, tasks, cases, slowdowns),
``async_vs_sync_run.py`` (one run), ``async_vs_sync_results.py`` (a run's figures, the
CSVs), ``async_vs_sync_report.py`` (table, PNGs) and ``harness.py`` (processes, the worker
zygote, /proc, job clean-up; shared with ``throughput.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

# Run as a file (python bench/async_vs_sync.py): make ``bench.`` importable from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.async_vs_sync_config import ARMS, CASES, DEFAULT_ARMS, TASKS, slowdowns  # noqa: E402
from bench.async_vs_sync_report import plot, print_table  # noqa: E402
from bench.async_vs_sync_results import CURVES_CSV, SUMMARY_CSV, RunResult, load_results, merged, write_csvs  # noqa: E402
from bench.async_vs_sync_run import run_one  # noqa: E402
from bench.harness import stop_all  # noqa: E402
from fedq.common.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL  # noqa: E402

FIGURES = ROOT / "docs" / "figures"


def _names(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma-separated, default {','.join(DEFAULT_ARMS)}; also: fedbuff3ew (control)",
    )
    parser.add_argument(
        "--budget", type=float, default=90.0, help="wall-clock seconds per run, counted from version 0 (default 90)"
    )
    parser.add_argument("--concurrency", type=int, default=10, help="tasks in flight, the same for every arm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slowdowns and of the initial model")
    parser.add_argument(
        "--quick", action="store_true", help="digits, stragglers, fedavg and fedbuff3 only, 45 s budget (~2-3 minutes)"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help=f"where the CSVs and PNGs go (default {FIGURES.relative_to(ROOT)}; --quick: a temporary "
        "folder). Rows of (task, case, arm) not re-run are kept from its CSVs",
    )
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows in --out-dir instead of keeping them")
    parser.add_argument("--log-dir", default=None, help="process logs (default: a temporary folder)")
    parser.add_argument(
        "--launch",
        choices=("fork", "spawn", "cold"),
        default="fork",
        help="how worker processes start (see the module docstring); default fork",
    )
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw the table and PNGs from the CSVs (and recompute their derived columns)",
    )
    parser.add_argument("--amqp-url", default=os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("FEDQ_REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="fedq-async-vs-sync-quick-") if args.quick else str(FIGURES)
    out_dir = Path(args.out_dir)

    if args.plot_only:
        results = load_results(out_dir)
        write_csvs(results, out_dir)  # recomputes the derived columns
        print_table(results)
        for path in plot(results, out_dir):
            print(f"wrote {path}")
        return 0

    if args.quick:
        args.tasks, args.cases, args.arms, args.budget = "digits", "stragglers", "fedavg,fedbuff3", 45.0
    tasks = _names(args.tasks, list(TASKS), "tasks")
    cases = _names(args.cases, CASES, "cases")
    arms = _names(args.arms, list(ARMS), "arms")
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="fedq-async-vs-sync-"))
    log_root.mkdir(parents=True, exist_ok=True)

    def on_sigterm(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)

    print(
        f"async vs sync: tasks {tasks}, cases {cases}, arms {arms}, budget {args.budget:.0f} s per run, "
        f"concurrency {args.concurrency}, seed {args.seed}; logs in {log_root}",
        flush=True,
    )
    for name in tasks:
        for case in cases:
            delays, slow = slowdowns(case, TASKS[name].workers, args.seed)
            print(f"  {name}/{case}: slowdowns {delays} (slow workers {slow})", flush=True)
    results: list[RunResult] = []

    def everything() -> list[RunResult]:
        return list(results) if args.fresh else merged(results, out_dir)

    try:
        for name in tasks:
            for case in cases:
                for arm in arms:
                    print(f"[{time.strftime('%H:%M:%S')}] {name} {case} {arm} ...", flush=True)
                    result = run_one(
                        TASKS[name],
                        case,
                        arm,
                        budget=args.budget,
                        concurrency=args.concurrency,
                        seed=args.seed,
                        amqp_url=args.amqp_url,
                        redis_url=args.redis_url,
                        log_root=log_root,
                        launch=args.launch,
                    )
                    results.append(result)
                    row = result.row()
                    print(
                        f"    t_target {row['t_target_s']} s, updates {row['updates_to_target']}, "
                        f"final {row['final_acc']} (last 10 s {row['final_acc_last10s']}), versions "
                        f"{row['versions']}, rejected {row['rejected_reasons'] or 0}, staleness mean "
                        f"{row['staleness_mean']} max {row['staleness_max']}, startup {row['startup_s']} s, "
                        f"coordinator CPU {row['coordinator_cpu_s']} s, machine busy {row['machine_busy']}",
                        flush=True,
                    )
                    write_csvs(everything(), out_dir)
    except KeyboardInterrupt:
        print("interrupted: stopping processes and cleaning up", file=sys.stderr)
        stop_all(grace=5)
        write_csvs(everything(), out_dir)
        return 130
    finally:
        stop_all()
    results = everything()
    print()
    print_table(results)
    for path in plot(results, out_dir):
        print(f"wrote {path}")
    print(f"wrote {out_dir / SUMMARY_CSV} and {out_dir / CURVES_CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
