"""Coordinator throughput: updates applied per second, with workers that answer instantly.

Run from the repository root (the coordinator loads ``bench.models:MLPTask`` by module path):

    .venv/bin/python bench/throughput.py                 # ~4 minutes (10k, 1M and 10M parameters)
    .venv/bin/python bench/throughput.py --quick         # ~2 minutes
    .venv/bin/python bench/throughput.py --quick --profile  # + py-spy breakdown of the coordinator
    .venv/bin/python bench/throughput.py --wait-quiet 60 --retries 2   # on a shared machine

For each (model size, algorithm) it starts a real coordinator subprocess
(``python -m fedq.common.cli coordinator ... --eval-every 0 --max-versions N``) on a
fresh job, plus fake workers (threads in this process, one pika connection
each) that answer every task at once with an all-zeros delta, encoded exactly
as ``worker.service`` does: inline when the safetensors payload is <= 256 KiB,
else SET in Redis first and sent as a claim check (key, sha256, nbytes). Each
update is published with publisher confirms before its task is acked.

Throughput is read back from the job's Redis history: the ``created`` time of
each version (stamped in ``ModelStore.commit`` just before the weights blob is
SET), skipping a warm-up. Alongside it, the same run reports the coordinator's
own ``aggregation_seconds`` (aggregator step + server optimizer, from version
metadata) and a plain numpy ``acc += w * x`` over as many float32 elements,
so one sees how much of a server step is arithmetic and how much is I/O,
serialisation and bookkeeping. Every job is deleted afterwards (Redis keys and
RabbitMQ queues/exchanges).

The pieces: ``throughput_run.py`` (configurations, one run, its analysis),
``throughput_workers.py`` (the fake workers), ``throughput_monitor.py`` (CPU use and
Redis memory), ``throughput_profile.py`` (py-spy summary), ``throughput_report.py``
(table, --json) and ``harness.py`` (processes, /proc, job clean-up; shared with
``async_vs_sync.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as a file (python bench/throughput.py): make ``bench.`` importable from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import wait_for_quiet_machine  # noqa: E402
from bench.throughput_limit import QUEUE_KINDS, pipeline_limit  # noqa: E402
from bench.throughput_monitor import BUSY_OTHER  # noqa: E402
from bench.throughput_report import print_table, write_json  # noqa: E402
from bench.throughput_run import CONFIGS, numpy_add_seconds, run_config, zero_delta  # noqa: E402
from fedq.common.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer versions per run (~30 s in all)")
    parser.add_argument("--only", default="", help="comma-separated filter, e.g. 10k or 1M,fedbuff")
    parser.add_argument("--concurrency", type=int, default=4, help="coordinator --concurrency (default 4)")
    parser.add_argument("--worker-threads", type=int, default=2, help="fake worker threads (default 2)")
    parser.add_argument("--versions-scale", type=float, default=1.0, help="multiply every run's --max-versions")
    parser.add_argument("--warmup", type=int, default=5, help="versions skipped at the start (at least)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="... or this fraction, if more")
    parser.add_argument("--max-seconds", type=float, default=45.0, help="coordinator --max-seconds cap per run")
    parser.add_argument(
        "--coordinator-args", default="", help="extra coordinator flags, e.g. '--hot-versions 30' (quoted, one string)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the machine to be idle (shared hosts)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="run a configuration again (up to N times) when other processes were busy during it; "
        "the least disturbed run is reported",
    )
    parser.add_argument("--log-level", default="INFO", help="coordinator log level (logs go to --log-dir)")
    parser.add_argument("--log-dir", default=None, help="where coordinator logs go (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="run each coordinator under py-spy record --idle")
    parser.add_argument("--profile-dir", default=None, help="where py-spy raw profiles go (default: --log-dir)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--amqp-url", default=os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("FEDQ_REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if Path.cwd().resolve() != ROOT:
        os.chdir(ROOT)  # the coordinator imports bench.models from the working directory
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="fedq-bench-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    args.profile_dir = args.profile_dir or args.log_dir
    if args.profile:
        args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(args.py_spy).exists():
            parser.error("--profile needs py-spy (.venv/bin/pip install py-spy)")

    filters = [item.strip().lower() for item in args.only.split(",") if item.strip()]
    configs = [
        config
        for config in CONFIGS
        if all(item in (config.model.lower(), config.algorithm) for item in filters) or not filters
    ]
    print(
        "fedq coordinator throughput: "
        f"{len(configs)} runs, concurrency {args.concurrency}, "
        f"{args.worker_threads} fake worker threads, {os.cpu_count()} CPUs; logs in {args.log_dir}",
        flush=True,
    )
    references: dict[int, float] = {}

    def measure_limits(payload_bytes: int, buffer_size: int) -> dict[str, float]:
        """The machine's pipeline limit for these sizes, per queue kind, measured now."""
        return {
            queues: pipeline_limit(
                args.amqp_url, args.redis_url, payload_bytes, payload_bytes, buffer_size, queues=queues
            ).updates_per_second
            for queues in QUEUE_KINDS
        }

    results = []
    started = time.monotonic()
    for config in configs:
        if config.parameters not in references:
            references[config.parameters] = numpy_add_seconds(config.parameters)
        # The limit is measured just before each run and again just after it, and the higher of
        # the two counts: right after a run it once measured 447 updates/s against 724 a minute
        # before, and a limit caught at a bad moment would flatter fedq's share of it.
        delta = zero_delta(config)
        before = measure_limits(len(delta.payload), config.buffer_size)
        if args.wait_quiet:
            busy = wait_for_quiet_machine(args.wait_quiet)
            if busy >= 0.3:
                print(f"  (machine still {busy:.0%} of a core busy after waiting {args.wait_quiet:.0f} s)", flush=True)
        result = run_config(config, args, references[config.parameters], delta)
        for attempt in range(args.retries):
            if result.cpu.get("other", 0.0) <= BUSY_OTHER:
                break
            print(
                f"  {config.model:>4} {config.algorithm:<8}: other processes used {result.cpu['other']:.0%} of a core; "
                f"running again ({attempt + 1}/{args.retries})",
                flush=True,
            )
            if args.wait_quiet:
                wait_for_quiet_machine(args.wait_quiet)
            again = run_config(config, args, references[config.parameters], delta)
            if again.cpu.get("other", 0.0) < result.cpu.get("other", 0.0):
                result = again
        after = measure_limits(len(delta.payload), config.buffer_size)
        result.limit_measurements = [before["classic"], after["classic"]]
        result.limit_updates_per_s = max(result.limit_measurements)
        result.quorum_limit_updates_per_s = max(before["quorum"], after["quorum"])
        results.append(result)
        share = result.updates_per_s_median / result.limit_updates_per_s
        print(
            f"  {config.model:>4} {config.algorithm:<8}: {result.versions} versions in {result.wall_seconds:.1f} s "
            f"(measured {result.measured}, mean staleness {result.mean_staleness:.2f}), "
            f"{result.updates_per_s_median:.1f} updates/s, {share:.0%} of the pipeline limit "
            f"({result.limit_updates_per_s:.3g} updates/s, the higher of "
            f"{' and '.join(f'{limit:.3g}' for limit in result.limit_measurements)} before and after; "
            f"through quorum queues {result.quorum_limit_updates_per_s:.3g})",
            flush=True,
        )
        for note in result.notes:
            print(f"      {note}", flush=True)
    print(f"\ntotal {time.monotonic() - started:.0f} s\n")
    print_table(results)
    if args.json:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
