"""The worker loop: one task at a time, training off the connection's thread.

For each task: read the task's model version from Redis (cached per version),
train on this worker's partition in a background thread while the connection
thread keeps servicing heartbeats, publish the update, wait for the broker's
confirm, and only then ack the task. A crash at any point leaves the task
unacked, so RabbitMQ redelivers it; an update published twice is recognised by
its task id at the coordinator.

Signals: the first SIGTERM/SIGINT lets the current task finish (up to
``drain_seconds``), publishes its update and exits; past that, or on a second
signal, the task is requeued and the worker exits.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pika
import torch

from fedq.broker.session import run_with_reconnect
from fedq.broker.publisher import publish
from fedq.broker.topology import Topology
from fedq.common.wire import codec
from fedq.common.obs import metrics
from fedq.common.obs.logs import kv
from fedq.common.wire.messages import ClaimCheck, InlineDelta, MessageError, ModelUpdate, RoundTask, parse_task
from fedq.common.store import TRANSIENT_REDIS_ERRORS, ModelStore, StoreError, UnknownVersionError, connect_redis
from fedq.common.tasks import FederatedTask, load_task, load_weights_into, weights_of

log = logging.getLogger("fedq.worker")

# A delta above this travels as a Redis claim check instead of inside the message
# (RabbitMQ 4 caps messages at 16 MiB; large messages also stall the broker).
INLINE_LIMIT_BYTES = 256 * 1024
# Claim-checked deltas outlive any sensible queueing delay, then expire by themselves.
UPDATE_BLOB_TTL_SECONDS = 7 * 24 * 3600
# Liveness: refreshed every few seconds, gone 30 s after a worker dies.
LIVENESS_REFRESH_SECONDS = 5.0
LIVENESS_TTL_SECONDS = 30


@dataclass(frozen=True)
class WorkerSettings:
    job: str
    amqp_url: str
    redis_url: str
    worker_id: str = ""
    partition: int | None = None
    slowdown_seconds: float = 0.0
    max_tasks: int | None = None
    drain_seconds: float = 60.0
    heartbeat_seconds: int = 30
    inline_limit_bytes: int = INLINE_LIMIT_BYTES


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.worker_id = settings.worker_id or default_worker_id()
        self.topology = Topology(settings.job)
        self.store = ModelStore(connect_redis(settings.redis_url), settings.job)
        self.tasks_done = 0
        self.stop_requested = False
        self.stop_now = False
        self._task: FederatedTask | None = None
        self._spec_text: str | None = None
        self._model: torch.nn.Module | None = None
        self._current_task: str | None = None
        self._liveness_written = 0.0
        self.started_at = time.time()
        torch.set_num_threads(1)

    # -- signals ----------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_requested:
            self.stop_now = True
        self.stop_requested = True
        log.info(kv("stop_requested", worker=self.worker_id, signal=signal.Signals(signum).name,
                    immediate=self.stop_now))

    # -- the loop ---------------------------------------------------------

    def run(self) -> int:
        """Serve tasks until stopped or ``max_tasks`` done; reconnects after connection loss."""
        # The job in the connection name lets operators (and tests) find a job's connections.
        run_with_reconnect(self.settings.amqp_url, self._serve,
                           name=f"fedq-worker-{self.settings.job}-{self.worker_id}",
                           should_stop=lambda: self.stop_requested, also_transient=TRANSIENT_REDIS_ERRORS,
                           heartbeat=self.settings.heartbeat_seconds)
        self.store.workers.forget(self.worker_id)
        log.info(kv("worker_stopped", worker=self.worker_id, tasks_done=self.tasks_done))
        return 0

    def _report_liveness(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._liveness_written < LIVENESS_REFRESH_SECONDS:
            return
        self._liveness_written = time.monotonic()
        self.store.workers.touch(self.worker_id, {
            "worker_id": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
            "partition": self.partition, "tasks_done": self.tasks_done, "current_task": self._current_task,
            "started": self.started_at}, LIVENESS_TTL_SECONDS)

    def _serve(self, connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        self.topology.declare(channel)
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=1)
        log.info(kv("worker_ready", worker=self.worker_id, job=self.settings.job))
        self._report_liveness(force=True)
        for method, _properties, body in channel.consume(self.topology.tasks, inactivity_timeout=0.5):
            if self.stop_requested:
                break
            self._report_liveness()
            if method is None:
                continue
            try:
                self._handle(connection, channel, method, body)
            finally:
                self._current_task = None
            if self.settings.max_tasks is not None and self.tasks_done >= self.settings.max_tasks:
                break
        # Returns any delivery prefetched but not started to the queue.
        channel.cancel()

    def _handle(self, connection: pika.BlockingConnection, channel: Any, method: Any, body: bytes) -> None:
        try:
            task = parse_task(body)
            if task.job != self.settings.job:
                raise MessageError("unknown_job", f"task is for job {task.job!r}")
        except MessageError as error:
            log.warning(kv("task_rejected", worker=self.worker_id, reason=error.reason, detail=error.detail))
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        started = time.monotonic()
        log.info(kv("task_started", worker=self.worker_id, task=task.task_id, base_version=task.model_version))
        outcome: dict[str, Any] = {}
        thread = threading.Thread(target=self._train_into, args=(task, outcome), daemon=True,
                                  name=f"train-{task.task_id[:8]}")
        thread.start()
        drain_deadline = None
        self._current_task = task.task_id
        while thread.is_alive():
            # join() returns the moment training ends (no rounding of task times up to a
            # polling interval); between joins the connection thread services heartbeats.
            thread.join(timeout=0.2)
            connection.process_data_events(time_limit=0)
            self._report_liveness()
            if self.stop_requested and drain_deadline is None:
                drain_deadline = time.monotonic() + self.settings.drain_seconds
            if self.stop_now or (drain_deadline is not None and time.monotonic() > drain_deadline):
                channel.basic_nack(method.delivery_tag, requeue=True)
                metrics.WORKER_TASKS.labels(self.settings.job, "requeued").inc()
                log.info(kv("task_requeued", worker=self.worker_id, task=task.task_id))
                return
        if "error" in outcome:
            error = outcome["error"]
            metrics.WORKER_FAILURES.labels(self.settings.job, type(error).__name__).inc()
            if isinstance(error, UnknownVersionError):
                log.warning(kv("task_rejected", worker=self.worker_id, task=task.task_id, reason="unknown_version",
                               detail=str(error)))
                channel.basic_reject(method.delivery_tag, requeue=False)
                return
            channel.basic_nack(method.delivery_tag, requeue=True)
            raise error
        update: ModelUpdate = outcome["update"]
        body = update.to_bytes()
        publish(channel, self.topology.updates, body, message_id=task.task_id)
        channel.basic_ack(method.delivery_tag)
        self.tasks_done += 1
        job = self.settings.job
        metrics.WORKER_TASKS.labels(job, "done").inc()
        metrics.WORKER_TASK_SECONDS.labels(job).observe(time.monotonic() - started)
        sent = update.delta.nbytes if isinstance(update.delta, ClaimCheck) else len(body)
        metrics.WORKER_BYTES_SENT.labels(job).inc(sent)
        log.info(kv("task_done", worker=self.worker_id, task=task.task_id, base_version=task.model_version,
                    examples=update.num_examples, seconds=time.monotonic() - started,
                    **{key: value for key, value in update.metrics.items()}))

    # -- training (runs in the background thread) ------------------------

    def _train_into(self, task: RoundTask, outcome: dict[str, Any]) -> None:
        try:
            outcome["update"] = self.train(task)
        except Exception as error:  # handed back to the connection thread
            outcome["error"] = error

    def _load_plugin(self) -> tuple[FederatedTask, torch.nn.Module]:
        spec = self.store.status.load_spec()
        if spec is None:
            raise StoreError(f"job {self.settings.job!r} has no spec in Redis; start its coordinator first")
        spec_text = json.dumps(spec, sort_keys=True)
        if spec_text != self._spec_text:
            self._task = load_task(spec["task"], spec.get("task_params") or {})
            self._model = self._task.build_model()
            self._spec_text = spec_text
        return self._task, self._model

    @property
    def partition(self) -> int:
        if self.settings.partition is not None:
            return self.settings.partition
        # Stable across restarts of the same --worker-id; the plugin takes it modulo its partitions.
        return zlib.crc32(self.worker_id.encode())

    def train(self, task: RoundTask) -> ModelUpdate:
        plugin, model = self._load_plugin()
        base = self.store.versions.load_weights(task.model_version)
        started = time.monotonic()
        load_weights_into(model, base)
        data = plugin.local_data(self.partition)
        metrics = plugin.train(model, data, task.train)
        if self.settings.slowdown_seconds:
            time.sleep(self.settings.slowdown_seconds)
        trained = weights_of(model)
        delta = {name: (trained[name] - base[name]).astype(np.float32, copy=False) for name in base}
        payload = codec.encode(delta)
        if len(payload) <= self.settings.inline_limit_bytes:
            carried: InlineDelta | ClaimCheck = InlineDelta(payload)
        else:
            # Claim check: the blob is in Redis before the message that names it exists.
            key = self.store.blobs.put(task.task_id, payload, UPDATE_BLOB_TTL_SECONDS)
            carried = ClaimCheck(key=key, sha256=codec.digest(payload), nbytes=len(payload))
        return ModelUpdate(job=task.job, task_id=task.task_id, worker_id=self.worker_id,
                           base_version=task.model_version, num_examples=len(data), delta=carried,
                           metrics=metrics, train_seconds=time.monotonic() - started)
