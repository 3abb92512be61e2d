"""fedq on a three-node RabbitMQ cluster (private nodes on loopback, clustered with
``rabbitmqctl join_cluster``): workers connected to different nodes, and the node that leads the
job's queues killed mid-run and restarted. The run completes with nothing lost and nothing applied
twice, and its history replays bit for bit."""

from __future__ import annotations

import shutil
import signal
import urllib.parse

import pytest

from fedq.common.store import ModelStore, connect_redis
from tests.integration.test_crash_recovery import TRAINING, assert_exactly_once_and_replayable, done_task_ids
from tests.private_servers import RABBITMQ_BIN, PrivateRabbitMQCluster
from tests.support import REDIS_URL, wait_until

pytestmark = pytest.mark.skipif(
    not (RABBITMQ_BIN / "rabbitmq-server").exists() or shutil.which("epmd") is None,
    reason="RabbitMQ's server is not installed (Debian package rabbitmq-server; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with PrivateRabbitMQCluster(tmp_path_factory.mktemp("rabbitmq-cluster"), size=3) as started:
        yield started


def queue_leader(cluster: PrivateRabbitMQCluster, queue: str) -> str:
    """The node that leads quorum queue ``queue``, asked of any node that answers."""
    path = "/api/queues/%2F/" + urllib.parse.quote(queue, safe="")
    for node in cluster.nodes:
        if node.node not in cluster.running_nodes(node):
            continue
        status, document = node.management_request(path, timeout=10)
        if status == 200 and document.get("leader"):
            return document["leader"]
    raise AssertionError(f"no running node knows the leader of {queue}")


def connection_nodes(cluster: PrivateRabbitMQCluster, job: str) -> dict[str, str]:
    """connection name -> the node it is connected to, for the job's connections."""
    for node in cluster.nodes:
        status, connections = node.management_request("/api/connections", timeout=10)
        if status == 200:
            return {
                item["client_properties"].get("connection_name", ""): item["node"]
                for item in connections
                if job in item.get("client_properties", {}).get("connection_name", "")
            }
    return {}


@pytest.mark.timeout(2400)
def test_a_job_survives_the_loss_of_the_node_leading_its_queues(cluster, processes, job):
    store = ModelStore(connect_redis(REDIS_URL), job)

    def flags(first_node: int) -> list[str]:
        return ["--job", job, "--amqp-url", cluster.amqp_urls(first=first_node), "--redis-url", REDIS_URL]

    # The coordinator declares the queues on node 0, so node 0 leads them; the workers start on
    # nodes 1, 2 and 0 and fail over to the next node of their list. No version limit: the job runs
    # until it is stopped, however fast this machine trains.
    coordinator = processes.start(
        "coordinator",
        "coordinator",
        *flags(0),
        *TRAINING,
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "2",
        "--concurrency",
        "3",
    )
    workers = [f"worker-{index}" for index in range(3)]
    for index, name in enumerate(workers):
        processes.start(name, "worker", *flags(index + 1), "--worker-id", f"w{index}", "--partition", str(index))
    wait_until(lambda: (store.versions.head() or 0) >= 8, 300, "the job made no progress on the cluster")
    nodes_in_use = set(connection_nodes(cluster, job).values())
    assert len(nodes_in_use) >= 2, f"the job's connections are all on {nodes_in_use}"

    updates_leader = queue_leader(cluster, f"fedq.{job}.updates")
    tasks_leader = queue_leader(cluster, f"fedq.{job}.tasks")
    victim = cluster.node_named(updates_leader)
    survivors = [node for node in cluster.nodes if node is not victim]
    done_before_kill = done_task_ids(processes, workers)
    head_at_kill = store.versions.head()
    cluster.kill(victim)

    # The two survivors elect new leaders and the job goes on without the dead node.
    wait_until(
        lambda: (store.versions.head() or 0) >= head_at_kill + 8, 600, "the job made no progress without the leader"
    )
    new_leader = queue_leader(cluster, f"fedq.{job}.updates")
    assert new_leader in {node.node for node in survivors}
    cluster.restart(victim)
    done_before_restart = done_task_ids(processes, workers)
    head_at_restart = store.versions.head()
    wait_until(lambda: store.versions.head() >= head_at_restart + 10, 600, "the job made no progress after the restart")

    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    assert store.status.load()["status"] == "stopped"
    logs = {name: processes.log(name) for name in ["coordinator", *workers]}
    # Everyone who was on the killed node lost the connection and carried on through another node.
    lost = [name for name, text in logs.items() if "event=connection_lost" in text]
    assert lost, "no service was connected to the killed node"
    for name in lost:
        assert logs[name].rindex("event=amqp_connected") > logs[name].index("event=connection_lost"), name
    applied = set(assert_exactly_once_and_replayable(store))
    assert done_before_kill <= applied, "an update confirmed before the kill was lost"
    assert done_before_restart <= applied, "an update confirmed while a node was down was lost"
    print(
        f"leaders: updates {updates_leader}, tasks {tasks_leader}; after the kill {new_leader}; "
        f"reconnected: {lost}; versions {store.versions.head()}, updates applied {len(applied)}"
    )
