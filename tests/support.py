"""Helpers the integration tests share: the real servers' URLs, fedq subprocesses, waiting for a condition.

Fixtures built on them live in ``tests/integration/conftest.py``; tests import
helpers from here, never from a conftest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("FEDQ_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672/")
REDIS_URL = os.environ.get("FEDQ_TEST_REDIS_URL", "redis://localhost:6379/0")


def cleanup_job(name: str) -> None:
    """Remove a test's job: its archive (if a coordinator recorded a local one), Redis keys, queues."""
    from fedq.common.store import ModelStore, connect_redis
    from fedq.coordinator.ops.status import remove_job

    store = ModelStore(connect_redis(REDIS_URL), name)
    url = store.status.archive_url()
    # A test's S3 server is gone by now; its folders are temporary anyway.
    remove_job(AMQP_URL, store, archive=bool(url) and "://" not in url)


class Processes:
    """fedq subprocesses of one test, with their logs; all are killed at teardown."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "fedq.common.cli", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()

    def wait_for_log(self, name: str, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log(name)
            if text in content:
                return content
            if self.running[name].poll() is not None:
                raise AssertionError(
                    f"{name} exited ({self.running[name].returncode}) before logging {text!r}:\n" + content[-3000:]
                )
            time.sleep(0.1)
        raise AssertionError(f"{name} did not log {text!r} within {timeout} s:\n" + self.log(name)[-3000:])

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self.running.values():
            process.wait(timeout=30)


def fedq_side_by_side(*commands: list[str], timeout: float = 300, **popen) -> list[subprocess.CompletedProcess]:
    """Run ``python -m fedq.common.cli`` commands at once, from the repository root; their results, in
    order. Each spends a second or two of CPU starting up, which on two cores need not be one after
    another. Only for commands that change nothing another of them reads."""
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "fedq.common.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        for args in commands
    ]
    results = []
    for process in running:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def wait_until(condition: Callable[[], object], timeout: float, message: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(message)


def connection_flags(job: str) -> list[str]:
    return ["--job", job, "--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]


def take_dead_letters(job: str) -> list[tuple[dict, bytes]]:
    """Take every message from the job's dead-letter queue on the real RabbitMQ: (headers, body)."""
    from fedq.broker.connection import connect
    from fedq.broker.topology import Topology

    connection = connect(AMQP_URL)
    try:
        channel = connection.channel()
        Topology(job).declare(channel)  # idempotent: the services may not have declared it yet
        letters = []
        while True:
            method, properties, body = channel.basic_get(Topology(job).dead, auto_ack=True)
            if method is None:
                return letters
            letters.append((dict(properties.headers or {}), body))
    finally:
        connection.close()


def take_tasks(job: str, count: int, timeout: float = 120) -> list:
    """Take ``count`` round tasks off the job's task queue, as any worker (or a hostile one) can."""
    from fedq.broker.connection import connect
    from fedq.broker.topology import Topology
    from fedq.common.wire.messages import parse_task

    connection = connect(AMQP_URL)
    try:
        channel = connection.channel()
        Topology(job).declare(channel)
        tasks = []

        def take_one():
            method, _, body = channel.basic_get(Topology(job).tasks, auto_ack=True)
            if method is not None:
                tasks.append(parse_task(body))
            return len(tasks) >= count

        wait_until(take_one, timeout, f"the job did not hand out {count} task(s)")
        return tasks
    finally:
        connection.close()


def publish_updates(job: str, bodies: dict[str, bytes]) -> None:
    """Publish update messages (message id -> body) to the job's update exchange, confirmed."""
    from fedq.broker.connection import connect
    from fedq.broker.publisher import publish
    from fedq.broker.topology import Topology

    connection = connect(AMQP_URL)
    try:
        channel = connection.channel()
        Topology(job).declare(channel)
        channel.confirm_delivery()
        for message_id, body in bodies.items():
            publish(channel, Topology(job).updates, body, message_id=message_id)
    finally:
        connection.close()


def publish_with_undecodable_header(job: str, exchange: str, body: bytes, message_id: str) -> None:
    """Publish ``body`` with a header pika 1.4.4 cannot decode: a timestamp of 2^64-1 seconds.

    pika's encoder cannot write one, so the test swaps in an encoder that does, as any
    other AMQP client may.
    """
    import struct
    from unittest import mock

    import pika.data

    from fedq.broker.connection import connect
    from fedq.broker.publisher import publish
    from fedq.broker.topology import Topology

    original = pika.data.encode_value

    def encode_value(pieces, value):
        if value == "<undecodable timestamp>":
            pieces.append(struct.pack(">cQ", b"T", 2**64 - 1))
            return 9
        return original(pieces, value)

    connection = connect(AMQP_URL)
    try:
        channel = connection.channel()
        Topology(job).declare(channel)
        channel.confirm_delivery()
        with mock.patch.object(pika.data, "encode_value", encode_value):
            publish(channel, exchange, body, message_id=message_id, headers={"sent": "<undecodable timestamp>"})
    finally:
        connection.close()


# -- the loops in memory: no RabbitMQ, no Redis (unit tests) --------------------------------


class InBackground:
    """Run a service loop (``run()`` of a Coordinator or Worker) in a thread; re-raise what it raised."""

    def __init__(self, service):
        import threading

        self.service = service
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=type(service).__name__)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.service.run()
        except BaseException as error:  # handed to the test thread by join()
            self.error = error

    def join(self, timeout: float = 60):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"{type(self.service).__name__} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self, timeout: float = 60):
        self.service.request_stop()
        return self.join(timeout)


# The loops' unit tests poll often: their in-memory broker and fakeredis answer at once.
FAST_POLLING = {"idle_seconds": 0.05, "head_check_seconds": 0.2}


def memory_store(job: str):
    """A ModelStore on fakeredis (with Lua, for the commit script): Redis semantics, no server."""
    import fakeredis

    from fedq.common.store import ModelStore

    return ModelStore(fakeredis.FakeRedis(), job)


def publish_job(store, task: str = "linear", task_params: dict | None = None, *, commit: bool = True):
    """What a coordinator leaves for workers: the job's signing key (returned), its signed
    description and (``commit``) version 0."""
    from fedq.common.tasks import load_task
    from fedq.common.wire import codec
    from fedq.common.wire.description import JobDescription

    key = store.status.signing_key()
    weights = load_task(task, task_params or {}).initial_weights(0)
    store.status.save_description(
        JobDescription(
            job=store.job,
            task=task,
            task_params=task_params or {},
            seed=0,
            tensors=codec.tensor_specs(weights),
            public_key=key.verify_key.to_text(),
        ).signed(key)
    )
    if commit:
        store.versions.commit(None, weights)
    return key


def signed_task(
    key, store, version: int = 0, *, task_id: str | None = None, learning_rate: float = 0.05, synchronous: bool = False
):
    """A round task for ``version`` as the coordinator issues it: with the version's digest, signed by ``key``."""
    import dataclasses
    import uuid

    from fedq.common.wire.messages import RoundTask, TrainSettings

    try:
        digest = store.versions.digest_of(version)
    except Exception:  # noqa: BLE001 - a version that does not exist: any well-formed digest
        digest = "0" * 64
    task = RoundTask(
        job=store.job,
        task_id=task_id or uuid.uuid4().hex,
        model_version=version,
        issued_at=0.0,
        train=TrainSettings(epochs=1, batch_size=32, learning_rate=learning_rate, seed=1),
        model_digest=digest,
        synchronous=synchronous,
    )
    return dataclasses.replace(task, signature=key.sign(task.signed_document()))


def update_body(task, delta: dict, *, worker_id: str = "w", num_examples: int = 10, job: str | None = None) -> bytes:
    """The update message a worker would send for ``task`` (a RoundTask), delta inline."""
    from fedq.common.wire import codec
    from fedq.common.wire.messages import InlineDelta, ModelUpdate

    return ModelUpdate(
        job=job or task.job,
        task_id=task.task_id,
        worker_id=worker_id,
        base_version=task.model_version,
        num_examples=num_examples,
        delta=InlineDelta(codec.encode(delta)),
    ).to_bytes()


def exploding_task(**params):
    """A task plugin (``tests.support:exploding_task``) whose local training always raises,
    as a bug in someone's plugin would."""
    from fedq.common.tasks.linear import LinearRegressionTask

    class ExplodingTask(LinearRegressionTask):
        def train(self, model, data, settings):
            raise RuntimeError("the plugin's training step blew up")

    return ExplodingTask(**params)


class BlockedTraining:
    """A task plugin (``tests.support:blocked_task``) whose training waits until the test releases it,
    so a test can act mid-task however fast or slow the machine is."""

    started = None  # threading.Event, set when training begins
    release = None  # threading.Event the training waits for
    running = 0  # trainings running now, and the most ever at once
    most_at_once = 0

    @classmethod
    def reset(cls) -> None:
        import threading

        cls.started, cls.release = threading.Event(), threading.Event()
        cls.running = cls.most_at_once = 0
        cls.lock = threading.Lock()


def blocked_task(**params):
    from fedq.common.tasks.linear import LinearRegressionTask

    class BlockedTask(LinearRegressionTask):
        def train(self, model, data, settings):
            with BlockedTraining.lock:
                BlockedTraining.running += 1
                BlockedTraining.most_at_once = max(BlockedTraining.most_at_once, BlockedTraining.running)
            try:
                BlockedTraining.started.set()
                if not BlockedTraining.release.wait(timeout=120):
                    raise TimeoutError("the test never released the training")
                return super().train(model, data, settings)
            finally:
                with BlockedTraining.lock:
                    BlockedTraining.running -= 1

    return BlockedTask(**params)
