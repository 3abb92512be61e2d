"""fedq beyond one machine, on clusters of its own on loopback: a three-node RabbitMQ cluster
(private nodes clustered with ``rabbitmqctl join_cluster``) and a Redis Cluster (three masters with a
replica each, made with ``redis-cli --cluster create``).

* A job with ``--redis-url redis+cluster://...`` is served by the master of its slot.
* Chaos: workers connected to different RabbitMQ nodes, the node that leads one of the job's queues
  killed with the coordinator, the master serving the job's slot killed with a worker (its replica
  takes over), each brought back, round after round.
* A job with ``--redis-url redis+sentinel://...``; the master is killed and Sentinel promotes the replica.
* ``fedq admin`` writes a site's ACL user to every server that may serve its job.

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
from tests.support import AMQP_URL, wait_until

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
        [replica] = redis_cluster.replicas_of(master)
        redis_cluster.kill(master)
        assert redis_cluster.await_master(job, other_than=master) is replica
        # With --redis-wait-replicas 1 the job acknowledges nothing until the new master has a
        # replica again: the old master, back, follows it.
        redis_cluster.restart(master)

    for name in ["coordinator", *workers]:
        start(name)
    stalls = [progress(8, "the start")]
    # The workers start on nodes 1, 2 and 0 of their lists: the job's connections span nodes (the
    # management API lists a connection a moment after it opens: wait for it).
    wait_until(
        lambda: len(set(connection_nodes(rabbitmq_cluster, job).values())) >= 2,
        300,
        "the job's connections never spanned two nodes",
    )
    events = []
    for round_number in range(2):
        # A coordinator and a broker node at once, then back.
        kill("coordinator")
        node = kill_broker_node()
        start("coordinator")
        stalls.append(progress(4, f"round {round_number}: coordinator and broker node {node} killed"))
        # The survivors elected new leaders (a majority, 2 of 3, is up), and the job went on.
        for queue in ("tasks", "updates"):
            assert queue_leader(rabbitmq_cluster, f"fedq.{job}.{queue}") != node
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
    wait_until(lambda: (store.versions.head() or 0) >= 5, 300, "the job made no progress through Sentinel")

    master = redis_sentinel.master()
    done_before_kill = done_task_ids(processes, workers)
    redis_sentinel.kill(master)
    promoted = redis_sentinel.await_failover(other_than=master)
    redis_sentinel.restart(master)
    head_at_restart = store.versions.head()
    wait_until(lambda: store.versions.head() >= head_at_restart + 6, 600, "no progress after the failover")

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
