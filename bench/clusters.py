"""What clustering costs: ``bench/throughput.py`` on the shared single servers, then with a
three-node RabbitMQ cluster, a Redis Cluster (three masters, a replica each), both, and both with
``--redis-wait-replicas 1``, all on this machine's loopback; each arm's updates per second, and as a
ratio of the single-server arm measured in the same run (arms alternate, round by round).

    .venv/bin/python bench/clusters.py --only 10k,fedbuff          # about 7 minutes
    .venv/bin/python bench/clusters.py --only 1M,fedbuff --rounds 3

Every node runs on this one 2-core machine, so a cluster here cannot be faster than one server: the
figures say what the client side and replication cost (the node hops, WAIT), not what more machines
would gain. The clusters come from ``tests/private_servers.py`` (their own ports, names, data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.private_servers import PrivateRabbitMQCluster, PrivateRedisCluster  # noqa: E402


def throughput(only: str, amqp_url: str | None, redis_url: str | None, coordinator_args: str, out: Path) -> dict:
    """One ``bench/throughput.py`` run; its result for the configuration ``only`` names."""
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--only", only, "--json", str(out)]
    command += ["--amqp-url", amqp_url] if amqp_url else []
    command += ["--redis-url", redis_url] if redis_url else []
    command += ["--coordinator-args", coordinator_args] if coordinator_args else []
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    [result] = json.loads(out.read_text())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="10k,fedbuff", help="one throughput.py configuration (default 10k,fedbuff)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, alternating (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedq-bench-clusters-") as directory:
        folder = Path(directory)
        print("starting a 3-node RabbitMQ cluster and a 3+3 Redis Cluster ...", flush=True)
        with (
            PrivateRabbitMQCluster(folder / "rabbitmq") as rabbitmq,
            PrivateRedisCluster(folder / "redis") as redis_cluster,
        ):
            arms = {
                "single servers": (None, None, ""),
                "RabbitMQ cluster": (rabbitmq.amqp_urls(), None, ""),
                "Redis Cluster": (None, redis_cluster.url(), ""),
                "both": (rabbitmq.amqp_urls(), redis_cluster.url(), ""),
                "both, wait 1": (rabbitmq.amqp_urls(), redis_cluster.url(), "--redis-wait-replicas 1"),
            }
            rates: dict[str, list[float]] = {arm: [] for arm in arms}
            limits: dict[str, list[float]] = {arm: [] for arm in arms}
            for round_number in range(args.rounds):
                for arm, (amqp_url, redis_url, extra) in arms.items():
                    result = throughput(args.only, amqp_url, redis_url, extra, folder / "result.json")
                    rates[arm].append(result["updates_per_s_median"])
                    limits[arm].append(result["pipeline_limit_updates_per_s"])
                    print(
                        f"round {round_number + 1}: {arm:<18} {result['updates_per_s_median']:8.1f} upd/s "
                        f"(raw limit {result['pipeline_limit_updates_per_s']:.0f})",
                        flush=True,
                    )
    baseline = statistics.median(rates["single servers"])
    print(f"\n{args.only}, median of {args.rounds} run(s) per arm:")
    print(f"{'arm':<18} {'upd/s':>8} {'vs single':>10} {'raw limit':>10}")
    for arm in arms:
        median = statistics.median(rates[arm])
        print(f"{arm:<18} {median:8.1f} {median / baseline:9.2f}x {statistics.median(limits[arm]):10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
