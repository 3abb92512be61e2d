"""The worker's loop on the in-memory transport and fakeredis: ack after publish, drain, training errors."""

from __future__ import annotations

import signal

import pytest

from fedq.broker.memory import MemoryBroker, MemoryTransport, Message
from fedq.broker.topology import Topology
from fedq.broker.transport import DETAIL_HEADER, ORIGIN_HEADER, REASON_HEADER
from fedq.common.wire.limits import TRAINING_ATTEMPTS
from fedq.common.wire.messages import RoundTask, TaskRefusal, parse_update, parse_worker_message
from fedq.worker.service import Worker, WorkerSettings
from tests.support import (
    FAST_POLLING,
    BlockedTraining,
    InBackground,
    memory_store,
    publish_job,
    signed_task,
    wait_until,
)

JOB = "unit"
TOPOLOGY = Topology(JOB)
DEADLINE = 60


@pytest.fixture
def broker():
    return MemoryBroker()


def job_store(task: str = "linear"):
    """A store holding what a coordinator leaves for workers: the signed description and version 0."""
    store = memory_store(JOB)
    store.signing_key = publish_job(store, task)  # the tests' stand-in for the coordinator's key
    # A plugin that is not built in must be the worker's own configuration, as in production.
    store.worker_task = task if ":" in task else None
    return store


def start(broker, store, **settings) -> tuple[Worker, InBackground]:
    settings = {"task": store.worker_task, "idle_seconds": FAST_POLLING["idle_seconds"], "partition": 0} | settings
    worker = Worker(
        WorkerSettings(job=JOB, amqp_url="memory://", redis_url="memory://", worker_id="w0", **settings),
        store,
        MemoryTransport(broker),
    )
    return worker, InBackground(worker)


def send_task(broker, store=None, version: int = 0) -> RoundTask:
    """Publish a task the job's coordinator issued (signed with the job's key)."""
    task = signed_task(store.signing_key, store, version)
    broker.declare(TOPOLOGY)
    broker.publish(TOPOLOGY.tasks, Message(task.to_bytes(), task.task_id))
    return task


def test_a_task_is_acked_only_after_its_update_is_published(broker):
    store = job_store()
    task = send_task(broker, store)
    worker, running = start(broker, store, max_tasks=1)
    assert running.join(DEADLINE) == 0
    (message,) = broker.ready(TOPOLOGY.updates)
    update = parse_update(message.body)
    assert (update.task_id, update.worker_id, update.base_version) == (task.task_id, "w0", 0)
    assert broker.ready(TOPOLOGY.tasks) == [] and broker.unacked(TOPOLOGY.tasks) == 0
    assert worker.tasks_done == 1


def test_a_training_error_is_retried_then_dead_lettered_and_the_worker_keeps_serving(broker):
    store = job_store("tests.support:exploding_task")
    task = send_task(broker, store)
    worker, running = start(broker, store)
    wait_until(lambda: broker.ready(TOPOLOGY.dead), DEADLINE, "the failing task was not dead-lettered")
    (dead,) = broker.ready(TOPOLOGY.dead)
    assert dead.message_id == task.task_id
    assert dead.headers[REASON_HEADER] == "training_failed" and dead.headers[ORIGIN_HEADER] == "tasks"
    assert "RuntimeError: the plugin's training step blew up" in dead.headers[DETAIL_HEADER]
    assert worker.tasks_failed == TRAINING_ATTEMPTS
    # Still serving: the next task is taken (and fails the same way) instead of the process exiting.
    send_task(broker, store)
    wait_until(lambda: worker.tasks_failed > TRAINING_ATTEMPTS, DEADLINE, "the worker stopped taking tasks")
    assert running.thread.is_alive()
    assert running.stop() == 0
    # No update: a refusal per failed task, so that the coordinator replaces it at once.
    assert {refusal_reason(message) for message in broker.ready(TOPOLOGY.updates)} == {"training_failed"}


def refusal_reason(message) -> str:
    refusal = parse_worker_message(message.body)
    assert isinstance(refusal, TaskRefusal), "the worker sent an update where it should have refused"
    return refusal.reason


def test_a_task_for_a_version_that_is_gone_is_refused(broker):
    store = job_store()
    send_task(broker, store, version=7)
    worker, running = start(broker, store)
    wait_until(lambda: broker.ready(TOPOLOGY.dead), DEADLINE, "the task was not refused")
    assert broker.ready(TOPOLOGY.dead)[0].headers[REASON_HEADER] == "unknown_version"
    assert running.stop() == 0


@pytest.mark.parametrize("signals, outcome", [(1, "finished"), (2, "requeued")])
def test_sigterm_mid_task_drains_or_requeues_and_loses_nothing(broker, signals, outcome):
    BlockedTraining.reset()
    store = job_store("tests.support:blocked_task")
    task = send_task(broker, store)
    worker, running = start(broker, store)
    assert BlockedTraining.started.wait(DEADLINE), "the task never started"
    for _ in range(signals):
        worker._on_signal(signal.SIGTERM, None)  # what the installed handler runs
    if outcome == "finished":
        BlockedTraining.release.set()  # the first signal lets the current task finish
    assert running.join(DEADLINE) == 0
    BlockedTraining.release.set()
    if outcome == "finished":
        assert [parse_update(message.body).task_id for message in broker.ready(TOPOLOGY.updates)] == [task.task_id]
        assert broker.ready(TOPOLOGY.tasks) == []
    else:
        assert broker.ready(TOPOLOGY.updates) == []
        assert [message.message_id for message in broker.ready(TOPOLOGY.tasks)] == [task.task_id]
    assert broker.unacked(TOPOLOGY.tasks) == 0
    assert store.workers.live() == [], "a stopped worker leaves the registry"


def test_a_task_whose_version_was_tampered_with_is_refused_and_the_worker_goes_on(broker):
    store = job_store()
    weights = {name: array + 1.0 for name, array in store.versions.load_weights(0).items()}
    from fedq.common.wire import codec

    store.redis.set(store.keys.model(0), codec.encode(weights))  # someone overwrote version 0 in Redis
    store.versions._weights_cache.clear()
    send_task(broker, store)
    worker, running = start(broker, store)
    wait_until(lambda: broker.ready(TOPOLOGY.dead), DEADLINE, "the task was not refused")
    assert broker.ready(TOPOLOGY.dead)[0].headers[REASON_HEADER] == "tampered_version"
    assert [refusal_reason(message) for message in broker.ready(TOPOLOGY.updates)] == ["tampered_version"]
    assert running.thread.is_alive()
    assert running.stop() == 0


def test_an_oversized_task_message_is_refused_unread(broker):
    store = job_store()
    broker.declare(TOPOLOGY)
    broker.publish(TOPOLOGY.tasks, Message(b"[" * (1024 * 1024), "huge"))
    worker, running = start(broker, store)
    wait_until(lambda: broker.ready(TOPOLOGY.dead), DEADLINE, "the task was not refused")
    assert broker.ready(TOPOLOGY.dead)[0].headers[REASON_HEADER] == "too_large"
    assert running.stop() == 0


def test_a_connection_lost_mid_training_never_runs_two_trainings_of_one_model(broker):
    BlockedTraining.reset()
    store = job_store("tests.support:blocked_task")
    task = send_task(broker, store)
    worker, running = start(broker, store, max_tasks=1)
    assert BlockedTraining.started.wait(DEADLINE), "the task never started"
    sessions = worker.transport.sessions
    broker.drop_connections()  # the task returns to the queue while its training still runs
    wait_until(
        lambda: worker.transport.sessions > sessions and broker.unacked(TOPOLOGY.tasks) == 1,
        DEADLINE,
        "the redelivered task was not taken again",
    )
    BlockedTraining.release.set()
    assert running.join(DEADLINE) == 0
    assert BlockedTraining.most_at_once == 1, "two trainings ran on one model at once"
    # The abandoned training's result is discarded: one update, from the redelivery.
    assert [parse_update(message.body).task_id for message in broker.ready(TOPOLOGY.updates)] == [task.task_id]
