"""Scale: one coordinator against 10 and then 1,000 simulated workers, its memory over time.

Run from the repository root (the coordinator loads ``bench.models:MLPTask`` by module path):

    .venv/bin/python bench/scale.py                 # 10 minutes per arm, ~21 minutes in all
    .venv/bin/python bench/scale.py --quick         # 1 minute per arm, ~3 minutes in all
    .venv/bin/python bench/scale.py --workers 10,100,1000 --minutes 5 --json scale.json

Each arm is a fresh coordinator process on its own job (``bench-scale-<n>-<hex>``): the
1M-parameter MLP (``bench.models:MLPTask``, LARGE), ``--algorithm fedbuff --buffer-size 10
--eval-every 0``, ``--concurrency`` = the number of workers, so that each worker can hold a task.
The workers are simulated (``scale_workers.py``): a few processes, each answering for many
worker ids on one connection, every worker one task at a time with a random training time and
the all-zeros delta, claim-checked in Redis as a real worker sends it. The training times are
chosen so that every arm offers the same ``--rate`` of updates per second: the arms differ in
the number of workers and of tasks in flight, not in load.

Every few seconds: the coordinator's RSS (/proc/<pid>/status), Redis ``used_memory``, the job's
queue depths and the head version. Afterwards, from the job's history (both tiers) and the
workers' stamps: updates per second and update latency. It prints per arm a table over time
and a summary (RSS at the start and end of the steady window, its least-squares slope, the
first and last minute's medians), then the 1,000-worker arm's steady RSS minus the 10-worker
arm's against 4x the model's size. Every job and its archive are deleted afterwards.

The pieces: ``scale_run.py`` (one arm), ``scale_workers.py`` (the simulated workers),
``scale_report.py`` (tables, summary, --json) and ``harness.py`` (processes, job clean-up).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

# Run as a file (python bench/scale.py): make ``bench.`` importable from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import stop_all  # noqa: E402
from bench.models import LARGE, MLPTask  # noqa: E402
from bench.scale_report import (  # noqa: E402
    MB,
    arm_rows,
    arm_summary,
    comparison,
    print_comparison,
    print_rows,
    print_summary,
    write_json,
)
from bench.scale_run import BUFFER_SIZE, run_arm  # noqa: E402
from fedq.common.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL  # noqa: E402
from fedq.common.wire import codec  # noqa: E402

# With its archiver on (the default), a 1M FedBuff K=10 coordinator fed by 10 simulated workers
# that answer at once applied ~25 updates/s on this 2-core machine (``--workers 10 --rate 200``);
# 15 is 60 % of that, so that queues stay bounded.
DEFAULT_RATE = 15.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="10,1000", help="simulated workers per arm, comma-separated")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each arm (default 10)")
    parser.add_argument("--quick", action="store_true", help="1 minute per arm, shorter warm-up and rows")
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help=f"updates/s all workers together offer (default {DEFAULT_RATE:g}): mean training time = workers / rate",
    )
    parser.add_argument("--spread", type=float, default=0.5, help="training time uniform in mean * (1 +- spread)")
    parser.add_argument("--processes", type=int, default=4, help="processes the simulated workers share (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training times")
    parser.add_argument("--sample-seconds", type=float, default=None, help="between samples (default 5; quick 2)")
    parser.add_argument("--row-seconds", type=float, default=None, help="a table row per (default 60; quick 10)")
    parser.add_argument(
        "--warmup-seconds", type=float, default=None, help="not part of the steady window (default 60; quick a third)"
    )
    parser.add_argument(
        "--tolerance-mb",
        type=float,
        default=None,
        help="RSS growth over the steady window that still counts as flat (default: the model's size)",
    )
    parser.add_argument(
        "--coordinator-args", default="", help="extra coordinator flags, e.g. '--redis-budget-mb 8192' (one string)"
    )
    parser.add_argument("--archive", default=None, help="the coordinators' --archive (default: under --log-dir)")
    parser.add_argument("--log-dir", default=None, help="coordinator and worker logs (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write settings, samples, rows and summaries here")
    parser.add_argument("--amqp-url", default=os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("FEDQ_REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    quick = args.quick
    if quick and args.minutes == parser.get_default("minutes"):
        args.minutes = 1.0
    args.sample_seconds = args.sample_seconds or (2.0 if quick else 5.0)
    args.row_seconds = args.row_seconds or (10.0 if quick else 60.0)
    if args.warmup_seconds is None:
        args.warmup_seconds = args.minutes * 60 / 3 if quick else 60.0
    args.arms = [int(count) for count in args.workers.split(",") if count.strip()]
    if not args.arms or min(args.arms) < 1 or args.rate <= 0 or not 0 <= args.spread < 1:
        parser.error("--workers needs positive counts, --rate a positive rate, --spread a value in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if Path.cwd().resolve() != ROOT:
        os.chdir(ROOT)  # the coordinator imports bench.models from the working directory
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="fedq-bench-scale-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    args.archive = args.archive or str(Path(args.log_dir) / "archive")
    args.coordinator_args = f"--archive {shlex.quote(args.archive)} {args.coordinator_args}"

    weights = MLPTask(LARGE).initial_weights(0)
    model_bytes = sum(array.nbytes for array in weights.values())
    tensor_specs = {name: [list(shape), dtype] for name, (shape, dtype) in codec.tensor_specs(weights).items()}
    tolerance_bytes = args.tolerance_mb * MB if args.tolerance_mb is not None else model_bytes
    seconds = args.minutes * 60

    def on_sigterm(_signum, _frame):
        raise KeyboardInterrupt  # run_arm's clean-up runs on the way out

    signal.signal(signal.SIGTERM, on_sigterm)
    print(
        f"fedq scale: arms {args.arms} workers, {args.minutes:g} min each, model {codec.num_parameters(weights):,} "
        f"parameters ({model_bytes / MB:.1f} MB), FedBuff K={BUFFER_SIZE}, offered {args.rate:g} updates/s "
        f"(training time mean workers/rate, spread {args.spread:g}), {args.processes} worker processes, "
        f"{os.cpu_count()} CPUs; logs in {args.log_dir}",
        flush=True,
    )
    arms = []
    failed = False
    try:
        for workers in args.arms:
            started = time.monotonic()
            print(
                f"\n[{time.strftime('%H:%M:%S')}] {workers} workers, mean training time "
                f"{workers / args.rate:.2f} s ...",
                flush=True,
            )
            try:
                result = run_arm(workers, seconds, args, list(LARGE), tensor_specs)
            except RuntimeError as error:  # a coordinator or worker process failed: say so, go on
                print(f"{workers} workers: FAILED: {error}", flush=True)
                failed = True
                continue
            rows = arm_rows(result, args.row_seconds)
            summary = arm_summary(result, args.warmup_seconds, tolerance_bytes)
            arms.append((result, rows, summary))
            print(
                f"{workers} workers, job {result.job}, {time.monotonic() - started:.0f} s in all; queue depths "
                f"from {result.depth_source or '?'} (ready/unacked); t from version 0; CPU in % of one core",
                flush=True,
            )
            print_rows(rows)
            print_summary(summary, tolerance_bytes)
    except KeyboardInterrupt:
        print("interrupted: stopping processes and cleaning up", file=sys.stderr)
        return 130
    finally:
        stop_all(grace=5)
    print()
    compared = comparison([summary for _, _, summary in arms], model_bytes)
    print_comparison(compared)
    if args.json:
        settings = {name: value for name, value in vars(args).items() if name != "json"}
        write_json(args.json, settings | {"model_bytes": model_bytes}, arms, compared)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
