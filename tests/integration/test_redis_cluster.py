"""fedq on a Redis Cluster of its own (three masters with a replica each, on loopback, made with
``redis-cli --cluster create``): a job runs with ``--redis-url redis+cluster://...``, the master that
serves its slot is killed mid-run, its replica takes over, and the job resumes from the head with
nothing lost and nothing applied twice; its history replays bit for bit."""

from __future__ import annotations

import shutil
import signal

import pytest

from fedq.common.store import ModelStore, StoreError, connect_redis
from tests.integration.test_crash_recovery import TRAINING, assert_exactly_once_and_replayable, done_task_ids
from tests.private_servers import REDIS_SERVER, PrivateRedisCluster
from tests.support import AMQP_URL, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which(REDIS_SERVER) is None or shutil.which("redis-cli") is None,
    reason="redis-server and redis-cli are not installed (Debian packages redis-server, redis-tools)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with PrivateRedisCluster(tmp_path_factory.mktemp("redis-cluster")) as started:
        yield started


def test_a_cluster_client_serves_one_job_from_the_master_of_its_slot(cluster, job):
    store = ModelStore.open(cluster.url(), job)
    store.redis.set(store.keys.state, b"x")
    master = cluster.master_of(job)
    with master.client() as direct:
        assert direct.get(store.keys.state) == b"x"
    with pytest.raises(StoreError, match="is a Redis Cluster, which serves each job .* needs --job"):
        connect_redis(cluster.url())
    with pytest.raises(StoreError, match="has only database 0"):
        connect_redis(cluster.url() + "3", job=job)


@pytest.mark.timeout(2400)
def test_a_job_survives_the_loss_of_its_redis_master(cluster, processes, job):
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
