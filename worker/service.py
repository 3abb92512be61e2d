"""The worker loop: one task at a time, training off the connection's thread.

For each task: check that the job's coordinator signed it (``worker.job``: a
forged task is dead-lettered as ``bad_signature``, never trained), read the
task's model version from Redis (cached per version, verified against the
digest the task carries), train on this worker's partition in a background thread while the connection
thread keeps servicing heartbeats, publish the update, wait for the broker's
confirm, and only then ack the task. A crash at any point leaves the task
unacked, so RabbitMQ redelivers it; an update published twice is recognised by
its task id at the coordinator.

Signals: the first SIGTERM/SIGINT lets the current task finish (up to
``drain_seconds``), publishes its update and exits; past that, or on a second
signal, the task is requeued and the worker exits.

Errors: a task whose training raises (a bug in a task plugin, a CUDA error) is
requeued for another attempt, anywhere, until it was delivered
``TRAINING_ATTEMPTS`` times, then dead-lettered with the error as its reason;
a task whose version is gone or tampered with is dead-lettered at once. Either
way the coordinator gets a refusal, so it replaces the task without waiting for
its lease, and the worker keeps serving. Only errors that are not the task's
fault end the loop (a worker configured for another task than the job's).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedq.broker.pika_transport import PikaTransport
from fedq.broker.topology import Topology
from fedq.broker.transport import AccessRefused, Channel, Delivery, Transport, dead_letter_headers, delivery_count
from fedq.common.obs import metrics
from fedq.common.obs.logs import kv
from fedq.common.store import (
    TRANSIENT_REDIS_ERRORS,
    ModelStore,
    StoreError,
    TamperedVersionError,
    UnknownVersionError,
)
from fedq.common.tasks import TaskPluginError
from fedq.common.wire.limits import INLINE_LIMIT_BYTES, MAX_TASK_MESSAGE_BYTES, TRAINING_ATTEMPTS
from fedq.common.wire.messages import ClaimCheck, MessageError, ModelUpdate, RoundTask, TaskRefusal, parse_task
from fedq.common.wire.signing import SignatureError
from fedq.worker.encoding import UpdateEncoder
from fedq.worker.job import BoundJob, JobBinder, JobMismatchError, UnverifiableJobError
from fedq.worker.training import LocalTrainer, job_partitions, stable_partition, training_device

log = logging.getLogger("fedq.worker")

# Liveness: refreshed every few seconds, gone 30 s after a worker dies.
LIVENESS_REFRESH_SECONDS = 5.0
LIVENESS_TTL_SECONDS = 30
# How often the connection thread looks up from a running training thread (heartbeats, signals).
TRAINING_POLL_SECONDS = 0.2
# A task that cannot be verified now (the job's description is missing or rewritten) goes back
# to the queue after this long: the coordinator restores its description every few seconds.
UNVERIFIABLE_RETRY_SECONDS = 1.0
# A synchronous round's extra task goes back to the queue this often (after this long), then is refused.
ROUND_HAND_BACKS = 3
ROUND_HAND_BACK_SECONDS = 0.5
# How often a worker waiting for its partition lease looks again.
LEASE_POLL_SECONDS = 0.25
# Errors that are not the task's fault: Redis going away (reconnect and carry on) or a
# worker that cannot serve this job at all (a task plugin it cannot import, or not the job's).
NOT_THE_TASKS_FAULT = (*TRANSIENT_REDIS_ERRORS, TaskPluginError, StoreError)


@dataclass(frozen=True)
class WorkerSettings:
    job: str
    amqp_url: str
    redis_url: str
    worker_id: str = ""
    # This worker's data: a partition of a built-in task's split (None: the coordinator leases one),
    # or a location the task plugin reads (``data``: a path or URL; then no partition is leased).
    partition: int | None = None
    data: str | None = None
    # torch device to train on ("cpu", "cuda", "cuda:1", "mps").
    device: str = "cpu"
    slowdown_seconds: float = 0.0
    step_delay_seconds: float = 0.0  # simulated: a slower device (every training step takes this much longer)
    max_tasks: int | None = None
    drain_seconds: float = 60.0
    heartbeat_seconds: int = 30
    inline_limit_bytes: int = INLINE_LIMIT_BYTES
    # This worker's task plugin and parameters; None: the job's, if it is a built-in task (see worker.job).
    task: str | None = None
    task_params: dict[str, Any] | None = None
    # The fingerprint of the job's coordinator key, pinned; None: trust the key the job's description names.
    coordinator_key: str | None = None
    # How long the consumer waits for a task before looking up (stop requests, liveness); tests shorten it.
    idle_seconds: float = 0.5
    # How long a worker waits for the coordinator to lease it a partition before it takes one from
    # its id (as before leases existed), with a warning.
    lease_wait_seconds: float = 20.0
    # Where this worker keeps its own state (the error-feedback residual); None: worker.encoding's default.
    state_dir: str | None = None
    # Local differential privacy this worker insists on: a job whose tasks ask for less local noise
    # than this multiplier (or for no local DP at all) is refused, not served.
    min_dp_noise: float = 0.0
    redis_wait_replicas: int = 0


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, settings: WorkerSettings, store: ModelStore | None = None, transport: Transport | None = None):
        self.settings = settings
        # "{hostname}" lets replicas of one site name themselves: --worker-id 'site-a.{hostname}'.
        self.worker_id = (settings.worker_id or default_worker_id()).replace("{hostname}", socket.gethostname())
        self.topology = Topology(settings.job)
        self.store = store or ModelStore.open(settings.redis_url, settings.job)
        self.store.require_replicas(settings.redis_wait_replicas)
        self.transport = transport or PikaTransport(settings.amqp_url, heartbeat=settings.heartbeat_seconds)
        # Where this worker's data comes from: "data" (--data), "flag" (--partition) or "lease".
        self.data_source = "data" if settings.data else "flag" if settings.partition is not None else "lease"
        self.partition: int | None = settings.partition
        self._lease_warned = False
        self.job = JobBinder(self.store, settings.task, settings.task_params, settings.coordinator_key)
        self.trainer = LocalTrainer(
            self.store,
            self.worker_id,
            device=training_device(settings.device),
            data_location=settings.data,
            slowdown_seconds=settings.slowdown_seconds,
            step_delay_seconds=settings.step_delay_seconds,
            inline_limit_bytes=settings.inline_limit_bytes,
            encoder=UpdateEncoder(
                settings.job, self.worker_id, None if settings.state_dir is None else Path(settings.state_dir)
            ),
        )
        self.tasks_done = 0
        self.tasks_failed = 0
        self.tasks_unverifiable = 0  # deliveries given back because the job's description did not verify
        self.stop_requested = False
        self.stop_now = False
        self._current_task: str | None = None
        self._round_trained: int | None = None  # the synchronous round this worker trained in last
        self._liveness_written = 0.0
        self.started_at = time.time()
        torch.set_num_threads(1)
        try:
            self.job.current()  # a worker configured for another task stops here, with the flags to fix it
        except UnverifiableJobError as error:
            log.warning(kv("job_not_verified_yet", job=settings.job, detail=str(error)))

    # -- signals ----------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.request_stop()
        log.info(
            kv("stop_requested", worker=self.worker_id, signal=signal.Signals(signum).name, immediate=self.stop_now)
        )

    def request_stop(self) -> None:
        """The first call drains the current task; a second requeues it at once."""
        if self.stop_requested:
            self.stop_now = True
        self.stop_requested = True

    # -- the loop ---------------------------------------------------------

    def run(self) -> int:
        """Serve tasks until stopped or ``max_tasks`` done; reconnects after connection loss."""
        # The job in the connection name lets operators (and tests) find a job's connections.
        self.transport.run(
            self._serve,
            name=f"fedq-worker-{self.settings.job}-{self.worker_id}",
            should_stop=lambda: self.stop_requested,
            also_transient=TRANSIENT_REDIS_ERRORS,
        )
        self.store.workers.forget(self.worker_id)
        log.info(kv("worker_stopped", worker=self.worker_id, tasks_done=self.tasks_done))
        return 0

    def _report_liveness(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._liveness_written < LIVENESS_REFRESH_SECONDS:
            return
        self._liveness_written = time.monotonic()
        self.store.workers.touch(
            self.worker_id,
            {
                "worker_id": self.worker_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "partition": self.partition,
                "partition_source": self.data_source,
                "data": self.settings.data,
                "device": self.settings.device,
                "tasks_done": self.tasks_done,
                "current_task": self._current_task,
                "started": self.started_at,
            },
            LIVENESS_TTL_SECONDS,
        )

    def _leased_partition(self, channel: Channel) -> int | None:
        """The partition to train this task on: the flag's, else the coordinator's lease (waited for
        up to ``lease_wait_seconds``; a lease can change after this worker was away), else one from
        the worker id. None with --data."""
        if self.data_source != "lease":
            return self.partition
        deadline = time.monotonic() + self.settings.lease_wait_seconds
        leased = self.store.partitions.of(self.worker_id)
        while leased is None and time.monotonic() < deadline and not self.stop_requested:
            self._wait_polling(channel, LEASE_POLL_SECONDS)
            leased = self.store.partitions.of(self.worker_id)
        if leased is None:
            leased = stable_partition(self.worker_id) % job_partitions(self.job.current())
            if not self._lease_warned:
                self._lease_warned = True
                log.warning(
                    kv(
                        "partition_not_leased",
                        worker=self.worker_id,
                        partition=leased,
                        waited_s=self.settings.lease_wait_seconds,
                        detail="no lease from the coordinator; training on a partition chosen from the "
                        "worker id, which another worker may share",
                    )
                )
        if leased != self.partition:
            log.info(kv("partition_leased", worker=self.worker_id, partition=leased, previous=self.partition))
            self.partition = leased
            self._report_liveness(force=True)
        return leased

    def _serve(self, channel: Channel) -> None:
        try:
            channel.declare(self.topology)
        except AccessRefused:
            # Enrolled with `fedq admin`, a worker may not declare anything: the coordinator does.
            log.info(kv("waiting_for_job_queues", worker=self.worker_id, queue=self.topology.tasks))
            if not channel.wait_for_queue(self.topology.tasks, lambda: self.stop_requested):
                return
        log.info(kv("worker_ready", worker=self.worker_id, job=self.settings.job))
        self._report_liveness(force=True)
        for delivery in channel.consume(self.topology.tasks, prefetch=1, inactivity_timeout=self.settings.idle_seconds):
            if self.stop_requested:
                break
            self._report_liveness()
            if delivery is None:
                continue
            try:
                self._handle(channel, delivery)
            finally:
                self._current_task = None
            if self.settings.max_tasks is not None and self.tasks_done >= self.settings.max_tasks:
                break
        # Returns any delivery prefetched but not started to the queue.
        channel.cancel()

    def _handle(self, channel: Channel, delivery: Delivery) -> None:
        try:
            if len(delivery.body) > MAX_TASK_MESSAGE_BYTES:
                raise MessageError("too_large", f"a task message of {len(delivery.body)} bytes is not a round task")
            task = parse_task(delivery.body)
            if task.job != self.settings.job:
                raise MessageError("unknown_job", f"task is for job {task.job!r}")
        except MessageError as error:
            self._refuse(channel, delivery, error.reason, error.detail)
            return
        try:
            job = self.job.current()
            job.verify_key.verify(task.signed_document(), task.signature)
        except UnverifiableJobError as error:
            # The job's description is missing or rewritten: no task can be checked now, but the
            # coordinator puts its description back within seconds. Wait a little, give the task
            # back; the queue's delivery limit ends a task that never becomes verifiable.
            log.warning(kv("task_unverifiable", worker=self.worker_id, task=task.task_id, detail=str(error)))
            self.tasks_unverifiable += 1
            self._wait_polling(channel, UNVERIFIABLE_RETRY_SECONDS)
            channel.nack(delivery.tag, requeue=True)
            return
        except SignatureError as error:
            # Not issued by the job's coordinator: a forged task is never trained.
            self._refuse(channel, delivery, "bad_signature", f"task {task.task_id[:64]}: {error}")
            return
        except JobMismatchError:
            channel.nack(delivery.tag, requeue=True)  # another worker, configured right, may take it
            raise
        if task.dp_noise < self.settings.min_dp_noise or (self.settings.min_dp_noise > 0 and task.dp_clip <= 0):
            channel.nack(delivery.tag, requeue=True)
            raise JobMismatchError(
                f"job {task.job!r} asks for local differential privacy with noise multiplier {task.dp_noise:g}; "
                f"this worker sends nothing with less than {self.settings.min_dp_noise:g} (--min-dp-noise)"
            )
        if task.synchronous and task.model_version == self._round_trained:
            self._hand_back(channel, delivery, task)
            return
        partition = self._leased_partition(channel)
        started = time.monotonic()
        log.info(
            kv(
                "task_started",
                worker=self.worker_id,
                task=task.task_id,
                base_version=task.model_version,
                partition=partition,
            )
        )
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=self._train_into, args=(task, job, partition, outcome), daemon=True, name=f"train-{task.task_id[:8]}"
        )
        thread.start()
        drain_deadline = None
        self._current_task = task.task_id
        while thread.is_alive():
            # join() returns the moment training ends (no rounding of task times up to a
            # polling interval); between joins the connection thread services heartbeats.
            thread.join(timeout=TRAINING_POLL_SECONDS)
            channel.poll()
            self._report_liveness()
            if self.stop_requested and drain_deadline is None:
                drain_deadline = time.monotonic() + self.settings.drain_seconds
            if self.stop_now or (drain_deadline is not None and time.monotonic() > drain_deadline):
                channel.nack(delivery.tag, requeue=True)
                metrics.WORKER_TASKS.labels(self.settings.job, "requeued").inc()
                log.info(kv("task_requeued", worker=self.worker_id, task=task.task_id))
                return
        if "error" in outcome:
            self._on_training_error(channel, delivery, task, outcome["error"])
            return
        update: ModelUpdate = outcome["update"]
        body = update.to_bytes()
        channel.publish(self.topology.updates, body, message_id=task.task_id, user_id=self.transport.user)
        self.trainer.encoder.sent(task.task_id)  # confirmed: what its compression dropped is carried forward
        channel.ack(delivery.tag)
        self.tasks_done += 1
        if task.synchronous:
            self._round_trained = task.model_version
        job_name = self.settings.job
        metrics.WORKER_TASKS.labels(job_name, "done").inc()
        metrics.WORKER_TASK_SECONDS.labels(job_name).observe(time.monotonic() - started)
        sent = update.delta.nbytes if isinstance(update.delta, ClaimCheck) else len(body)
        metrics.WORKER_BYTES_SENT.labels(job_name).inc(sent)
        log.info(
            kv(
                "task_done",
                worker=self.worker_id,
                task=task.task_id,
                base_version=task.model_version,
                examples=update.num_examples,
                seconds=time.monotonic() - started,
                sent_bytes=sent,
                read_bytes=self.trainer.last_read[1],
                read_as=self.trainer.last_read[0],
                **{key: value for key, value in update.metrics.items()},
            )
        )

    def _hand_back(self, channel: Channel, delivery: Delivery, task: RoundTask) -> None:
        """A second task of a synchronous round this worker already trained in: give it back so that
        a worker that has not trained in the round takes it; after ROUND_HAND_BACKS deliveries
        nobody else took it, so refuse it and the round completes without it."""
        if delivery_count(delivery) + 1 >= ROUND_HAND_BACKS:
            self._refuse(
                channel,
                delivery,
                "trained_in_round",
                f"worker {self.worker_id} trained in round "
                f"{task.model_version} already, and no other worker took this task",
                task,
                dead_letter=False,
            )
            return
        log.info(kv("task_handed_back", worker=self.worker_id, task=task.task_id, round=task.model_version))
        self._wait_polling(channel, ROUND_HAND_BACK_SECONDS)  # the others' turn first
        channel.nack(delivery.tag, requeue=True)

    def _on_training_error(self, channel: Channel, delivery: Delivery, task: RoundTask, error: Exception) -> None:
        """A task whose version is gone is refused; a task whose training raised is retried a
        bounded number of times, then dead-lettered with the error; only errors that are not
        the task's fault (Redis down, a job this worker cannot serve) leave the loop."""
        metrics.WORKER_FAILURES.labels(self.settings.job, type(error).__name__).inc()
        if isinstance(error, (UnknownVersionError, TamperedVersionError)):
            # No worker can train this task: its model version is gone or not what was committed.
            reason = "unknown_version" if isinstance(error, UnknownVersionError) else "tampered_version"
            self._refuse(channel, delivery, reason, str(error), task)
            return
        if isinstance(error, NOT_THE_TASKS_FAULT):
            channel.nack(delivery.tag, requeue=True)
            raise error
        self.tasks_failed += 1
        metrics.WORKER_TASKS.labels(self.settings.job, "failed").inc()
        attempt = delivery_count(delivery) + 1
        detail = f"{type(error).__name__}: {error}"
        if attempt < TRAINING_ATTEMPTS:
            log.warning(
                kv("task_failed", worker=self.worker_id, task=task.task_id, attempt=attempt, retry=True, error=detail)
            )
            channel.nack(delivery.tag, requeue=True)
            return
        log.error(
            kv("task_failed", worker=self.worker_id, task=task.task_id, attempt=attempt, retry=False, error=detail)
        )
        self._refuse(channel, delivery, "training_failed", detail, task)

    def _refuse(
        self,
        channel: Channel,
        delivery: Delivery,
        reason: str,
        detail: str,
        issued: RoundTask | None = None,
        *,
        dead_letter: bool = True,
    ) -> None:
        """A task no worker should train: to the dead letters with its reason, and on to the next.

        ``issued``: a task the coordinator verifiably issued; it is told, so that it replaces
        the task now instead of when its lease ends. ``dead_letter`` False: nothing is wrong with
        the task (a round that needs no more of this worker), only the coordinator is told.
        """
        task_id = issued.task_id if issued is not None else None
        log.warning(kv("task_rejected", worker=self.worker_id, task=task_id, reason=reason, detail=detail))
        metrics.WORKER_TASKS.labels(self.settings.job, "refused").inc()
        if issued is not None:
            refusal = TaskRefusal(
                job=issued.job, task_id=issued.task_id, worker_id=self.worker_id, reason=reason, detail=detail[:500]
            )
            channel.publish(
                self.topology.updates,
                refusal.to_bytes(),
                message_id=f"refusal-{issued.task_id}",
                user_id=self.transport.user,
            )
        if dead_letter:
            channel.publish(
                self.topology.dead,
                delivery.body,
                message_id=delivery.message_id or task_id or "unknown",
                headers=dead_letter_headers(delivery.headers, reason, detail, origin="tasks"),
            )
        channel.ack(delivery.tag)

    def _wait_polling(self, channel: Channel, seconds: float) -> None:
        """Wait on the connection's thread while still servicing heartbeats."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop_requested:
            channel.poll()
            time.sleep(min(TRAINING_POLL_SECONDS, max(deadline - time.monotonic(), 0)))

    # -- training (runs in the background thread) ------------------------

    def _train_into(self, task: RoundTask, job: BoundJob, partition: int | None, outcome: dict[str, Any]) -> None:
        try:
            outcome["update"] = self.trainer.train(task, job, partition)
        except Exception as error:  # handed back to the connection thread
            outcome["error"] = error
