"""Tasks are capabilities and workers choose their own code: signatures, the job description, the worker's plugin."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedq.broker.memory import MemoryBroker, MemoryTransport, Message
from fedq.broker.topology import Topology
from fedq.broker.transport import REASON_HEADER
from fedq.common.wire.description import JobDescription
from fedq.common.wire.messages import parse_task, parse_update
from fedq.common.wire.signing import SignatureError, SigningKey, parse_fingerprint
from fedq.coordinator.service.loop import Coordinator
from fedq.coordinator.service.settings import CoordinatorSettings
from fedq.worker.job import JobBinder, JobMismatchError, UnverifiableJobError
from fedq.worker.service import Worker, WorkerSettings
from tests.support import FAST_POLLING, InBackground, memory_store, publish_job, signed_task, wait_until

JOB = "unit"
TOPOLOGY = Topology(JOB)
DEADLINE = 60


def worker_for(broker, store, **settings) -> tuple[Worker, InBackground]:
    worker = Worker(
        WorkerSettings(
            job=JOB,
            amqp_url="memory://",
            redis_url="memory://",
            worker_id="w0",
            idle_seconds=FAST_POLLING["idle_seconds"],
            **{"partition": 0} | settings,
        ),
        store,
        MemoryTransport(broker),
    )
    return worker, InBackground(worker)


def send(broker, task) -> None:
    broker.declare(TOPOLOGY)
    broker.publish(TOPOLOGY.tasks, Message(task.to_bytes(), task.task_id))


def dead_reasons(broker) -> list[str]:
    return [message.headers[REASON_HEADER] for message in broker.ready(TOPOLOGY.dead)]


def test_the_coordinator_signs_every_task_and_its_description_with_the_jobs_key():
    broker, store = MemoryBroker(), memory_store(JOB)
    coordinator = Coordinator(
        CoordinatorSettings(job=JOB, amqp_url="", redis_url="", task="linear", eval_every=0, **FAST_POLLING),
        store,
        MemoryTransport(broker),
    )
    running = InBackground(coordinator)
    message = broker.get(TOPOLOGY.tasks, timeout=DEADLINE)
    running.stop()
    description = store.status.load_description()
    description.verify(coordinator.signing_key.verify_key.fingerprint)
    task = parse_task(message.body)
    description.verify_key.verify(task.signed_document(), task.signature)
    assert task.model_digest == store.versions.load_meta(0).digest
    # The same key after a restart: workers that pinned it keep working.
    assert store.status.signing_key().verify_key == coordinator.signing_key.verify_key


def test_a_signature_covers_every_field_of_the_task():
    key, store = SigningKey.generate(), memory_store(JOB)
    publish_job(store)
    task = signed_task(key, store)
    key.verify_key.verify(task.signed_document(), task.signature)
    for changed in (
        dataclasses.replace(task, model_version=5),
        dataclasses.replace(task, task_id="other"),
        dataclasses.replace(task, train=dataclasses.replace(task.train, learning_rate=1000.0)),
        dataclasses.replace(task, model_digest="f" * 64),
    ):
        with pytest.raises(SignatureError):
            key.verify_key.verify(changed.signed_document(), changed.signature)


def test_a_forged_task_is_dead_lettered_untrained_and_a_genuine_one_is_trained():
    broker, store = MemoryBroker(), memory_store(JOB)
    key = publish_job(store)
    forged = signed_task(SigningKey.generate(), store, learning_rate=1000.0)  # signed, but not by the job's key
    send(broker, forged)
    send(broker, dataclasses.replace(signed_task(key, store), signature="bm90IGEgc2lnbmF0dXJl"))  # garbled
    genuine = signed_task(key, store)
    send(broker, genuine)
    worker, running = worker_for(broker, store, max_tasks=1)
    assert running.join(DEADLINE) == 0
    assert dead_reasons(broker) == ["bad_signature", "bad_signature"]
    assert [parse_update(message.body).task_id for message in broker.ready(TOPOLOGY.updates)] == [genuine.task_id]


def test_a_worker_that_pins_the_key_trains_nothing_under_a_rewritten_description():
    broker, store = MemoryBroker(), memory_store(JOB)
    key = publish_job(store)
    genuine_description = store.status.load_description_text()
    pinned = key.verify_key.fingerprint
    # Someone with write access to Redis republishes the job under a key of their own, and signs tasks with it.
    impostor = SigningKey.generate()
    description = store.status.load_description()
    store.status.save_description(
        dataclasses.replace(description, public_key=impostor.verify_key.to_text()).signed(impostor)
    )
    forged = signed_task(impostor, store)
    send(broker, forged)
    worker, running = worker_for(broker, store, coordinator_key=pinned, max_tasks=1)
    # Unverifiable: given back to the queue again and again (the delivery limit ends it), never trained.
    wait_until(lambda: worker.tasks_unverifiable >= 2, DEADLINE, "the task was not given back")
    assert broker.ready(TOPOLOGY.updates) == []
    # The coordinator puts its description back (it does every few seconds): the forged task is now
    # checked against the genuine key and refused; a genuine one is trained.
    store.redis.set(store.keys.spec, genuine_description)
    genuine = signed_task(key, store)
    send(broker, genuine)
    assert running.join(DEADLINE) == 0
    assert dead_reasons(broker) == ["bad_signature"]
    assert [parse_update(message.body).task_id for message in broker.ready(TOPOLOGY.updates)] == [genuine.task_id]


def test_a_description_edited_without_re_signing_does_not_verify():
    store = memory_store(JOB)
    publish_job(store)
    document = json.loads(store.status.load_description_text())
    document["task"] = "subprocess:run"
    document["task_params"] = {"args": "id > pwned.txt", "shell": True}
    store.redis.set(store.keys.spec, json.dumps(document))
    with pytest.raises(UnverifiableJobError):
        JobBinder(store).current()


def test_a_worker_never_imports_a_plugin_named_in_redis():
    store = memory_store(JOB)
    key = SigningKey.generate()
    # Even validly signed (a coordinator started with --task subprocess:run): the worker was not configured so.
    store.status.save_description(
        JobDescription(
            job=JOB,
            task="subprocess:run",
            task_params={"args": "id"},
            seed=0,
            tensors={},
            public_key=key.verify_key.to_text(),
        ).signed(key)
    )
    with pytest.raises(JobMismatchError, match="not built into fedq; give this worker that plugin with --task"):
        JobBinder(store).current()


def test_a_worker_configured_for_another_task_or_parameters_is_told_the_flags_that_fit():
    store = memory_store(JOB)
    publish_job(store, "linear", {"num_partitions": 3})
    with pytest.raises(JobMismatchError, match="trains 'linear'; start the worker with --task linear"):
        JobBinder(store, task="digits").current()
    with pytest.raises(JobMismatchError, match="""--task-params '{"num_partitions": 3}'"""):
        JobBinder(store, task="linear", task_params={"num_partitions": 2}).current()
    bound = JobBinder(store).current()  # unset: the job's built-in task, with its parameters (data)
    assert bound.plugin.num_partitions == 3


def test_a_built_in_task_refuses_parameters_that_would_exhaust_memory():
    store = memory_store(JOB)
    key = SigningKey.generate()
    description = JobDescription(
        job=JOB, task="digits", task_params={"hidden": 10**9}, seed=0, tensors={}, public_key=key.verify_key.to_text()
    )
    store.status.save_description(description.signed(key))
    with pytest.raises(Exception, match="hidden must be an integer from 1 to 65536"):
        JobBinder(store).current()


def test_a_fingerprint_is_64_hex_digits():
    assert parse_fingerprint("SHA256:" + "AB" * 32) == "ab" * 32
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_fingerprint("abc")
