"""fedq beyond one machine, on clusters of its own on loopback: a three-node RabbitMQ cluster
(private nodes clustered with ``rabbitmqctl join_cluster``) and a Redis Cluster (three masters with a
replica each, made with ``redis-cli --cluster create``).

* Workers connected to different RabbitMQ nodes; the node that leads the job's queues is killed
  mid-run and restarted.
* A job with ``--redis-url redis+cluster://...``; the master serving its slot is killed mid-run and its
  replica takes over.
* A job with ``--redis-url redis+sentinel://...``; the master is killed and Sentinel promotes the replica.
* Chaos: broker nodes and Redis masters killed while coordinators and workers are killed too.

Each run ends with nothing lost (every update a worker saw confirmed is applied), nothing applied
twice, and a history that replays bit for bit. The clusters are shared by the module's tests
(starting them takes half a minute); every test kills only what it restarts.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import time
import urllib.parse

import pytest

from fedq.common.store import ModelStore, StoreError, connect_every_master, connect_redis
from fedq.coordinator.ops.jobs import find_jobs
from tests.integration.test_crash_recovery import TRAINING, assert_exactly_once_and_replayable, done_task_ids
from tests.private_servers import (
    RABBITMQ_BIN,
    REDIS_SERVER,
    PrivateRabbitMQCluster,
    PrivateRedisCluster,
    PrivateRedisSentinel,
)
from tests.support import AMQP_URL, REDIS_URL, wait_until

pytestmark = pytest.mark.skipif(
    not (RABBITMQ_BIN / "rabbitmq-server").exists()
    or shutil.which("epmd") is None
    or shutil.which(REDIS_SERVER) is None
    or shutil.which("redis-cli") is None,
    reason="RabbitMQ or Redis is not installed (Debian packages rabbitmq-server, redis-server, redis-tools; "
    ".ci/run installs them)",
)


@pytest.fixture(scope="module")
def rabbitmq_cluster(tmp_path_factory):
    with PrivateRabbitMQCluster(tmp_path_factory.mktemp("rabbitmq-cluster"), size=3) as started:
        yield started


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    with PrivateRedisCluster(tmp_path_factory.mktemp("redis-cluster")) as started:
        yield started


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory):
    with PrivateRedisSentinel(tmp_path_factory.mktemp("redis-sentinel")) as started:
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
def test_a_job_survives_the_loss_of_the_node_leading_its_queues(rabbitmq_cluster, processes, job):
    cluster = rabbitmq_cluster
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


def test_a_cluster_client_serves_one_job_from_the_master_of_its_slot(redis_cluster, job):
    cluster = redis_cluster
    store = ModelStore.open(cluster.url(), job)
    store.redis.set(store.keys.state, b"x")
    master = cluster.master_of(job)
    with master.client() as direct:
        assert direct.get(store.keys.state) == b"x"
    # `fedq jobs` asks every master: each holds the jobs of its slots.
    store.redis.set(store.keys.head, b"0")
    masters = connect_every_master(cluster.url())
    assert len(masters) == 3 and job in {name for client in masters for name in find_jobs(client)}
    with pytest.raises(StoreError, match="is a Redis Cluster, which serves each job .* needs --job"):
        connect_redis(cluster.url())
    with pytest.raises(StoreError, match="has only database 0"):
        connect_redis(cluster.url() + "3", job=job)


@pytest.mark.timeout(2400)
def test_a_job_survives_the_loss_of_its_redis_master(redis_cluster, processes, job):
    cluster = redis_cluster
    redis_url = cluster.url()
    store = ModelStore.open(redis_url, job)
    flags = ["--job", job, "--amqp-url", AMQP_URL, "--redis-url", redis_url, "--redis-wait-replicas", "1"]
    # No version limit: the job runs until it is stopped, however fast this machine trains.
    coordinator = processes.start(
        "coordinator", "coordinator", *flags, *TRAINING, "--algorithm", "fedbuff", "--buffer-size", "2"
    )
    workers = [f"worker-{index}" for index in range(3)]
    for index, name in enumerate(workers):
        processes.start(name, "worker", *flags, "--worker-id", f"w{index}", "--partition", str(index))
    wait_until(lambda: (store.versions.head() or 0) >= 8, 300, "the job made no progress on the cluster")

    master = cluster.master_of(job)
    [replica] = cluster.replicas_of(master)
    done_before_kill = done_task_ids(processes, workers)
    cluster.kill(master)
    assert cluster.await_master(job, other_than=master) is replica
    # The new master has no replica until the old one returns: with --redis-wait-replicas 1 the job
    # acknowledges nothing meanwhile. Back, the old master follows the new one, and the job goes on.
    cluster.restart(master)
    head_at_restart = store.versions.head()
    wait_until(lambda: store.versions.head() >= head_at_restart + 10, 600, "no progress after the failover")
    done_before_restart = done_task_ids(processes, workers)
    wait_until(lambda: store.versions.head() >= head_at_restart + 20, 600, "no progress after the failover")

    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    assert store.status.load()["status"] == "stopped"
    logs = "".join(processes.log(name) for name in ["coordinator", *workers])
    assert "connection_lost" in logs, "no service noticed that its Redis master died"
    applied = set(assert_exactly_once_and_replayable(store))
    assert done_before_kill <= applied, "an update confirmed before the failover was lost"
    assert done_before_restart <= applied, "an update confirmed after the failover was lost"
    print(f"failover {master.port} -> {replica.port}; versions {store.versions.head()}, updates {len(applied)}")


@pytest.mark.timeout(3600)
def test_chaos_broker_nodes_redis_masters_coordinators_and_workers_killed(
    rabbitmq_cluster, redis_cluster, processes, job
):
    rng = random.Random(16)
    redis_url = redis_cluster.url()
    store = ModelStore.open(redis_url, job)
    workers = [f"w{index}" for index in range(3)]

    def flags(first_node: int) -> list[str]:
        return [
            "--job",
            job,
            "--amqp-url",
            rabbitmq_cluster.amqp_urls(first=first_node),
            "--redis-url",
            redis_url,
            "--redis-wait-replicas",
            "1",
        ]

    generation = {"coordinator": 0, **{worker: 0 for worker in workers}}
    running = {}

    def start(name: str) -> None:
        generation[name] += 1
        label = f"{name}-{generation[name]}"
        if name == "coordinator":
            args = ["coordinator", *flags(0), *TRAINING, "--algorithm", "fedbuff", "--buffer-size", "2"]
        else:
            index = workers.index(name)
            args = ["worker", *flags(index + 1), "--worker-id", name, "--partition", str(index)]
        running[name] = processes.start(label, *args)

    def kill(name: str) -> None:
        running[name].send_signal(signal.SIGKILL)
        running[name].wait(timeout=30)

    def progress(versions: int, what: str) -> float:
        """Seconds until the head moved ``versions`` further."""
        began, target = time.monotonic(), (store.versions.head() or 0) + versions
        wait_until(lambda: (store.versions.head() or 0) >= target, 900, f"no progress after {what}")
        return time.monotonic() - began

    def kill_broker_node() -> str:
        victim = rabbitmq_cluster.node_named(
            queue_leader(rabbitmq_cluster, f"fedq.{job}.{rng.choice(['tasks', 'updates'])}")
        )
        rabbitmq_cluster.kill(victim)
        return victim.node

    def fail_over_redis() -> None:
        master = redis_cluster.master_of(job)
        redis_cluster.kill(master)
        redis_cluster.await_master(job, other_than=master)
        redis_cluster.restart(master)

    for name in ["coordinator", *workers]:
        start(name)
    stalls = [progress(8, "the start")]
    events = []
    for round_number in range(2):
        # A coordinator and a broker node at once, then back.
        kill("coordinator")
        node = kill_broker_node()
        start("coordinator")
        stalls.append(progress(4, f"round {round_number}: coordinator and broker node {node} killed"))
        rabbitmq_cluster.restart(rabbitmq_cluster.node_named(node))
        events.append(f"coordinator+broker:{node.split('@')[0]}")
        # A worker and the job's Redis master at once.
        victim = rng.choice(workers)
        kill(victim)
        fail_over_redis()
        start(victim)
        stalls.append(progress(4, f"round {round_number}: worker {victim} and the Redis master killed"))
        events.append(f"worker:{victim}+redis-master")
    # Every update a worker saw confirmed until now must be accounted for at the end.
    confirmed = done_task_ids(processes, [f"{name}-{g}" for name in workers for g in range(1, generation[name] + 1)])
    stalls.append(progress(6, "the last round"))

    running["coordinator"].send_signal(signal.SIGTERM)
    assert running["coordinator"].wait(timeout=300) == 0
    applied = assert_exactly_once_and_replayable(store)
    # An update is accounted for when it was applied, or refused by a policy with its reason named
    # (a norm outlier, too stale: dead-lettered, counted, never silently dropped).
    coordinators = [f"coordinator-{number}" for number in range(1, generation["coordinator"] + 1)]
    refused = refused_task_ids(processes, coordinators)
    lost = confirmed - set(applied) - set(refused)
    assert not lost, f"{len(lost)} confirmed update(s) were lost"
    duplicates = store.counters.get("skipped").get("duplicate", 0)
    reasons = ", ".join(f"{reason} {list(refused.values()).count(reason)}" for reason in sorted(set(refused.values())))
    print(
        f"chaos: {len(events)} kill events ({', '.join(events)}); versions {store.versions.head()}; "
        f"confirmed and checked {len(confirmed)}: applied {len(confirmed & set(applied))}, refused "
        f"{len(confirmed & set(refused))} ({reasons or 'none'}), lost {len(lost)}; applied twice 0 of "
        f"{len(applied)}; duplicates caught by the ledger {duplicates}; replay bit for bit; "
        f"longest wait for the next versions {max(stalls):.1f} s"
    )


def refused_task_ids(processes, names) -> dict[str, str]:
    """task id -> the reason a coordinator refused its update, from their logs."""
    refused = {}
    for name in names:
        for reason, task in re.findall(r"event=update_rejected reason=(\w+) .*task=(\w+)", processes.log(name)):
            refused[task] = reason
    return refused


@pytest.mark.timeout(2400)
def test_a_job_survives_a_sentinel_failover(redis_sentinel, processes, job):
    redis_url = redis_sentinel.url()
    store = ModelStore.open(redis_url, job)
    flags = ["--job", job, "--amqp-url", AMQP_URL, "--redis-url", redis_url, "--redis-wait-replicas", "1"]
    coordinator = processes.start("coordinator", "coordinator", *flags, *TRAINING, "--concurrency", "2")
    workers = [f"worker-{index}" for index in range(2)]
    for index, name in enumerate(workers):
        processes.start(name, "worker", *flags, "--worker-id", f"w{index}", "--partition", str(index))
    wait_until(lambda: (store.versions.head() or 0) >= 8, 300, "the job made no progress through Sentinel")

    master = redis_sentinel.master()
    done_before_kill = done_task_ids(processes, workers)
    redis_sentinel.kill(master)
    promoted = redis_sentinel.await_failover(other_than=master)
    redis_sentinel.restart(master)
    head_at_restart = store.versions.head()
    wait_until(lambda: store.versions.head() >= head_at_restart + 10, 600, "no progress after the failover")

    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    applied = set(assert_exactly_once_and_replayable(store))
    refused = refused_task_ids(processes, ["coordinator"])
    assert done_before_kill <= applied | set(refused), "an update confirmed before the failover was lost"
    print(f"sentinel failover {master.port} -> {promoted.port}; versions {store.versions.head()}")


def test_an_enrolled_worker_is_known_to_every_server_that_may_serve_its_job(redis_cluster, redis_sentinel, job):
    # ACL users are each Redis server's own: one that only the master knew would be gone after a
    # failover, and the job's workers locked out.
    from fedq.coordinator.ops.admin import Provisioner
    from fedq.coordinator.ops.roles import grant

    for servers, nodes in [(redis_cluster.url(), redis_cluster.nodes), (redis_sentinel.url(), redis_sentinel.servers)]:
        provisioner = Provisioner(AMQP_URL, servers, job)
        user = provisioner.create(grant("worker", job, "site-1"), "s3cret-password")
        for node in nodes:
            with node.client() as client:
                assert client.execute_command("ACL", "GETUSER", user), f"{node.port} does not know {user}"
        assert provisioner.revoke("site-1")["redis_user"]
        for node in nodes:
            with node.client() as client:
                assert client.execute_command("ACL", "GETUSER", user) is None, f"{node.port} still knows {user}"
