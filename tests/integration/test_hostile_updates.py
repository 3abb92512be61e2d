"""Hostile and broken updates are dead-lettered with a reason (duplicates skipped); training goes on."""

from __future__ import annotations

import json

import numpy as np

from fedq.broker.connection import connect
from fedq.broker.publisher import publish
from fedq.broker.topology import Topology
from fedq.common.store.tiers import whole_history
from fedq.common.tasks import load_task
from fedq.common.wire import codec
from fedq.common.wire.messages import InlineDelta, ModelUpdate
from tests.support import AMQP_URL, connection_flags, take_dead_letters, take_tasks, wait_until


def update_bytes(job: str, task_id: str, delta: codec.Weights, base_version: int = 0) -> bytes:
    return ModelUpdate(
        job=job,
        task_id=task_id,
        worker_id="mallory",
        base_version=base_version,
        num_examples=10,
        delta=InlineDelta(codec.encode(delta)),
    ).to_bytes()


def drain_dead_letters(job: str) -> list[tuple[str, bytes]]:
    return [(headers.get("x-fedq-reason"), body) for headers, body in take_dead_letters(job)]


def test_hostile_updates_are_dead_lettered_and_training_continues(processes, job, store):
    coordinator = processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        "--task",
        "digits",
        "--task-params",
        json.dumps({"num_partitions": 2}),
        "--concurrency",
        "3",
        "--max-versions",
        "40",
        # A cold worker's first task can take longer than 20 versions of a warm
        # one; only the hostile updates below may be rejected, however fast each is.
        "--max-staleness",
        "100",
    )
    wait_until(lambda: store.versions.head() is not None, 60, "the coordinator did not initialise the job")
    zero = {
        name: np.zeros_like(array)
        for name, array in load_task("digits", {"num_partitions": 2}).initial_weights(0).items()
    }
    first_name = next(iter(zero))
    wrong_shape = dict(zero, **{first_name: np.zeros((3, 3), np.float32)})
    with_nan = {name: array.copy() for name, array in zero.items()}
    with_nan[first_name].flat[0] = np.nan
    # Mallory takes tasks as any worker can, and answers them with what the coordinator must refuse.
    shape_task, nan_task, base_task = take_tasks(job, 3)
    claims_fresher = update_bytes(job, base_task.task_id, zero, base_version=10**6)
    hostile = {
        "not_json": b"\x00\xffnot json at all",
        "schema_version": json.dumps({"schema": "fedq.update/9", "job": job}).encode(),
        "unknown_job": update_bytes("some-other-job", "other-task", zero),
        "unknown_task": update_bytes(job, "made-up-task", zero),
        "wrong_shape": update_bytes(job, shape_task.task_id, wrong_shape),
        "not_finite": update_bytes(job, nan_task.task_id, with_nan),
        "wrong_base_version": claims_fresher,
    }
    connection = connect(AMQP_URL)
    channel = connection.channel()
    # The head exists before the coordinator has declared its queues; declaring is idempotent.
    Topology(job).declare(channel)
    channel.confirm_delivery()
    for reason, body in hostile.items():
        publish(channel, Topology(job).updates, body, message_id=reason)

    wait_until(
        lambda: sum(store.counters.get("rejected").values()) >= len(hostile),
        60,
        "the coordinator did not reject every hostile update",
    )
    # Workers join only now, so the duplicate below targets an update that really was applied.
    processes.start("worker-0", "worker", *connection_flags(job), "--worker-id", "w0", "--partition", "0")
    processes.start("worker-1", "worker", *connection_flags(job), "--worker-id", "w1", "--partition", "1")
    wait_until(lambda: (store.versions.head() or 0) >= 1, 90, "no version was committed")
    applied = store.versions.history(1, 1)[0].updates[0]
    publish(
        channel,
        Topology(job).updates,
        update_bytes(job, applied.task_id, zero, applied.base_version),
        message_id="duplicate",
    )
    connection.close()

    assert coordinator.wait(timeout=120) == 0, processes.log("coordinator")[-3000:]
    assert store.status.load()["reason"] == "max_versions"
    assert store.counters.get("rejected") == {reason: 1 for reason in hostile}
    assert store.counters.get("skipped") == {"duplicate": 1}
    letters = drain_dead_letters(job)
    assert sorted(reason for reason, _ in letters) == sorted(hostile)
    assert dict(letters)["wrong_base_version"] == claims_fresher, "the dead letter carries the original body"
    task_ids = [update.task_id for entry in whole_history(store) for update in entry.updates]
    assert task_ids.count(applied.task_id) == 1
    assert "mallory" not in {update.worker_id for entry in whole_history(store) for update in entry.updates}
    assert "Traceback" not in processes.log("coordinator")


def test_hostile_compressed_updates_are_dead_lettered_and_training_continues(processes, job, store):
    """A job with top-k updates: payloads that lie about their encoding, their shapes or their
    indices cost one dead letter each; honest workers train on."""
    from safetensors.numpy import save as save_numpy

    from fedq.common.wire.compression import Compression

    topk = "topk:fraction=0.05"
    coordinator = processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        "--task",
        "digits",
        "--task-params",
        json.dumps({"num_partitions": 2}),
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "2",
        "--concurrency",
        "4",
        "--compression",
        topk,
        "--max-versions",
        "10",
        "--max-staleness",
        "100",
    )
    wait_until(lambda: store.versions.head() is not None, 60, "the coordinator did not initialise the job")
    zero = {
        name: np.zeros_like(array)
        for name, array in load_task("digits", {"num_partitions": 2}).initial_weights(0).items()
    }
    first = sorted(zero)[0]

    def message(task, payload: bytes, encoding: str = topk) -> bytes:
        return ModelUpdate(
            job=job,
            task_id=task.task_id,
            worker_id="mallory",
            base_version=task.model_version,
            num_examples=10,
            delta=InlineDelta(payload),
            encoding=encoding,
        ).to_bytes()

    def forged(parts: dict, shapes: dict) -> bytes:
        header = json.dumps({"encoding": topk, "shapes": shapes})
        return save_numpy(parts, metadata={"fedq": header})

    shapes = {name: list(array.shape) for name, array in zero.items()}
    honest = Compression.parse(topk).encode(zero)
    # Top-k parts that keep one value of the first tensor, at an index far past its end.
    past_the_end = {}
    for name in zero:
        kept = [10**9] if name == first else []
        past_the_end[f"{name}::indices"] = np.array(kept, np.uint32)
        past_the_end[f"{name}::values"] = np.ones(len(kept), np.float32)
    plain, claims_int8, bomb, out_of_range = take_tasks(job, 4)
    hostile = {
        # an old worker's float32 update, where the job takes top-k
        "wrong_encoding": message(plain, codec.encode(zero), encoding="none"),
        # the message says int8, the payload is top-k
        "wrong_encoding_payload": message(claims_int8, honest, encoding="int8:block=256"),
        # shapes claimed far larger than the model's: never allocated
        "bomb": message(bomb, forged(past_the_end, dict(shapes, **{first: [10**12]}))),
        "out_of_range": message(out_of_range, forged(past_the_end, shapes)),
    }
    connection = connect(AMQP_URL)
    channel = connection.channel()
    Topology(job).declare(channel)
    channel.confirm_delivery()
    for name, body in hostile.items():
        publish(channel, Topology(job).updates, body, message_id=name)
    connection.close()
    wait_until(
        lambda: sum(store.counters.get("rejected").values()) >= len(hostile),
        60,
        "the coordinator did not reject every hostile update",
    )
    for index in range(2):
        processes.start(f"worker-{index}", "worker", *connection_flags(job), "--worker-id", f"w{index}")
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator")[-3000:]
    assert store.status.load()["reason"] == "max_versions"
    assert store.counters.get("rejected") == {"wrong_encoding": 2, "bad_tensor": 2}
    letters = dict((body, reason) for reason, body in drain_dead_letters(job))
    assert [letters[body] for body in hostile.values()] == [
        "wrong_encoding",
        "wrong_encoding",
        "bad_tensor",
        "bad_tensor",
    ]
    assert "mallory" not in {update.worker_id for entry in whole_history(store) for update in entry.updates}
    assert "Traceback" not in processes.log("coordinator")
