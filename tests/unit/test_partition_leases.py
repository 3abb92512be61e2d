"""Partition leases: N live workers hold N distinct partitions; the worker trains on its lease."""

from __future__ import annotations

import numpy as np
import pytest

from fedq.broker.memory import MemoryBroker, MemoryTransport, Message
from fedq.broker.topology import Topology
from fedq.common.tasks import TaskPluginError
from fedq.common.tasks.linear import FEATURES
from fedq.common.wire.messages import parse_update
from fedq.coordinator.service.partitions import plan_leases
from fedq.worker.service import Worker, WorkerSettings
from fedq.worker.training import stable_partition, training_device
from tests.support import FAST_POLLING, InBackground, memory_store, publish_job, signed_task

JOB = "leases"
DEADLINE = 60


def asking(worker_id: str, started: float = 0.0) -> dict:
    return {"worker_id": worker_id, "partition_source": "lease", "partition": None, "started": started}


def test_n_workers_get_n_distinct_partitions_lowest_first():
    plan = plan_leases({}, [asking("c", 3), asking("a", 1), asking("b", 2)], num_partitions=10)
    assert plan.leases == {"a": 0, "b": 1, "c": 2} and plan.releases == [] and plan.shared == {}


def test_a_lease_is_kept_while_its_worker_lives_and_freed_when_it_is_gone():
    plan = plan_leases({"a": 0, "b": 1, "gone": 2}, [asking("a"), asking("b"), asking("new", 5)], 10)
    assert plan.releases == ["gone"]
    assert plan.leases == {"new": 2}  # the partition the departed worker held, the lowest free one


def test_partitions_taken_by_a_flag_are_not_leased():
    flagged = {"worker_id": "f", "partition_source": "flag", "partition": 0, "started": 0}
    data = {"worker_id": "d", "partition_source": "data", "partition": None, "started": 0}
    plan = plan_leases({}, [flagged, data, asking("a", 1)], 3)
    assert plan.leases == {"a": 1}


def test_a_flag_that_comes_after_a_lease_moves_the_leased_worker_to_a_free_partition():
    # bob was leased 0 before alice, started with --partition 0, had announced herself.
    flagged = {"worker_id": "alice", "partition_source": "flag", "partition": 0, "started": 2}
    plan = plan_leases({"bob": 0}, [asking("bob", 1), flagged], 2)
    assert plan.leases == {"bob": 1} and plan.moved == {"bob": 0} and plan.shared == {}
    # With no free partition left, nobody moves: sharing is the best there is.
    plan = plan_leases({"bob": 0}, [asking("bob", 1), flagged], 1)
    assert plan.leases == {} and plan.moved == {}


def test_more_workers_than_partitions_share_the_least_held_and_say_so():
    plan = plan_leases({}, [asking(f"w{index}", index) for index in range(5)], 2)
    assert plan.leases == {"w0": 0, "w1": 1, "w2": 0, "w3": 1, "w4": 0}
    assert plan.shared == {"w2": 0, "w3": 1, "w4": 0}


def job_with_task(task: str = "linear"):
    store = memory_store(JOB)
    key = publish_job(store, task)
    broker = MemoryBroker()
    task_message = signed_task(key, store)
    broker.declare(Topology(JOB))
    broker.publish(Topology(JOB).tasks, Message(task_message.to_bytes(), task_message.task_id))
    return store, broker


def run_one_task(store, broker, **settings) -> Worker:
    worker = Worker(
        WorkerSettings(
            job=JOB,
            amqp_url="memory://",
            redis_url="memory://",
            worker_id="w0",
            max_tasks=1,
            idle_seconds=FAST_POLLING["idle_seconds"],
            **settings,
        ),
        store,
        MemoryTransport(broker),
    )
    assert InBackground(worker).join(DEADLINE) == 0
    return worker


def test_a_worker_trains_on_the_partition_the_coordinator_leased_it():
    store, broker = job_with_task()
    store.partitions.lease("w0", 3)
    worker = run_one_task(store, broker)
    assert worker.partition == 3
    (message,) = broker.ready(Topology(JOB).updates)
    expected = len(worker.job.current().plugin.local_data(3))
    assert parse_update(message.body).num_examples == expected


def test_without_a_lease_a_worker_falls_back_to_its_ids_partition_after_waiting(caplog):
    store, broker = job_with_task()
    worker = run_one_task(store, broker, lease_wait_seconds=0.3)
    assert worker.partition == stable_partition("w0") % worker.job.current().plugin.num_partitions
    assert "partition_not_leased" in caplog.text


def test_data_from_a_file_replaces_the_partition(tmp_path):
    store, broker = job_with_task()
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        features=rng.normal(size=(37, FEATURES)).astype(np.float32),
        targets=rng.normal(size=(37, 1)).astype(np.float32),
    )
    worker = run_one_task(store, broker, data=str(path))
    (message,) = broker.ready(Topology(JOB).updates)
    assert parse_update(message.body).num_examples == 37
    assert worker.partition is None and store.partitions.table() == {}


def test_data_that_does_not_fit_the_model_stops_the_worker_with_one_sentence(tmp_path):
    store, broker = job_with_task()
    path = tmp_path / "wrong.npz"
    np.savez(path, features=np.zeros((4, 3), np.float32), targets=np.zeros(4, np.float32))
    worker = Worker(
        WorkerSettings(
            job=JOB, amqp_url="memory://", redis_url="memory://", worker_id="w0", data=str(path), idle_seconds=0.05
        ),
        store,
        MemoryTransport(broker),
    )
    with pytest.raises(TaskPluginError, match=f"the data at {path} does not fit the job's model"):
        worker.run()


def test_unreadable_data_is_one_sentence(tmp_path):
    from fedq.common.tasks import load_task

    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TaskPluginError, match="an .npz file with arrays 'features' and 'targets' is expected"):
        load_task("linear").local_data_at(str(tmp_path / "bad.npz"))


def test_device_names_are_checked_at_start():
    assert training_device("cpu").type == "cpu"
    with pytest.raises(TaskPluginError, match="is not a torch device"):
        training_device("gpu-please")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(TaskPluginError, match="CUDA device"):
            training_device("cuda")


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="no CUDA device on this machine")
def test_a_worker_trains_on_a_gpu():
    store, broker = job_with_task()
    run_one_task(store, broker, device="cuda", partition=0)
    (message,) = broker.ready(Topology(JOB).updates)
    assert parse_update(message.body).num_examples > 0
