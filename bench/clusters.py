"""What clustering costs: ``bench/throughput.py`` on the shared single servers, then with a
three-node RabbitMQ cluster, a Redis Cluster (three masters, a replica each), both, and both with
``--redis-wait-replicas 1``, all on this machine's loopback; each arm's updates per second, and as a
ratio of the single-server arm measured in the same run (arms alternate, round by round). First,
what one broker node passes: a confirmed publish and get on one node and on the cluster, classic
and quorum queues.

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedq.common.settings import DEFAULT_AMQP_URL  # noqa: E402
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


def confirmed_message_ms(amqp_url: str, queue_type: str, messages: int = 300) -> float:
    """Median milliseconds of one confirmed publish of a 450-byte message (an update's claim) to a
    durable queue of ``queue_type`` and its get and ack: what a broker node does twice per update
    (the update and the next task), with nothing else in the way."""
    import uuid

    from fedq.broker.connection import connect

    connection = connect(amqp_url, name="fedq-bench-clusters")
    queue = f"fedq-bench-clusters-{uuid.uuid4().hex[:8]}"
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": queue_type})
        body, times = bytes(450), []
        for _ in range(messages):
            started = time.perf_counter()
            channel.basic_publish("", queue, body, mandatory=True)  # returns once confirmed
            method, _properties, _body = channel.basic_get(queue)
            assert method is not None and method.delivery_tag is not None
            channel.basic_ack(method.delivery_tag)
            times.append(time.perf_counter() - started)
        channel.queue_delete(queue)
        return statistics.median(times) * 1000
    finally:
        connection.close()


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
            print("one confirmed publish + get + ack of 450 bytes, median of 300:")
            for name, url in [("one node", None), ("3-node cluster", rabbitmq.amqp_urls())]:
                for queue_type in ("classic", "quorum"):
                    milliseconds = confirmed_message_ms(url or DEFAULT_AMQP_URL, queue_type)
                    print(
                        f"  {name:<15} {queue_type:<8} {milliseconds:.2f} ms: at two per update, "
                        f"{1000 / (2 * milliseconds):.0f} updates/s",
                        flush=True,
                    )
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
