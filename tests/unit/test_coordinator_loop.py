"""The coordinator's loop on the in-memory transport and fakeredis: routing, the barrier, rollbacks, stops."""

from __future__ import annotations

import numpy as np
import pytest

from fedq.broker.memory import MemoryBroker, MemoryTransport, Message
from fedq.broker.topology import Topology
from fedq.broker.transport import DETAIL_HEADER, ORIGIN_HEADER, REASON_HEADER
from fedq.common.store.tiers import whole_history
from fedq.common.wire import codec
from fedq.common.wire.messages import ClaimCheck, ModelUpdate, parse_task
from fedq.coordinator.ops.replay import replay, rollback
from fedq.coordinator.service.loop import Coordinator
from fedq.coordinator.service.settings import CoordinatorSettings
from tests.support import FAST_POLLING, InBackground, memory_store, update_body, wait_until

JOB = "unit"
TOPOLOGY = Topology(JOB)
DEADLINE = 60  # seconds: generous, the conditions are checked as often as they change


@pytest.fixture
def broker():
    return MemoryBroker()


@pytest.fixture
def store():
    return memory_store(JOB)


def start(broker, store, **settings) -> tuple[Coordinator, InBackground]:
    values = dict(job=JOB, amqp_url="memory://", redis_url="memory://", task="linear", eval_every=0, **FAST_POLLING)
    coordinator = Coordinator(CoordinatorSettings(**(values | settings)), store, MemoryTransport(broker))
    return coordinator, InBackground(coordinator)


def take_task(broker):
    message = broker.get(TOPOLOGY.tasks, timeout=DEADLINE)
    assert message is not None, "no task was dispatched"
    return parse_task(message.body)


def answer(broker, task, delta, **fields) -> None:
    broker.publish(TOPOLOGY.updates, Message(update_body(task, delta, **fields), task.task_id))


def delta_like(store, value: float) -> dict:
    return {name: np.full(array.shape, value, array.dtype) for name, array in store.versions.load_weights(0).items()}


def wait_for_head(store, version: int) -> None:
    wait_until(lambda: store.versions.head() == version, DEADLINE, f"head never reached {version}")


def test_a_duplicate_update_is_acked_and_skipped_not_applied_twice(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=1)
    task = take_task(broker)
    answer(broker, task, delta_like(store, 0.1))
    answer(broker, task, delta_like(store, 0.1))  # a redelivery, e.g. after a worker crash
    wait_until(lambda: store.counters.get("skipped") == {"duplicate": 1}, DEADLINE, "the duplicate was not skipped")
    running.stop()
    applied = [update.task_id for entry in whole_history(store) for update in entry.updates]
    assert applied == [task.task_id]
    assert broker.ready(TOPOLOGY.updates) == [] and broker.unacked(TOPOLOGY.updates) == 0
    assert broker.ready(TOPOLOGY.dead) == []


def test_hostile_updates_are_dead_lettered_with_their_reason_and_training_goes_on(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=1)
    task = take_task(broker)
    good = delta_like(store, 0.1)
    broker.publish(TOPOLOGY.updates, Message(b"\x80 not json", "garbage"))
    answer(broker, task, {name: array[..., :1] for name, array in good.items()})  # wrong shape
    # A rejected update closes its task, and a replacement goes out: answering it again is unknown_task.
    answer(broker, task, good)
    task = take_task(broker)
    answer(broker, task, {name: np.full_like(array, np.nan) for name, array in good.items()})  # NaN
    open_task = take_task(broker)
    answer(broker, open_task, good, job="another-job")  # not this job's: its task stays open
    wait_until(lambda: len(broker.ready(TOPOLOGY.dead)) == 5, DEADLINE, "not every hostile update was dead-lettered")
    dead = broker.ready(TOPOLOGY.dead)
    assert [message.headers[REASON_HEADER] for message in dead] == [
        "not_json",
        "wrong_shape",
        "unknown_task",
        "not_finite",
        "unknown_job",
    ]
    assert all(message.headers[DETAIL_HEADER] for message in dead)
    assert {message.headers[ORIGIN_HEADER] for message in dead} == {"updates"}  # where `fedq dead --requeue` sends it
    # A good answer to the open task is applied.
    replacement = open_task
    answer(broker, replacement, good)
    wait_for_head(store, 1)
    running.stop()
    assert store.counters.get("rejected") == {
        "not_json": 1,
        "wrong_shape": 1,
        "unknown_task": 1,
        "not_finite": 1,
        "unknown_job": 1,
    }
    assert store.versions.head() == 1


def test_the_synchronous_barrier_waits_for_every_task_of_the_round(broker, store):
    _, running = start(broker, store, algorithm="fedavg", concurrency=3)
    tasks = [take_task(broker) for _ in range(3)]
    assert {task.model_version for task in tasks} == {0}
    for index, task in enumerate(tasks[:2]):
        answer(broker, task, delta_like(store, 0.3), worker_id=f"w{index}")
    wait_until(lambda: broker.unacked(TOPOLOGY.updates) == 2, DEADLINE, "the first two updates were not buffered")
    # Two of three back: no server step and no new task until the round is complete.
    assert store.versions.head() == 0 and broker.ready(TOPOLOGY.tasks) == []
    answer(broker, tasks[2], delta_like(store, 0.3), worker_id="w2")
    wait_for_head(store, 1)
    next_round = [take_task(broker) for _ in range(3)]
    running.stop()
    entry = store.versions.history(1, 1)[0]
    assert sorted(update.task_id for update in entry.updates) == sorted(task.task_id for task in tasks)
    assert [update.staleness for update in entry.updates] == [0, 0, 0]
    assert {task.model_version for task in next_round} == {1}


def test_a_rollback_while_updates_are_buffered_is_never_overwritten(broker, store):
    _, running = start(broker, store, algorithm="fedbuff", buffer_size=2, concurrency=2, staleness="constant")
    for task in (take_task(broker), take_task(broker)):
        answer(broker, task, delta_like(store, 1.0))
    wait_for_head(store, 1)
    from_v0, from_v1 = take_task(broker), take_task(broker)  # the replacements, dispatched before and after v1
    assert (from_v0.model_version, from_v1.model_version) == (0, 1)
    answer(broker, from_v0, delta_like(store, 1.0))
    wait_until(lambda: broker.unacked(TOPOLOGY.updates) == 1, DEADLINE, "the update was not buffered")
    rolled_back = rollback(store, 0)  # an operator, meanwhile: version 2 = version 0, version 1 abandoned
    answer(broker, from_v1, delta_like(store, 1.0))
    # The commit meets the moved head: nothing is written, the buffer returns to the queue and is
    # judged again; the update computed from the abandoned version 1 is refused.
    wait_until(
        lambda: [message.headers[REASON_HEADER] for message in broker.ready(TOPOLOGY.dead)] == ["rolled_back"],
        DEADLINE,
        "the update based on the abandoned version was not refused",
    )
    assert store.versions.head() == rolled_back == 2
    newer = [take_task(broker) for _ in range(2)]
    fresh = next(task for task in newer if task.model_version == rolled_back)
    answer(broker, fresh, delta_like(store, 1.0))
    wait_for_head(store, rolled_back + 1)
    running.stop()
    assert store.versions.load_meta(rolled_back).rollback_of == 0
    entry = store.versions.history(rolled_back + 1, rolled_back + 1)[0]
    assert entry.parent == rolled_back
    assert [update.task_id for update in entry.updates] == [from_v0.task_id, fresh.task_id]
    assert [update.staleness for update in entry.updates] == [2, 0]


def test_stop_returns_buffered_updates_to_the_queue_and_a_restart_applies_them(broker, store):
    coordinator, running = start(broker, store, algorithm="fedbuff", buffer_size=3, concurrency=3)
    tasks = [take_task(broker) for _ in range(3)]
    for task in tasks[:2]:
        answer(broker, task, delta_like(store, 0.1))
    wait_until(lambda: broker.unacked(TOPOLOGY.updates) == 2, DEADLINE, "the updates were not buffered")
    summary = running.stop()  # what SIGTERM does
    assert summary["reason"] is None and store.status.load()["status"] == "stopped"
    assert len(broker.ready(TOPOLOGY.updates)) == 2 and store.versions.head() == 0
    _, restarted = start(broker, store, algorithm="fedbuff", buffer_size=3, concurrency=3)
    answer(broker, tasks[2], delta_like(store, 0.1))
    wait_for_head(store, 1)
    restarted.stop()
    entry = store.versions.history(1, 1)[0]
    assert sorted(update.task_id for update in entry.updates) == sorted(task.task_id for task in tasks)


def answer_by_claim(broker, store, task, delta, worker_id: str = "w") -> None:
    """What a worker does with a delta over the inline limit: SET it under its claim-check key, then
    publish the claim."""
    payload = codec.encode(delta)
    key = store.blobs.put(task.task_id, worker_id, payload, ttl_seconds=600)
    update = ModelUpdate(
        job=task.job,
        task_id=task.task_id,
        worker_id=worker_id,
        base_version=task.model_version,
        num_examples=10,
        delta=ClaimCheck(key=key, sha256=codec.digest(payload), nbytes=len(payload)),
    )
    broker.publish(TOPOLOGY.updates, Message(update.to_bytes(), task.task_id))


def test_a_worker_rewriting_its_blob_after_its_update_was_read_changes_no_history(broker, store):
    """A worker's Redis user may write its claim-check key at any time. The coordinator moves the
    blob it verifies out of the worker's reach, so what replay and the archive read is what was
    applied, also when the update is read again after a restart (the first bytes read are kept)."""
    _, running = start(broker, store, algorithm="fedbuff", buffer_size=2, concurrency=2, archive="none")
    first, second = take_task(broker), take_task(broker)
    answer_by_claim(broker, store, first, delta_like(store, 0.1))
    wait_until(lambda: broker.unacked(TOPOLOGY.updates) == 1, DEADLINE, "the first update was not buffered")
    running.stop()  # the buffered update goes back to the queue, its blob already moved
    store.blobs.put(first.task_id, "w", codec.encode(delta_like(store, 5.0)), ttl_seconds=600)  # then rewritten
    _, running = start(broker, store, algorithm="fedbuff", buffer_size=2, concurrency=2, archive="none")
    answer_by_claim(broker, store, second, delta_like(store, 0.2))
    wait_for_head(store, 1)
    for task in (first, second):  # too late: both were read, verified and applied
        store.blobs.put(task.task_id, "w", codec.encode(delta_like(store, 5.0)), ttl_seconds=600)
    running.stop()
    updates = store.versions.history(1, 1)[0].updates
    assert sorted(update.task_id for update in updates) == sorted([first.task_id, second.task_id])
    assert {update.blob_key for update in updates} == {
        store.blobs.verified_key(task.task_id, "w") for task in (first, second)
    }
    assert [store.redis.ttl(update.blob_key) for update in updates] == [-1, -1], "applied deltas are kept"
    assert replay(store, 0, 1).ok


def test_deltas_read_ahead_are_verified_as_any_other_and_applied_in_order(broker, store):
    """Updates waiting on the channel have their claim-checked deltas read in a thread while the
    loop handles the one before; a bad one among them is refused with its reason all the same."""
    coordinator, running = start(broker, store, algorithm="fedbuff", buffer_size=3, concurrency=4, archive="none")
    tasks = [take_task(broker) for _ in range(4)]
    running.stop()  # the tasks stay open; their updates wait on the queue for the restart
    for index, task in enumerate(tasks):
        answer_by_claim(broker, store, task, delta_like(store, 0.1 * (index + 1)))
    store.blobs.put(tasks[1].task_id, "w", b"not what the claim says", ttl_seconds=600)
    restarted, running = start(broker, store, algorithm="fedbuff", buffer_size=3, concurrency=4, archive="none")
    wait_for_head(store, 1)
    running.stop()
    assert restarted.read_ahead.started >= 2, "the waiting updates' deltas were not read ahead"
    assert [m.headers[REASON_HEADER] for m in broker.ready(TOPOLOGY.dead)] == ["bad_digest"]
    applied = [update.task_id for update in store.versions.history(1, 1)[0].updates]
    assert applied == [tasks[0].task_id, tasks[2].task_id, tasks[3].task_id], "in delivery order"
    assert replay(store, 0, 1).ok


def test_a_dropped_connection_redelivers_the_buffer_and_nothing_is_applied_twice(broker, store):
    coordinator, running = start(broker, store, algorithm="fedbuff", buffer_size=2, concurrency=2)
    first, second = take_task(broker), take_task(broker)
    answer(broker, first, delta_like(store, 0.2))
    wait_until(lambda: broker.unacked(TOPOLOGY.updates) == 1, DEADLINE, "the first update was not buffered")
    sessions = coordinator.transport.sessions
    broker.drop_connections()
    wait_until(lambda: coordinator.transport.sessions > sessions, DEADLINE, "the coordinator did not reconnect")
    answer(broker, second, delta_like(store, 0.2))
    wait_for_head(store, 1)
    running.stop()
    applied = [update.task_id for entry in whole_history(store) for update in entry.updates]
    assert sorted(applied) == sorted([first.task_id, second.task_id])


def test_a_restart_at_max_versions_finishes_without_one_version_more(broker, store):
    """As after a kill between the last commit and finishing: a task is still open and its update waits."""
    _, running = start(broker, store, algorithm="fedasync", concurrency=2)
    first, second = take_task(broker), take_task(broker)
    answer(broker, first, delta_like(store, 0.1))
    wait_for_head(store, 1)
    running.stop()
    answer(broker, second, delta_like(store, 0.1))
    restarted, running = start(broker, store, algorithm="fedasync", concurrency=2, max_versions=1)
    assert running.join(DEADLINE)["reason"] == "max_versions"
    assert store.versions.head() == 1 and restarted.open_tasks == {}


def test_the_target_stops_the_run_and_withdraws_outstanding_tasks(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=2, max_versions=1)
    task = take_task(broker)
    answer(broker, task, delta_like(store, 0.0))
    summary = running.join(DEADLINE)
    assert summary["reason"] == "max_versions" and store.status.load()["status"] == "finished"
    assert broker.ready(TOPOLOGY.tasks) == [] and store.ledger.open_tasks() == {}


def test_a_target_the_run_cannot_reach_ends_it_on_a_plateau_with_a_warning(broker, store, caplog):
    # R^2 never exceeds 1: the target is out of reach, and no update moves the model.
    _, running = start(broker, store, algorithm="fedasync", concurrency=1, eval_every=1, target=2.0, plateau=3)
    while running.thread.is_alive():
        task = broker.get(TOPOLOGY.tasks, timeout=0.2)
        if task is not None:
            answer(broker, parse_task(task.body), delta_like(store, 0.0))
    summary = running.join(DEADLINE)
    assert summary["reason"] == "plateau" and store.status.load()["reason"] == "plateau"
    assert store.versions.head() == 4  # the first score, then three that did not improve on it
    assert "event=target_unreachable target=2 " in caplog.text


def test_the_plateau_counts_only_improvements_by_epsilon():
    from fedq.coordinator.service.loop import Plateau

    plateau = Plateau(patience=2, epsilon=0.01)
    assert [plateau.stalled(score) for score in (0.5, 0.505, 0.52, 0.525, 0.529)] == [False, False, False, False, True]
    assert plateau.best == 0.52 and plateau.evaluations == 5
    assert not any(Plateau(patience=0, epsilon=0.01).stalled(0.5) for _ in range(100))


def test_without_a_target_no_plateau_ends_the_run_unless_asked():
    settings = lambda **values: CoordinatorSettings(job=JOB, amqp_url="", redis_url="", **values)  # noqa: E731
    assert settings().plateau_evaluations == 0
    assert settings(target=0.9).plateau_evaluations == 100
    assert settings(target=0.9, plateau=0).plateau_evaluations == 0
    assert settings(plateau=7).plateau_evaluations == 7


def test_an_unknown_algorithm_is_an_error_not_fedavg():
    with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'; choose from fedasync, fedbuff, fedavg"):
        CoordinatorSettings(job=JOB, amqp_url="", redis_url="", algorithm="fedsgd")


def test_a_poisoned_update_with_finite_values_is_refused_as_a_norm_outlier(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=1)
    task = take_task(broker)
    answer(broker, task, delta_like(store, 1e30))  # finite, so no NaN check catches it
    wait_until(
        lambda: [m.headers[REASON_HEADER] for m in broker.ready(TOPOLOGY.dead)] == ["norm_outlier"],
        DEADLINE,
        "the poisoned update was not refused",
    )
    answer(broker, take_task(broker), delta_like(store, 0.1))  # an honest one still lands
    wait_for_head(store, 1)
    running.stop()
    assert all(
        np.isfinite(array).all() and np.abs(array).max() < 10 for array in store.versions.load_weights(1).values()
    )


def test_a_step_that_is_not_finite_is_refused_and_the_head_stays(broker, store):
    # With the norm guard off, each update is finite but the step (server_lr 10 x 3e38) overflows.
    _, running = start(
        broker,
        store,
        algorithm="fedbuff",
        buffer_size=1,
        concurrency=1,
        server_lr=10.0,
        staleness="constant",
        norm_outlier_factor=0.0,
    )
    answer(broker, take_task(broker), delta_like(store, 3e38))
    wait_until(
        lambda: [m.headers[REASON_HEADER] for m in broker.ready(TOPOLOGY.dead)] == ["non_finite_step"],
        DEADLINE,
        "the non-finite step was not refused",
    )
    assert store.versions.head() == 0
    answer(broker, take_task(broker), delta_like(store, 0.01))
    wait_for_head(store, 1)
    running.stop()
    assert all(np.isfinite(array).all() for array in store.versions.load_weights(1).values())


def test_a_finite_step_far_beyond_the_model_is_refused_as_implausible_and_the_head_stays(broker, store):
    # Each update is within its bound, but a server learning rate of 10,000 makes the step a jump.
    _, running = start(
        broker, store, algorithm="fedbuff", buffer_size=1, concurrency=1, server_lr=10_000.0, staleness="constant"
    )
    answer(broker, take_task(broker), delta_like(store, 0.01))
    wait_until(
        lambda: [m.headers[REASON_HEADER] for m in broker.ready(TOPOLOGY.dead)] == ["implausible_step"],
        DEADLINE,
        "the implausible step was not refused",
    )
    running.stop()
    assert store.versions.head() == 0


def test_a_restarted_coordinator_bounds_updates_by_the_norms_accepted_before(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=1)
    answer(broker, take_task(broker), delta_like(store, 0.01))
    wait_for_head(store, 1)
    running.stop()
    [applied] = store.versions.history(1, 1)[0].updates
    assert applied.norm == pytest.approx(
        0.01 * np.sqrt(sum(a.size for a in store.versions.load_weights(0).values())), rel=1e-5
    )
    restarted, running = start(broker, store, algorithm="fedasync", concurrency=1)
    running.stop()
    assert list(restarted.norm_guard.norms) == [applied.norm]


def test_an_error_nobody_foresaw_ends_that_update_only(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=1)
    task = take_task(broker)
    real_take = store.blobs.take
    store.blobs.take = lambda *args: (_ for _ in ()).throw(RuntimeError("a Redis reply nobody expected"))
    claim = ClaimCheck(key=store.blobs.key(task.task_id, "w"), sha256="0" * 64, nbytes=100)
    broker.publish(
        TOPOLOGY.updates,
        Message(
            ModelUpdate(
                job=JOB, task_id=task.task_id, worker_id="w", base_version=0, num_examples=1, delta=claim
            ).to_bytes(),
            task.task_id,
        ),
    )
    wait_until(
        lambda: [m.headers[REASON_HEADER] for m in broker.ready(TOPOLOGY.dead)] == ["unusable"],
        DEADLINE,
        "the update was not dead-lettered",
    )
    store.blobs.take = real_take
    answer(broker, take_task(broker), delta_like(store, 0.1))  # the loop goes on
    wait_for_head(store, 1)
    running.stop()


def test_an_update_message_larger_than_any_delta_of_the_model_is_refused_unread(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=1)
    task = take_task(broker)
    broker.publish(TOPOLOGY.updates, Message(b"{" + b" " * (2 * 1024 * 1024) + b"}", task.task_id))
    wait_until(
        lambda: [m.headers[REASON_HEADER] for m in broker.ready(TOPOLOGY.dead)] == ["too_large"],
        DEADLINE,
        "the oversized message was not refused",
    )
    running.stop()


def test_a_refused_task_is_replaced_at_once_and_a_tampered_version_is_restored(broker, store):
    from fedq.common.wire import codec
    from fedq.common.wire.messages import TaskRefusal

    _, running = start(broker, store, algorithm="fedasync", concurrency=1, task_lease_seconds=3600)
    task = take_task(broker)
    genuine = store.redis.get(store.keys.model(0))
    store.redis.set(store.keys.model(0), codec.encode(delta_like(store, 5.0)))  # tampered with in Redis
    refusal = TaskRefusal(job=JOB, task_id=task.task_id, worker_id="w", reason="tampered_version")
    broker.publish(TOPOLOGY.updates, Message(refusal.to_bytes(), "refusal"))
    replacement = take_task(broker)  # long before the hour-long lease
    assert replacement.task_id != task.task_id
    assert store.redis.get(store.keys.model(0)) == genuine
    # A refusal for a task that is not open closes nothing: it is dead-lettered.
    broker.publish(TOPOLOGY.updates, Message(refusal.to_bytes(), "again"))
    wait_until(
        lambda: [m.headers[REASON_HEADER] for m in broker.ready(TOPOLOGY.dead)] == ["unknown_task"],
        DEADLINE,
        "the stale refusal was not refused",
    )
    answer(broker, replacement, delta_like(store, 0.1))
    wait_for_head(store, 1)
    running.stop()
    assert store.counters.get("refused") == {"tampered_version": 1}


def test_a_rewritten_job_description_is_put_back(broker, store):
    _, running = start(broker, store, algorithm="fedasync", concurrency=1)
    take_task(broker)
    genuine = store.status.load_description_text()
    store.redis.set(store.keys.spec, b'{"task": "subprocess:run", "task_params": {"args": "id"}}')
    wait_until(lambda: store.status.load_description_text() == genuine, DEADLINE, "the description was not restored")
    running.stop()


def test_a_running_coordinator_archives_old_versions_and_keeps_redis_to_its_window(broker, store, tmp_path):
    """The archiver thread moves history while the loop commits; a late redelivery of an update
    whose version left Redis is refused (its task is closed), never applied twice."""
    archive = str(tmp_path / "archive")
    _, running = start(
        broker,
        store,
        algorithm="fedasync",
        concurrency=1,
        max_staleness=1,
        archive=archive,
        archive_seconds=0.05,
        checkpoint_every=4,
    )
    first = None
    for version in range(1, 13):
        task = take_task(broker)
        first = first or task
        answer(broker, task, delta_like(store, 0.01))
        wait_for_head(store, version)
    hot_window = 1 + 2
    wait_until(
        lambda: int(store.redis.get(store.keys.pruned_through) or -1) == 12 - hot_window,
        DEADLINE,
        "the archiver did not trim Redis to the hot window",
    )
    answer(broker, first, delta_like(store, 0.01))  # applied at version 1, long archived
    wait_until(
        lambda: store.counters.get("rejected").get("unknown_task") == 1, DEADLINE, "the late redelivery was not refused"
    )
    running.stop()
    assert store.redis.xlen(store.keys.history) == hot_window
    records = whole_history(store)
    assert [record.version for record in records] == list(range(13))
    applied = [update.task_id for record in records for update in record.updates]
    assert len(applied) == len(set(applied)) == 12
    assert replay(store, 0, 12).ok


def test_no_task_is_issued_while_the_archiver_holds_dispatch_and_training_resumes_after(
    broker, store, tmp_path, monkeypatch
):
    """Near its Redis budget, with history still to move, the job waits for the archiver rather
    than fill Redis; once it caught up, tasks flow again."""
    import threading

    from fedq.coordinator.service.archiver import ArchiveThread

    over_budget = threading.Event()
    over_budget.set()
    monkeypatch.setattr(ArchiveThread, "holding_dispatch", lambda self: over_budget.is_set())
    coordinator, running = start(
        broker, store, algorithm="fedasync", concurrency=2, archive=str(tmp_path / "archive"), archive_seconds=0.05
    )
    wait_until(lambda: coordinator._dispatch_held, DEADLINE, "the coordinator never saw the hold")
    assert broker.get(TOPOLOGY.tasks, timeout=1.0) is None, "a task was issued while dispatch was held"
    over_budget.clear()
    task = take_task(broker)
    answer(broker, task, delta_like(store, 0.01))
    wait_for_head(store, 1)
    running.stop()


def test_a_task_the_broker_refuses_is_closed_and_replaced(broker, store, caplog):
    # Tasks go out without waiting for each confirm; a refusal arrives later and must not leave
    # an open task nobody received, counted as in flight until its lease ends.
    _, running = start(broker, store, algorithm="fedasync", concurrency=2)
    first, second = take_task(broker), take_task(broker)
    with broker._condition:
        route = broker._routes.pop(TOPOLOGY.tasks)  # the tasks exchange now routes nowhere
    answer(broker, first, delta_like(store, 0.1))  # its replacement is refused
    wait_for_head(store, 1)
    wait_until(lambda: "tasks_refused_by_broker" in caplog.text, DEADLINE, "no refusal was noticed")
    with broker._condition:
        broker._routes[TOPOLOGY.tasks] = route
    replacement = take_task(broker)
    running.stop()
    assert set(store.ledger.open_tasks()) == {second.task_id, replacement.task_id}
