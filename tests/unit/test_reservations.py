"""Tasks opened ahead of dispatch (coordinator/service/reservations.py), on the in-memory
transport and fakeredis: no Redis write of its own per task, a predecessor's reservations
accepted but not counted in flight, the ledger exact again at every commit."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from fedq.common.store.ledger import OpenTask
from fedq.coordinator.service import reservations
from fedq.coordinator.service.reservations import RESERVATION_SECONDS, Reservations
from tests.support import wait_until
from tests.unit.test_coordinator_loop import (  # noqa: F401 - fixtures
    DEADLINE,
    answer,
    broker,
    delta_like,
    start,
    store,
    take_task,
    wait_for_head,
)


def test_after_the_first_version_tasks_go_out_with_no_ledger_write_of_their_own(broker, store, monkeypatch):
    # Reserved ids serve for 5 s; a slow machine must not turn this into a test of its speed.
    monkeypatch.setattr(reservations, "RESERVATION_SECONDS", 3600.0)
    opened: list[list[str]] = []  # ids entering the ledger one dispatch at a time (not rewritten ones)
    open_tasks = store.ledger.open

    def counted(tasks):
        known = store.ledger.open_tasks()
        if any(task_id not in known for task_id in tasks):
            opened.append([task_id for task_id in tasks if task_id not in known])
        open_tasks(tasks)

    monkeypatch.setattr(store.ledger, "open", counted)
    _, running = start(broker, store, algorithm="fedbuff", buffer_size=2, concurrency=2)
    taken = []
    for version in range(1, 6):
        for task in [take_task(broker) for _ in range(2)]:
            # In the ledger before the broker had it: had the coordinator died now, its update would count.
            assert task.task_id in store.ledger.open_tasks()
            taken.append(task)
            answer(broker, task, delta_like(store, 0.01))
        wait_for_head(store, version)
    running.stop()
    # Before the first commit nothing is reserved: the first two tasks, then the replacement of the
    # first answer, each opened in a round trip. Every task after that was reserved by a commit.
    assert [len(ids) for ids in opened] == [2, 1]
    assert {task.task_id for task in taken[3:]}.isdisjoint(id_ for ids in opened for id_ in ids)


def test_a_predecessors_reserved_tasks_are_accepted_but_not_counted_in_flight(broker, store):
    # What a coordinator killed after handing out one task of its last commit's reservations leaves.
    latest = time.time() + 2 * RESERVATION_SECONDS
    went_out, never_did = uuid.uuid4().hex, uuid.uuid4().hex
    store.ledger.open(
        {
            went_out: OpenTask(version=0, issued_at=latest, reserved=True),
            never_did: OpenTask(version=0, issued_at=latest, reserved=True),
        }
    )
    coordinator, running = start(broker, store, algorithm="fedbuff", buffer_size=3, concurrency=2)
    own = [take_task(broker) for _ in range(2)]  # a full complement of its own: those two are not in flight
    wait_until(lambda: coordinator.in_flight == 2, DEADLINE, "the reserved tasks were counted in flight")
    answer(broker, replace(own[0], task_id=went_out), delta_like(store, 0.01))
    for task in own:
        answer(broker, task, delta_like(store, 0.01))
    wait_for_head(store, 1)
    running.stop()
    applied = {update.task_id for update in store.versions.history(1, 1)[0].updates}
    assert applied == {went_out} | {task.task_id for task in own}
    assert store.counters.get("rejected") == {}
    assert never_did in store.ledger.open_tasks()  # not its own to close: it ends with its lease


def test_reserved_tasks_that_went_out_are_rewritten_as_issued_and_the_rest_closed_at_the_next_commit(broker, store):
    coordinator, running = start(broker, store, algorithm="fedbuff", buffer_size=2, concurrency=3, max_versions=3)
    first = [take_task(broker) for _ in range(3)]
    for task in first[:2]:
        answer(broker, task, delta_like(store, 0.01))
    wait_for_head(store, 1)
    replacements = [take_task(broker) for _ in range(2)]
    from_reservation = next(task for task in replacements if task.model_version == 1)
    as_issued = OpenTask(version=1, issued_at=from_reservation.issued_at)
    # With no update to handle, the coordinator rewrites it as it went out (at the latest, the next commit does).
    wait_until(
        lambda: store.ledger.open_tasks()[from_reservation.task_id] == as_issued,
        DEADLINE,
        "a reserved task that went out was never rewritten as issued",
    )
    other = next(task for task in replacements if task is not from_reservation)
    answer(broker, first[2], delta_like(store, 0.01))
    answer(broker, other, delta_like(store, 0.01))
    wait_for_head(store, 2)
    ledger = store.ledger.open_tasks()
    assert ledger[from_reservation.task_id] == as_issued
    reserved = [task for task in ledger.values() if task.reserved]
    assert reserved and {task.version for task in reserved} == {2}  # version 1's unused ones are closed
    assert len(reserved) <= coordinator.reservations.per_version
    answer(broker, from_reservation, delta_like(store, 0.01))
    answer(broker, take_task(broker), delta_like(store, 0.01))
    wait_until(lambda: running.thread.is_alive() is False, DEADLINE, "the job did not finish at version 3")
    assert running.join()["reason"] == "max_versions"
    assert store.ledger.open_tasks() == {}  # a finished job leaves no task open, reserved or not


def test_reserved_ids_serve_only_their_version_and_only_while_young():
    reservations = Reservations(per_version=3)
    now = 1000.0
    changes = reservations.changes_for_commit(5, now, open_tasks={})
    assert {task.version for task in changes.reserved.values()} == {5}
    assert {task.issued_at for task in changes.reserved.values()} == {now + 2 * RESERVATION_SECONDS}
    assert reservations.take(5, 1, now) == []  # not before the commit moved the head
    reservations.committed(changes)
    assert reservations.take(4, 1, now) == []
    assert reservations.settle({}) == {}
    taken = reservations.take(5, 2, now + 1)
    assert len(taken) == 2 and set(taken) <= set(changes.reserved)
    assert reservations.take(5, 1, now + RESERVATION_SECONDS + 0.1) == []  # too old to hand out
    issued = {task_id: OpenTask(version=5, issued_at=now + 1) for task_id in taken}
    following = reservations.changes_for_commit(6, now + 7, open_tasks=issued)
    assert following.published == issued and len(following.closed) == 1
    assert reservations.settle(issued) == issued and reservations.settle(issued) == {}  # once
    assert set(following.closed) == set(changes.reserved) - set(taken)
    # A commit that failed: everything not handed out is the caller's to close, and nothing else.
    assert set(reservations.abandon()) == set(following.reserved) | set(following.closed)
    assert reservations.take(6, 1, now + 7) == []
