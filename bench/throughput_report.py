"""``throughput.py``'s output: the results table, CPU use, Redis memory, and the --json file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.throughput_monitor import BUSY_OTHER
from bench.throughput_run import Result


def fmt_ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1e3:.2f}"


def print_table(results: list[Result]) -> None:
    headers = [
        "model",
        "params",
        "algorithm",
        "delta",
        "upd/s med",
        "upd/s mean",
        "limit upd/s",
        "of limit",
        "quorum limit",
        "commit ms med",
        "p90 ms",
        "aggr ms med",
        "numpy ms/version",
        "interval/numpy",
        "aggr/interval",
    ]
    rows = []
    for result in results:
        config = result.config
        math_ms = result.numpy_add * config.buffer_size
        rows.append(
            [
                config.model,
                f"{config.parameters:,}",
                config.algorithm if config.algorithm == "fedasync" else f"fedbuff K={config.buffer_size}",
                f"{'inline' if result.inline else 'claim'} {result.payload_bytes / 1024:.0f} KiB",
                f"{result.updates_per_s_median:.1f}",
                f"{result.updates_per_s_mean:.1f}",
                f"{result.limit_updates_per_s:.3g}",
                f"{result.updates_per_s_median / result.limit_updates_per_s:.0%}",
                f"{result.quorum_limit_updates_per_s:.3g}",
                fmt_ms(result.interval_median),
                fmt_ms(result.interval_p90),
                fmt_ms(result.aggregation_median),
                f"{math_ms * 1e3:.3f}",
                f"{result.interval_median / math_ms:.0f}x" if math_ms else "n/a",
                f"{result.aggregation_median / result.interval_median:.1%}",
            ]
        )
    widths = [max(len(str(row[i])) for row in rows + [headers]) for i in range(len(headers))]
    line = "  ".join(header.rjust(width) for header, width in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
    print()
    print("upd/s med      = updates per version / median commit interval; upd/s mean = updates applied / elapsed")
    print("limit upd/s    = the bare Redis/RabbitMQ operations of one update, back to back (throughput_limit.py)")
    print("of limit       = upd/s med as a share of that limit, measured just before and after the run (the higher)")
    print("quorum limit   = the same operations through durable quorum queues, as fedq's are (one after the other)")
    print("commit ms      = time between consecutive versions' 'created' stamps (one server step, all I/O included)")
    print("aggr ms        = coordinator's own aggregation_seconds (aggregator step + server optimizer)")
    print("numpy ms/ver.  = plain numpy `acc += w*x` over the same float32 count, x updates per version")
    print("interval/numpy = commit interval / that numpy time; aggr/interval = share of a step spent in the math")
    parties = ["coordinator", "fake workers", "redis", "rabbitmq", "other"]
    if any(result.cpu for result in results):
        print()
        print(
            "CPU use during the measured window, % of one core (this machine has "
            f"{os.cpu_count()} cores; the fake workers run in the benchmark process):"
        )
        print(f"{'model':>6}  {'algorithm':<13}" + "".join(f"{party:>14}" for party in parties) + f"{'total':>10}")
        for result in results:
            cells = [result.cpu.get(party) for party in parties]
            total = sum(cell for cell in cells if cell is not None)
            print(
                f"{result.config.model:>6}  {result.config.algorithm:<13}"
                + "".join(f"{'n/a' if cell is None else f'{cell:.0%}':>14}" for cell in cells)
                + f"{total:>10.0%}"
            )
        if any(result.cpu.get("other", 0) > BUSY_OTHER for result in results):
            print(
                f"NOTE: 'other' > {BUSY_OTHER:.0%} of a core: something else was busy on this machine; "
                "figures are pessimistic."
            )
    print()
    print("Redis memory growth per version (the server's used_memory, so other jobs' writes count too; the")
    print("coordinator's archiver moves history out of Redis every --archive-seconds, so short runs see the peak):")
    for result in results:
        print(
            f"{result.config.model:>6}  {result.config.algorithm:<13}  "
            f"+{result.redis_bytes_per_version / 2**20:8.2f} MiB/version   "
            f"server used_memory peak {result.redis_peak_bytes / 2**20:8.0f} MiB after {result.versions} versions"
        )


def write_json(results: list[Result], path: str) -> None:
    """``--json FILE``: every run's figures, one object per run."""
    Path(path).write_text(
        json.dumps(
            [
                {
                    "model": r.config.model,
                    "parameters": r.config.parameters,
                    "algorithm": r.config.algorithm,
                    "buffer_size": r.config.buffer_size,
                    "versions": r.versions,
                    "measured": r.measured,
                    "updates_per_s_median": r.updates_per_s_median,
                    "updates_per_s_mean": r.updates_per_s_mean,
                    "pipeline_limit_updates_per_s": r.limit_updates_per_s,
                    "pipeline_limit_measurements": r.limit_measurements,
                    "quorum_pipeline_limit_updates_per_s": r.quorum_limit_updates_per_s,
                    "commit_interval_median_s": r.interval_median,
                    "commit_interval_p90_s": r.interval_p90,
                    "aggregation_median_s": r.aggregation_median,
                    "numpy_add_s": r.numpy_add,
                    "payload_bytes": r.payload_bytes,
                    "inline": r.inline,
                    "cpu_share": r.cpu,
                    "redis_bytes_per_version": r.redis_bytes_per_version,
                    "redis_peak_bytes": r.redis_peak_bytes,
                }
                for r in results
            ],
            indent=2,
        )
    )
