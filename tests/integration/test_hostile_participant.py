"""A participant with only what a worker is given (the AMQP and Redis URLs) attacks a running job, on the
real RabbitMQ and Redis: every attack of issue #9 fails, and the job still reaches its target accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np

from fedq.broker.topology import Topology
from fedq.common.store.tiers import whole_history
from fedq.common.tasks import load_task
from fedq.common.wire import codec
from fedq.common.wire.messages import ClaimCheck, InlineDelta, ModelUpdate, RoundTask, TrainSettings
from fedq.common.wire.signing import SigningKey
from tests.support import (
    ROOT,
    connection_flags,
    publish_updates,
    publish_with_undecodable_header,
    take_dead_letters,
    take_tasks,
    wait_until,
)

PARAMS = {"num_partitions": 2}
# Settings under which two digits workers reach 0.85 test accuracy within a few dozen versions.
TRAINING = [
    "--task",
    "digits",
    "--task-params",
    json.dumps(PARAMS),
    "--local-epochs",
    "2",
    "--learning-rate",
    "0.1",
    "--batch-size",
    "16",
    "--max-staleness",
    "100",
]
TARGET = 0.85


def start_coordinator(processes, job, *extra: str, name: str = "coordinator"):
    return processes.start(name, "coordinator", *connection_flags(job), *TRAINING, *extra)


def start_workers(processes, job, count: int = 2, *extra: str) -> None:
    for index in range(count):
        processes.start(
            f"worker-{index}",
            "worker",
            *connection_flags(job),
            "--worker-id",
            f"w{index}",
            "--partition",
            str(index),
            *extra,
        )


def model_like(value: float) -> codec.Weights:
    return {name: np.full_like(array, value) for name, array in load_task("digits", PARAMS).initial_weights(0).items()}


def update(job: str, task: RoundTask | str, delta, *, base_version: int | None = None) -> bytes:
    task_id = task if isinstance(task, str) else task.task_id
    base = base_version if base_version is not None else (0 if isinstance(task, str) else task.model_version)
    if isinstance(delta, dict):
        delta = InlineDelta(codec.encode(delta))
    return ModelUpdate(
        job=job, task_id=task_id, worker_id="mallory", base_version=base, num_examples=10, delta=delta
    ).to_bytes()


def assert_reached_target_unharmed(
    processes, coordinator, store, timeout: float = 300, name: str = "coordinator"
) -> None:
    assert coordinator.wait(timeout=timeout) == 0, processes.log(name)[-3000:]
    assert store.status.load()["reason"] == "target_reached", store.status.load()
    head = store.versions.head()
    assert store.versions.load_meta(head).metrics["accuracy"] >= TARGET
    assert all(np.isfinite(array).all() for array in store.versions.load_weights(head).values())
    assert "mallory" not in {update.worker_id for entry in whole_history(store) for update in entry.updates}
    assert "Traceback" not in processes.log(name)


def test_forged_fabricated_replayed_and_poisoned_updates_are_refused_and_the_job_reaches_its_target(
    processes, job, store
):
    # No target yet: on a fast machine the job could reach it before the replays below are read. A second
    # coordinator, resuming the job, takes it to its target.
    algorithm = ["--algorithm", "fedbuff", "--buffer-size", "2", "--concurrency", "6"]
    first = start_coordinator(processes, job, *algorithm, "--max-seconds", "600")
    processes.wait_for_log("coordinator", "event=initialised", timeout=180)
    # Mallory takes six tasks, as any worker may, and answers each with something hostile.
    poison, huge_poison, hash_claim, huge_claim, fresher, _ = take_tasks(job, 6)
    store.redis.hset(store.blobs.key(hash_claim.task_id, "mallory"), "not", "a blob")  # GET would raise WRONGTYPE
    store.redis.setrange(store.blobs.key(huge_claim.task_id, "mallory"), 500 * 1024 * 1024 - 1, b"\0")  # a 500 MB blob
    publish_updates(
        job,
        {
            "poison": update(job, poison, model_like(1e30)),  # finite, and far beyond any honest norm
            "huge-poison": update(job, huge_poison, model_like(3e38)),
            "hash-claim": update(
                job, hash_claim, ClaimCheck(store.blobs.key(hash_claim.task_id, "mallory"), "0" * 64, 10)
            ),
            "huge-claim": update(
                job, huge_claim, ClaimCheck(store.blobs.key(huge_claim.task_id, "mallory"), "0" * 64, 500 * 1024 * 1024)
            ),
            "fresher": update(job, fresher, model_like(0.0), base_version=fresher.model_version + 5),
            **{f"made-up-{index}": update(job, f"made-up-{index}", model_like(0.01)) for index in range(20)},
        },
    )
    wait_until(
        lambda: (
            store.counters.get("rejected")
            == {"norm_outlier": 2, "bad_claim": 1, "too_large": 1, "wrong_base_version": 1, "unknown_task": 20}
        ),
        120,
        "not every hostile update was refused",
    )
    start_workers(processes, job)
    wait_until(lambda: (store.versions.head() or 0) >= 2, 180, "the honest workers made no progress")
    # An applied update's blob, re-published under a task id the coordinator never issued, and the
    # same update sent again under its own (closed) task id.
    applied = store.versions.history(1, 1)[0].updates[0]
    blob = store.blobs.get(applied.blob_key)
    publish_updates(
        job,
        {
            "replayed": update(job, "replayed-task", InlineDelta(blob)),
            "again": update(job, applied.task_id, InlineDelta(blob), base_version=applied.base_version),
        },
    )
    wait_until(
        lambda: (
            store.counters.get("rejected").get("unknown_task") == 21
            and store.counters.get("skipped") == {"duplicate": 1}
        ),
        120,
        "the replays were not refused",
    )
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, processes.log("coordinator")[-3000:]
    assert "Traceback" not in processes.log("coordinator")
    second = start_coordinator(
        processes, job, *algorithm, "--target", str(TARGET), "--max-seconds", "240", name="coordinator-2"
    )
    assert_reached_target_unharmed(processes, second, store, name="coordinator-2")
    applied_ids = [update.task_id for entry in whole_history(store) for update in entry.updates]
    assert applied_ids.count(applied.task_id) == 1 and "replayed-task" not in applied_ids


def test_a_plugin_named_in_redis_is_never_run_and_forged_tasks_are_never_trained(processes, job, store, tmp_path):
    coordinator = start_coordinator(
        processes, job, "--concurrency", "2", "--target", str(TARGET), "--max-seconds", "240"
    )
    processes.wait_for_log("coordinator", "event=initialised", timeout=180)
    start_workers(processes, job)
    for index in range(2):
        processes.wait_for_log(f"worker-{index}", "event=worker_ready", timeout=180)
    pwned = tmp_path / "pwned.txt"
    # Before, the next worker to take a task imported subprocess and ran this shell command.
    store.redis.set(
        store.keys.spec,
        json.dumps({"task": "subprocess:run", "seed": 0, "task_params": {"args": f"id > {pwned}", "shell": True}}),
    )
    # Tasks the coordinator did not issue: one asking for a learning rate of 1000, signed with another
    # key, and one with a garbled signature.
    forged = RoundTask(
        job=job,
        task_id="forged-lr-1000",
        model_version=0,
        issued_at=time.time(),
        train=TrainSettings(learning_rate=1000.0),
        model_digest=store.versions.digest_of(0),
    )
    forged = dataclasses.replace(forged, signature=SigningKey.generate().sign(forged.signed_document()))
    garbled = dataclasses.replace(forged, task_id="garbled", signature="Z2FyYmxlZA==")
    publish_to_tasks(job, {task.task_id: task.to_bytes() for task in (forged, garbled)})
    processes.wait_for_log("coordinator", "event=description_restored", timeout=60)
    assert_reached_target_unharmed(processes, coordinator, store)
    assert not pwned.exists(), "a worker ran a command named in Redis"
    letters = {headers.get("x-fedq-reason"): body for headers, body in take_dead_letters(job)}
    assert "bad_signature" in letters
    applied = {update.task_id for entry in whole_history(store) for update in entry.updates}
    assert not {"forged-lr-1000", "garbled"} & applied
    for index in range(2):
        assert "Traceback" not in processes.log(f"worker-{index}")


def publish_to_tasks(job: str, bodies: dict[str, bytes]) -> None:
    from fedq.broker.connection import connect
    from fedq.broker.publisher import publish
    from tests.support import AMQP_URL

    connection = connect(AMQP_URL)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for message_id, body in bodies.items():
            publish(channel, Topology(job).tasks, body, message_id=message_id)
    finally:
        connection.close()


def fedq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def fedq_side_by_side(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Commands that only read the job, run at once (each spends seconds starting up); their results in order."""
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "fedq.common.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for process in running:
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def test_tampered_weights_and_head_are_found_named_and_repaired(processes, job, store, tmp_path):
    flags = connection_flags(job)
    first = start_coordinator(processes, job, "--concurrency", "2", "--max-versions", "4")
    start_workers(processes, job)
    assert first.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    # Someone overwrites version 2's weights in Redis with a model of their own.
    genuine = store.redis.get(store.keys.model(2))
    store.redis.set(store.keys.model(2), codec.encode(model_like(0.5)))
    replayed, exported = fedq_side_by_side(
        ["replay", *flags], ["export", *flags, "2", "-o", str(tmp_path / "model.safetensors")]
    )
    assert replayed.returncode == 1 and "version 2" in replayed.stdout and "tampered with" in replayed.stdout, (
        replayed.stdout + replayed.stderr
    )
    assert exported.returncode == 1 and "do not match" in exported.stderr and exported.stderr.count("\n") == 1
    assert not (tmp_path / "model.safetensors").exists()
    store.redis.set(store.keys.model(2), genuine)
    # ... and then moves the head to a version that does not exist.
    store.redis.set(store.keys.head, 1000)
    status = fedq("status", *flags)
    assert status.returncode == 0 and f"fedq rollback --job {job} 4" in status.stdout, status.stdout + status.stderr
    stopped = start_coordinator(processes, job, "--concurrency", "2", "--max-versions", "8", name="coordinator-2")
    assert stopped.wait(timeout=300) == 1
    assert f"fedq rollback --job {job} 4" in processes.log("coordinator-2")
    repaired = fedq("rollback", *flags, "4")
    assert repaired.returncode == 0, repaired.stderr
    assert store.versions.head() == 5 and store.versions.load_meta(5).rollback_of == 4
    resumed = start_coordinator(processes, job, "--concurrency", "2", "--max-versions", "8", name="coordinator-3")
    assert resumed.wait(timeout=300) == 0, processes.log("coordinator-3")[-3000:]
    assert fedq("replay", *flags).returncode == 0


def test_a_tampered_version_is_refused_by_workers_and_restored_by_the_coordinator(processes, job, store):
    coordinator = start_coordinator(
        processes, job, "--concurrency", "2", "--target", str(TARGET), "--max-seconds", "240"
    )
    processes.wait_for_log("coordinator", "event=initialised", timeout=180)
    # No worker has read version 0 yet: the first one to do so finds it replaced.
    store.redis.set(store.keys.model(0), codec.encode(model_like(0.5)))
    start_workers(processes, job, 1)
    processes.wait_for_log("coordinator", "event=version_restored", timeout=180)
    assert "reason=tampered_version" in processes.log("worker-0")
    assert_reached_target_unharmed(processes, coordinator, store)


def test_a_header_pika_cannot_decode_costs_one_dead_letter_not_a_stall(processes, job, store):
    coordinator = start_coordinator(processes, job, "--concurrency", "2", "--max-versions", "4")
    processes.wait_for_log("coordinator", "event=initialised", timeout=180)
    start_workers(processes, job, 1)
    processes.wait_for_log("worker-0", "event=worker_ready", timeout=180)
    topology = Topology(job)
    # Before, each of these made its consumer reconnect until the queue's delivery limit (4.5 min).
    sent = time.monotonic()
    publish_with_undecodable_header(job, topology.updates, b"not an update", "poisoned-update")
    publish_with_undecodable_header(job, topology.tasks, b"not a task", "poisoned-task")
    letters: list = []
    wait_until(
        lambda: (
            letters.extend(take_dead_letters(job)) or {b"not an update", b"not a task"} <= {body for _, body in letters}
        ),
        60,
        "the poisoned messages were not dead-lettered",
    )
    assert time.monotonic() - sent < 10, f"{time.monotonic() - sent:.1f} s to get two messages out of the way"
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    for name in ("coordinator", "worker-0"):
        assert "event=connection_lost" not in processes.log(name), processes.log(name)[-3000:]
