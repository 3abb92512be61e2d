"""Authenticated worker ids on the in-memory transport: once a job has enrolled identities, an update
counts only from the RabbitMQ user enrolled for the worker id it names, and never after a revocation.

The broker's half (RabbitMQ refuses a publish whose ``user_id`` is not the connection's user) is
played by the memory channel here and by a real RabbitMQ in tests/integration/test_identities.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedq.broker.memory import MemoryBroker, MemoryTransport, Message, UserIdRefused
from fedq.broker.topology import Topology
from fedq.broker.transport import REASON_HEADER
from fedq.common.store.identities import identity_user
from fedq.common.store.tiers import whole_history
from fedq.common.wire.messages import ClaimCheck, ModelUpdate, parse_task
from fedq.coordinator.service.loop import Coordinator
from fedq.coordinator.service.settings import CoordinatorSettings
from tests.support import FAST_POLLING, InBackground, memory_store, update_body, wait_until

JOB = "ident"
TOPOLOGY = Topology(JOB)
DEADLINE = 60


@pytest.fixture
def broker():
    return MemoryBroker()


@pytest.fixture
def store():
    return memory_store(JOB)


def start(broker, store, **settings) -> InBackground:
    values = dict(
        job=JOB,
        amqp_url="memory://",
        redis_url="memory://",
        task="linear",
        eval_every=0,
        algorithm="fedasync",
        concurrency=1,
        **FAST_POLLING,
    )
    return InBackground(Coordinator(CoordinatorSettings(**(values | settings)), store, MemoryTransport(broker)))


def take_task(broker):
    message = broker.get(TOPOLOGY.tasks, timeout=DEADLINE)
    assert message is not None, "no task was dispatched"
    return parse_task(message.body)


def small_delta(store) -> dict:
    return {name: np.full(array.shape, 0.01, array.dtype) for name, array in store.versions.load_weights(0).items()}


def send(broker, body: bytes, message_id: str, user_id: str | None) -> None:
    """As published by ``user_id`` (the broker has checked it: see the memory channel)."""
    broker.publish(TOPOLOGY.updates, Message(body, message_id, user_id=user_id))


def dead_reasons(broker) -> list[str]:
    return [message.headers[REASON_HEADER] for message in broker.ready(TOPOLOGY.dead)]


def applied_workers(store) -> list[str]:
    return [update.worker_id for entry in whole_history(store) for update in entry.updates]


def test_a_job_without_identities_accepts_any_sender_as_before(broker, store):
    running = start(broker, store)
    task = take_task(broker)
    send(broker, update_body(task, small_delta(store), worker_id="w"), task.task_id, None)
    wait_until(lambda: store.versions.head() == 1, DEADLINE, "the update was not applied")
    running.stop()
    assert applied_workers(store) == ["w"]


def test_an_enrolled_worker_is_applied_only_from_its_own_user_and_never_after_revocation(broker, store):
    store.identities.enroll("alice", identity_user(JOB, "alice"))
    store.identities.enroll("bob", identity_user(JOB, "bob"))
    running = start(broker, store)
    task = take_task(broker)
    body = update_body(task, small_delta(store), worker_id="alice")
    send(broker, body, "no-user", None)  # no user_id: not authenticated
    send(broker, body, "bob-as-alice", identity_user(JOB, "bob"))  # bob claims to be alice
    send(broker, update_body(task, small_delta(store), worker_id="carol"), "carol", identity_user(JOB, "carol"))
    wait_until(lambda: len(dead_reasons(broker)) == 3, DEADLINE, "the three were not dead-lettered")
    assert dead_reasons(broker) == ["impersonation", "impersonation", "unknown_worker"]
    assert store.versions.head() == 0, "nothing was applied"
    send(broker, body, "alice", identity_user(JOB, "alice"))
    wait_until(lambda: store.versions.head() == 1, DEADLINE, "alice's own update was not applied")
    assert applied_workers(store) == ["alice"]

    store.identities.revoke("alice")
    task = take_task(broker)
    send(broker, update_body(task, small_delta(store), worker_id="alice"), "revoked", identity_user(JOB, "alice"))
    wait_until(lambda: "revoked_worker" in dead_reasons(broker), DEADLINE, "the revoked worker was not refused")
    send(broker, update_body(task, small_delta(store), worker_id="bob"), "bob", identity_user(JOB, "bob"))
    wait_until(lambda: store.versions.head() == 2, DEADLINE, "bob's update after the revocation was not applied")
    running.stop()
    assert applied_workers(store) == ["alice", "bob"]
    assert store.identities.get("alice").revoked and not store.identities.get("bob").revoked


def test_require_identity_holds_before_any_worker_is_enrolled(broker, store):
    running = start(broker, store, require_identity=True)
    task = take_task(broker)
    send(broker, update_body(task, small_delta(store), worker_id="w"), task.task_id, "guest")
    wait_until(lambda: dead_reasons(broker) == ["unknown_worker"], DEADLINE, "the update was not refused")
    running.stop()
    assert store.versions.head() == 0


def test_a_worker_may_claim_only_its_own_blob(broker, store):
    store.identities.enroll("alice", identity_user(JOB, "alice"))
    running = start(broker, store)
    task = take_task(broker)
    from fedq.common.wire import codec

    payload = codec.encode(small_delta(store))
    bobs_key = store.blobs.put(task.task_id, "bob", payload, 60)  # as if bob had answered the task
    claim = ClaimCheck(key=bobs_key, sha256=codec.digest(payload), nbytes=len(payload))
    body = ModelUpdate(
        job=JOB, task_id=task.task_id, worker_id="alice", base_version=0, num_examples=1, delta=claim
    ).to_bytes()
    send(broker, body, "alice", identity_user(JOB, "alice"))
    wait_until(lambda: dead_reasons(broker) == ["bad_claim"], DEADLINE, "the claim of bob's blob was not refused")
    running.stop()
    assert store.versions.head() == 0


def test_the_channel_refuses_a_user_id_that_is_not_its_own():
    channel = MemoryBroker().open_channel(user="fedq.ident.alice")
    with pytest.raises(UserIdRefused):
        channel.publish(TOPOLOGY.updates, b"{}", message_id="m", user_id="fedq.ident.bob")


def test_replicas_of_an_enrolled_site_count_as_the_site(broker, store):
    store.identities.enroll("site-a", identity_user(JOB, "site-a"))
    running = start(broker, store)
    task = take_task(broker)
    send(
        broker,
        update_body(task, small_delta(store), worker_id="site-a2.pod-1"),
        "other-site",
        identity_user(JOB, "site-a"),
    )
    wait_until(lambda: dead_reasons(broker) == ["unknown_worker"], DEADLINE, "another site's name was accepted")
    send(
        broker,
        update_body(task, small_delta(store), worker_id="site-a.pod-7f9c"),
        "replica",
        identity_user(JOB, "site-a"),
    )
    wait_until(lambda: store.versions.head() == 1, DEADLINE, "the replica's update was not applied")
    running.stop()
    assert applied_workers(store) == ["site-a.pod-7f9c"]


def test_a_worker_revoked_while_its_update_waits_in_the_buffer_gets_nothing_into_a_version(broker, store):
    # Updates are judged on the coordinator's copy of the identities (no Redis round trip per
    # message); the commit script reads them again, so a revocation after validation still holds.
    store.identities.enroll("alice", identity_user(JOB, "alice"))
    store.identities.enroll("bob", identity_user(JOB, "bob"))
    running = start(broker, store, algorithm="fedbuff", buffer_size=2, concurrency=2)
    first, second = take_task(broker), take_task(broker)
    send(broker, update_body(first, small_delta(store), worker_id="alice"), "alice", identity_user(JOB, "alice"))
    wait_until(lambda: len(running.service.buffer) == 1, DEADLINE, "alice's update was not buffered")
    store.identities.revoke("alice")
    send(broker, update_body(second, small_delta(store), worker_id="bob"), "bob-2", identity_user(JOB, "bob"))
    wait_until(lambda: dead_reasons(broker) == ["revoked_worker"], DEADLINE, "alice's update was not refused")
    assert store.versions.head() == 0, "a version was committed with the revoked worker's update"
    # Her task stays open, as for any refused sender: another worker's answer to it completes the version.
    send(broker, update_body(first, small_delta(store), worker_id="bob"), "bob-1", identity_user(JOB, "bob"))
    wait_until(lambda: store.versions.head() == 1, DEADLINE, "bob's two updates did not make a version")
    running.stop()
    assert applied_workers(store) == ["bob", "bob"]


def test_the_commit_script_refuses_senders_the_identities_no_longer_accept_and_writes_nothing(store):
    from fedq.common.records import AppliedUpdate
    from fedq.common.store.versions import IdentityRefusedError

    weights = {"w": np.zeros(3, np.float32)}
    store.versions.commit(None, weights)
    store.identities.enroll("alice", identity_user(JOB, "alice"))
    store.identities.enroll("bob", identity_user(JOB, "bob"))
    store.identities.revoke("bob")
    applied = [
        AppliedUpdate(
            f"t{index}", worker, 0, 0, 0.5, 1, digest="0" * 64, blob_key=f"fedq:{{{JOB}}}:delta:{worker}:t{index}"
        )
        for index, worker in enumerate(["alice", "bob", "alice", "carol"])
    ]
    senders = [
        ("alice", identity_user(JOB, "alice")),
        ("bob", identity_user(JOB, "bob")),
        ("alice", identity_user(JOB, "bob")),
        ("carol", identity_user(JOB, "carol")),
    ]
    keys_before = set(store.redis.keys())
    with pytest.raises(IdentityRefusedError) as refused:
        store.versions.commit(0, weights, applied, senders=senders, update_blobs={"inline-blob": b"x"})
    assert refused.value.refused == {1: "revoked_worker", 2: "impersonation", 3: "unknown_worker"}
    assert store.versions.head() == 0
    assert set(store.redis.keys()) == keys_before, "the refused attempt left keys behind"
    assert store.versions.commit(0, weights, applied[:1], senders=senders[:1]) == 1


def test_an_enrolled_worker_s_updates_are_judged_without_a_redis_lookup_each(broker, store, monkeypatch):
    # The per-update lookup was 15 % of the coordinator's loop (bench/README.md): the copy of the
    # identities answers for a sender it accepts (read again only when it is 5 s old).
    store.identities.enroll("alice", identity_user(JOB, "alice"))
    lookups, snapshots = [], []
    registry = store.identities
    monkeypatch.setattr(
        registry, "lookup", lambda worker_id, real=registry.lookup: lookups.append(1) or real(worker_id)
    )
    monkeypatch.setattr(registry, "snapshot", lambda real=registry.snapshot: snapshots.append(1) or real())
    running = start(broker, store)
    # The copy is read at the first update; kept for the whole test, however slow the machine.
    running.service.identities.max_age = 3600.0
    for version in range(1, 4):
        task = take_task(broker)
        send(
            broker, update_body(task, small_delta(store), worker_id="alice"), f"a{version}", identity_user(JOB, "alice")
        )
        wait_until(lambda version=version: store.versions.head() == version, DEADLINE, "alice's update was not applied")
    running.stop()
    assert lookups == [], "an accepted sender was looked up in Redis"
    assert len(snapshots) == 1
