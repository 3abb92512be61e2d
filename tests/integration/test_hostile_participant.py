"""A participant with a worker's credentials tries to crash or bloat the coordinator (real RabbitMQ and Redis)."""
from __future__ import annotations

import json

from fedq.broker.connection import connect
from fedq.broker.publisher import publish
from fedq.broker.topology import Topology
from fedq.common.wire.messages import ClaimCheck, ModelUpdate
from tests.support import AMQP_URL, connection_flags, wait_until


def claim_update(job: str, task_id: str, claim: ClaimCheck) -> bytes:
    return ModelUpdate(job=job, task_id=task_id, worker_id="mallory", base_version=0, num_examples=10,
                       delta=claim).to_bytes()


def test_a_claim_key_of_the_wrong_type_or_an_oversized_claim_costs_one_dead_letter(processes, job, store):
    coordinator = processes.start("coordinator", "coordinator", *connection_flags(job), "--task", "digits",
                                  "--task-params", json.dumps({"num_partitions": 2}), "--concurrency", "2",
                                  "--max-versions", "5", "--max-staleness", "100")
    wait_until(lambda: store.versions.head() is not None, 120, "the coordinator did not initialise the job")
    # Before the fix, GET on a hash raised WRONGTYPE: the coordinator crashed, and again on every restart.
    store.redis.hset(store.blobs.key("hash-task"), "not", "a blob")
    # A 500 MB claim with a plausible digest: refused by its size, never read.
    store.redis.setrange(store.blobs.key("huge-task"), 500 * 1024 * 1024 - 1, b"\0")
    hostile = {
        "hash-task": ClaimCheck(key=store.blobs.key("hash-task"), sha256="0" * 64, nbytes=10),
        "huge-task": ClaimCheck(key=store.blobs.key("huge-task"), sha256="0" * 64, nbytes=500 * 1024 * 1024),
    }
    connection = connect(AMQP_URL)
    channel = connection.channel()
    Topology(job).declare(channel)
    channel.confirm_delivery()
    for task_id, claim in hostile.items():
        publish(channel, Topology(job).updates, claim_update(job, task_id, claim), message_id=task_id)
    connection.close()
    wait_until(lambda: store.counters.get("rejected") == {"bad_claim": 1, "too_large": 1}, 120,
               f"the hostile claims were not rejected: {store.counters.get('rejected')}")
    assert coordinator.poll() is None, processes.log("coordinator")[-3000:]
    # The job goes on: honest workers train it to its end.
    for index in range(2):
        processes.start(f"worker-{index}", "worker", *connection_flags(job), "--worker-id", f"w{index}",
                        "--partition", str(index))
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    assert store.status.load()["reason"] == "max_versions"
    assert "Traceback" not in processes.log("coordinator")


def test_finite_poison_is_refused_and_the_model_stays_sound(processes, job, store):
    import numpy as np

    from fedq.common.tasks import load_task
    from fedq.common.wire import codec
    from fedq.common.wire.messages import InlineDelta

    coordinator = processes.start("coordinator", "coordinator", *connection_flags(job), "--task", "digits",
                                  "--task-params", json.dumps({"num_partitions": 2}), "--concurrency", "2",
                                  "--max-versions", "20", "--max-staleness", "100")
    wait_until(lambda: store.versions.head() is not None, 120, "the coordinator did not initialise the job")
    shapes = load_task("digits", {"num_partitions": 2}).initial_weights(0)
    connection = connect(AMQP_URL)
    channel = connection.channel()
    Topology(job).declare(channel)
    channel.confirm_delivery()
    for index, value in enumerate([1e30] * 6 + [3e38] * 6):  # the values that broke the model before
        delta = {name: np.full_like(array, value) for name, array in shapes.items()}
        poison = ModelUpdate(job=job, task_id=f"poison-{index}", worker_id="mallory", base_version=0, num_examples=10,
                             delta=InlineDelta(codec.encode(delta))).to_bytes()
        publish(channel, Topology(job).updates, poison, message_id=f"poison-{index}")
    connection.close()
    wait_until(lambda: store.counters.get("rejected") == {"norm_outlier": 12}, 120,
               f"not every poisoned update was refused: {store.counters.get('rejected')}")
    for index in range(2):
        processes.start(f"worker-{index}", "worker", *connection_flags(job), "--worker-id", f"w{index}",
                        "--partition", str(index))
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    head = store.versions.head()
    assert all(np.isfinite(array).all() for array in store.versions.load_weights(head).values())
    assert "mallory" not in {update.worker_id for entry in store.versions.history() for update in entry.updates}
    assert np.isfinite(store.versions.load_meta(head).metrics["loss"])


def test_a_header_pika_cannot_decode_costs_one_dead_letter_not_a_stall(processes, job, store):
    import time

    from tests.support import publish_with_undecodable_header, take_dead_letters

    coordinator = processes.start("coordinator", "coordinator", *connection_flags(job), "--task", "digits",
                                  "--task-params", json.dumps({"num_partitions": 2}), "--concurrency", "2",
                                  "--max-versions", "4", "--max-staleness", "100")
    processes.wait_for_log("coordinator", "event=initialised", timeout=120)
    worker = processes.start("worker-0", "worker", *connection_flags(job), "--worker-id", "w0", "--partition", "0")
    processes.wait_for_log("worker-0", "event=worker_ready", timeout=120)
    topology = Topology(job)
    # Before, each of these made its consumer reconnect until the queue's delivery limit (4.5 min).
    sent = time.monotonic()
    publish_with_undecodable_header(job, topology.updates, b"not an update", "poisoned-update")
    publish_with_undecodable_header(job, topology.tasks, b"not a task", "poisoned-task")
    letters = wait_until(lambda: [letter for letter in take_dead_letters(job)
                                  if letter[1] in (b"not an update", b"not a task")] or None, 60,
                         "the poisoned messages were not dead-lettered")
    while len(letters) < 2:
        letters += wait_until(lambda: take_dead_letters(job), 60, "the second message was not dead-lettered")
    assert time.monotonic() - sent < 10, f"{time.monotonic() - sent:.1f} s to get two messages out of the way"
    processes.start("worker-1", "worker", *connection_flags(job), "--worker-id", "w1", "--partition", "1")
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    for name in ("coordinator", "worker-0"):
        assert "event=connection_lost" not in processes.log(name), processes.log(name)[-3000:]
    assert worker.poll() is None
