"""Fair synchronous rounds: each worker trains at most once per round, and a deadline with
k-of-n closes a round that a dropped worker would otherwise stall."""

from __future__ import annotations

from fedq.broker.memory import MemoryBroker, MemoryTransport, Message
from fedq.broker.transport import REASON_HEADER
from fedq.common.wire.messages import TaskRefusal, parse_worker_message
from fedq.worker.service import ROUND_HAND_BACKS, Worker, WorkerSettings
from tests.support import FAST_POLLING, InBackground, memory_store, publish_job, signed_task, wait_until
from tests.unit.test_coordinator_loop import DEADLINE, TOPOLOGY, answer, delta_like, start, take_task, wait_for_head


def test_a_second_update_of_one_worker_in_a_round_is_refused():
    broker, store = MemoryBroker(), memory_store("unit")
    _, running = start(broker, store, algorithm="fedavg", concurrency=3)
    first, second, third = (take_task(broker) for _ in range(3))
    assert first.synchronous
    answer(broker, first, delta_like(store, 0.1), worker_id="twice")
    answer(broker, second, delta_like(store, 0.1), worker_id="twice")
    wait_until(lambda: broker.ready(TOPOLOGY.dead), DEADLINE, "the repeated update was not refused")
    assert broker.ready(TOPOLOGY.dead)[0].headers[REASON_HEADER] == "repeated_in_round"
    answer(broker, third, delta_like(store, 0.1), worker_id="other")
    wait_for_head(store, 1)  # the round closes with one update of each worker
    running.stop()
    assert sorted(update.worker_id for update in store.versions.history(1, 1)[0].updates) == ["other", "twice"]


def test_a_round_closes_at_its_deadline_with_k_of_n_updates_and_withdraws_the_rest():
    broker, store = MemoryBroker(), memory_store("unit")
    _, running = start(broker, store, algorithm="fedavg", concurrency=3, round_seconds=0.5, min_updates=2)
    tasks = [take_task(broker) for _ in range(3)]
    answer(broker, tasks[0], delta_like(store, 0.1), worker_id="a")
    answer(broker, tasks[1], delta_like(store, 0.1), worker_id="b")
    wait_for_head(store, 1)  # the third worker dropped out: the round closed without it
    next_round = [take_task(broker) for _ in range(3)]
    assert {task.model_version for task in next_round} == {1}
    answer(broker, tasks[2], delta_like(store, 0.1), worker_id="c")  # too late: its task was withdrawn
    wait_until(lambda: broker.ready(TOPOLOGY.dead), DEADLINE, "the late update was not refused")
    assert broker.ready(TOPOLOGY.dead)[0].headers[REASON_HEADER] == "unknown_task"
    running.stop()
    assert len(store.versions.history(1, 1)[0].updates) == 2


def test_a_round_short_of_k_updates_waits_past_its_deadline(caplog):
    broker, store = MemoryBroker(), memory_store("unit")
    _, running = start(broker, store, algorithm="fedavg", concurrency=3, round_seconds=0.2, min_updates=2)
    tasks = [take_task(broker) for _ in range(3)]
    answer(broker, tasks[0], delta_like(store, 0.1), worker_id="a")
    wait_until(lambda: "round_short" in caplog.text, DEADLINE, "no warning that the round is short")
    assert store.versions.head() == 0
    answer(broker, tasks[1], delta_like(store, 0.1), worker_id="b")
    wait_for_head(store, 1)
    running.stop()


def test_a_worker_hands_back_a_second_task_of_its_round_then_refuses_it():
    broker, store = MemoryBroker(), memory_store("unit")
    key = publish_job(store, "linear")
    first, second = (signed_task(key, store, 0, synchronous=True) for _ in range(2))
    broker.declare(TOPOLOGY)
    for task in (first, second):
        broker.publish(TOPOLOGY.tasks, Message(task.to_bytes(), task.task_id))
    worker = Worker(
        WorkerSettings(
            job="unit",
            amqp_url="memory://",
            redis_url="memory://",
            worker_id="solo",
            partition=0,
            idle_seconds=FAST_POLLING["idle_seconds"],
        ),
        store,
        MemoryTransport(broker),
    )
    running = InBackground(worker)
    wait_until(lambda: len(broker.ready(TOPOLOGY.updates)) == 2, DEADLINE, "no update and refusal")
    running.stop()
    update, refusal = (parse_worker_message(message.body) for message in broker.ready(TOPOLOGY.updates))
    assert update.task_id == first.task_id and worker.tasks_done == 1
    assert isinstance(refusal, TaskRefusal) and refusal.task_id == second.task_id
    assert refusal.reason == "trained_in_round"
    assert broker.ready(TOPOLOGY.dead) == []  # nothing wrong with the task: not a dead letter
    assert ROUND_HAND_BACKS > 1  # it was given back to the queue before, for another worker
