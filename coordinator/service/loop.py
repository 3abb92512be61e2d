"""The coordinator loop: dispatch tasks, validate and buffer updates, commit versions.

Order of effects for one server step (what makes a crash lose nothing):
1. buffered updates stay unacked in RabbitMQ until their version is committed;
2. commit = SET the weights blob, then one Lua script moves the head and writes
   metadata, history and the applied task ids (see ``common.store``);
3. only then are the buffered deliveries acked;
4. then new tasks are dispatched: recorded open in Redis, then published; the broker's
   confirms are collected as they arrive, and a task it refused is closed and replaced.
A crash before 2 redelivers the updates; a crash between 2 and 3 redelivers
updates whose task ids are already applied, which are acked and skipped.

The loop only routes: ``validation.validate_update`` judges each update,
``scheduling`` decides how many tasks to hand out and when the buffer is ready,
``algorithms.step.server_step`` computes the new version. RabbitMQ is reached
through a ``fedq.broker.transport.Channel``, so the loop runs on the in-memory
transport in unit tests.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import redis
import torch

from fedq.broker.pika_transport import PikaTransport
from fedq.broker.topology import Topology
from fedq.broker.transport import Channel, Delivery, Transport, dead_letter_headers
from fedq.common.obs import metrics
from fedq.common.obs.faults import crash_point
from fedq.common.obs.logs import kv
from fedq.common.store import (
    TRANSIENT_REDIS_ERRORS,
    HeadMovedError,
    ModelStore,
    StoreError,
    TamperedVersionError,
    UnknownVersionError,
)
from fedq.common.store.archive import Archive
from fedq.common.store.identities import IdentityCache, identity_of
from fedq.common.store.ledger import OpenTask
from fedq.common.store.versions import IdentityRefusedError
from fedq.common.tasks import FederatedTask, load_task, load_weights_into
from fedq.common.wire import codec
from fedq.common.wire.description import JobDescription
from fedq.common.wire.downlink import DiffError
from fedq.common.wire.messages import MessageError, RoundTask, TaskRefusal, TrainSettings
from fedq.coordinator.algorithms.aggregation import BufferedUpdate
from fedq.coordinator.algorithms.step import (
    CentralNoise,
    build_aggregator,
    build_optimizer,
    config_digest,
    server_step,
)
from fedq.coordinator.service.archiver import ArchiveThread
from fedq.coordinator.service.fleet import Fleet
from fedq.coordinator.service.partitions import plan_leases
from fedq.coordinator.service.readahead import READ_AHEAD, DeltaReadAhead
from fedq.coordinator.service.reservations import MOST_RESERVED, Reservations
from fedq.coordinator.service.scheduling import scheduling_policy
from fedq.coordinator.service.settings import AUTO, CoordinatorSettings
from fedq.coordinator.service.validation import (
    Expectations,
    NormGuard,
    Rejected,
    ValidatedRefusal,
    ValidatedUpdate,
    l2_distance,
    l2_norm,
    validate_update,
)

log = logging.getLogger("fedq.coordinator")

# How often the coordinator removes bindings a worker added to copy tasks elsewhere.
STRAY_BINDINGS_CHECK_SECONDS = 5.0
# How often it leases partitions to workers that joined (a worker waits for its lease).
PARTITION_LEASE_SECONDS = 1.0
# What the serve loop takes for "the broker ended the consumer" (a delivery nobody sends).
ENDED = Delivery(tag=-1, body=b"")


@dataclass
class Pending:
    """A validated update waiting in the buffer, with its unacked delivery."""

    delivery: Delivery
    validated: ValidatedUpdate

    @property
    def update(self) -> BufferedUpdate:
        return self.validated.update


class Plateau:
    """Whether a score has stopped improving: not by ``epsilon`` over its best in ``patience``
    evaluations (patience 0: never). Counted from this process's start: a restarted
    coordinator gives a job a fresh chance."""

    def __init__(self, patience: int, epsilon: float):
        self.patience, self.epsilon = patience, epsilon
        self.best: float | None = None
        self.evaluations = 0
        self._since_best = 0

    def stalled(self, score: float) -> bool:
        self.evaluations += 1
        if self.best is None or score > self.best + self.epsilon:
            self.best, self._since_best = score, 0
        else:
            self._since_best += 1
        return self.patience > 0 and self._since_best >= self.patience


class Coordinator:
    def __init__(
        self, settings: CoordinatorSettings, store: ModelStore | None = None, transport: Transport | None = None
    ):
        # One thread: on two cores shared with workers and servers, a second torch
        # thread costs far more than it gains (DESIGN.md measured 1.2-400x).
        torch.set_num_threads(1)
        self.settings = settings
        self.topology = Topology(settings.job)
        self.store = store or ModelStore.open(settings.redis_url, settings.job)
        self.store.require_replicas(settings.redis_wait_replicas)
        # Updates are judged on a copy of the job's identities; the commit script checks them on Redis.
        self.identities = IdentityCache(self.store.identities)
        self.transport = transport or PikaTransport(settings.amqp_url)
        self.config = settings.aggregation_config()
        self.uplink = settings.uplink
        self.privacy = settings.privacy
        self.dp_steps = 0  # central DP: noised steps committed so far (restored from the head's record)
        self._budget_warned = False
        self.aggregator = build_aggregator(self.config)
        self.optimizer = build_optimizer(self.config)
        self.norm_guard = NormGuard(settings.norm_outlier_factor)
        self.policy = scheduling_policy(
            settings.chosen_algorithm.synchronous, settings.concurrency, self.aggregator.buffer_size
        )
        # Opened now, so that a URL nothing can open is one sentence before the job starts.
        self.archive = None if settings.archive_url is None else Archive(settings.archive_url).job(settings.job)
        self.task: FederatedTask = load_task(settings.task, settings.task_params)
        self.model = self.task.build_model()
        self.buffer: list[Pending] = []
        # Tasks issued and not yet closed (applied, refused, expired): the only ones an update may answer.
        # A mirror of the Redis ledger; buffered updates' tasks stay open until their version is committed.
        self.open_tasks: dict[str, OpenTask] = {}
        # Task ids written to the ledger ahead of dispatch, with each commit (see reservations.py):
        # as many as the tasks handed out in a version, a round's worth when synchronous.
        self.reservations = Reservations(
            min(
                MOST_RESERVED,
                settings.concurrency if settings.chosen_algorithm.synchronous else self.aggregator.buffer_size + 2,
            )
        )
        # Open tasks a predecessor reserved: perhaps never published, so not counted in flight.
        self.perhaps_unpublished: set[str] = set()
        self.finished_reason: str | None = None
        self.stop_requested = False
        self.last_metrics: dict[str, float] = {}
        self._channel: Channel | None = None
        self.archiving: ArchiveThread | None = None  # while running: moves history out, may hold dispatch
        self._dispatch_held = False
        self.plateau = Plateau(settings.plateau_evaluations, settings.plateau_epsilon)
        self.fleet = Fleet(self.store.fleet, settings.job)  # each worker's speed and contribution
        self.synchronous = settings.chosen_algorithm.synchronous
        self._round_started: float | None = None  # synchronous: when the open round's tasks went out
        self._round_short_warned = False
        self._prepare_job()
        self.read_ahead = DeltaReadAhead(self.store, self.max_delta_bytes)
        # --max-seconds counts from version 0, not from loading the task's data.
        self.started = time.monotonic()

    # -- job state --------------------------------------------------------

    def _prepare_job(self) -> None:
        previous = self.store.status.previous_task()
        if previous is not None and previous != (self.settings.task, self.settings.task_params):
            raise StoreError(
                f"job {self.settings.job!r} already trains task {previous[0]!r} with "
                f"{previous[1]}; use another --job name"
            )
        # The job's key signs every task: workers train only what this coordinator issued.
        self.signing_key = self.store.status.signing_key()
        weights = self.task.initial_weights(self.settings.seed)
        self.description = JobDescription(
            job=self.settings.job,
            task=self.settings.task,
            task_params=self.settings.task_params,
            seed=self.settings.seed,
            tensors=codec.tensor_specs(weights),
            public_key=self.signing_key.verify_key.to_text(),
        ).signed(self.signing_key)
        self.store.status.save_description(self.description)
        log.info(
            kv(
                "coordinator_key",
                job=self.settings.job,
                fingerprint=self.signing_key.verify_key.fingerprint,
                pin_with="--coordinator-key",
            )
        )
        head = self.store.versions.head()
        if head is None:
            self.last_metrics = self._evaluate(weights)
            self.store.versions.commit(None, weights, metrics=self.last_metrics, config=self.config)
            log.info(
                kv(
                    "initialised",
                    job=self.settings.job,
                    task=self.settings.task,
                    version=0,
                    parameters=codec.num_parameters(weights),
                )
            )
        else:
            head_record = self.store.versions.load_meta(head)
            self._check_same_privacy(head_record.config or {})
            self.last_metrics = head_record.metrics
            self.dp_steps = head_record.dp_steps or 0
            # A restart bounds updates by the norms the job accepted before, not by a fresh warm-up.
            recent = self.store.versions.recent_history(self.norm_guard.window)
            self.norm_guard.accepted(
                [(update.worker_id, update.norm) for record in recent for update in record.updates]
            )
            log.info(kv("resumed", job=self.settings.job, head=head))
        self._load_head()  # sets self.head
        self.tensor_specs = codec.tensor_specs(self.weights)
        self.num_values = codec.num_parameters(self.weights)
        if self.privacy.mode == "local":
            # Every honest update is mostly noise, of norm about clip * sqrt(1 + noise^2 * values):
            # the bound on update norms starts there, not at the model's own norm.
            clip, noise_multiplier = self.privacy.clip, self.privacy.noise_multiplier
            self.norm_guard.floor = clip * math.sqrt(1 + noise_multiplier**2 * self.num_values)
        self.max_delta_bytes = self.uplink.max_payload_bytes(self.tensor_specs)
        self.store.status.record_archive(
            self.settings.archive_url,
            self.settings.hot_window,
            self.settings.checkpoint_every,
            self.settings.redis_budget_mb,
        )
        if self.settings.archive_url is None:
            log.warning(
                kv(
                    "no_archive",
                    job=self.settings.job,
                    detail="--archive none: Redis keeps every version and update of this job",
                )
            )
        self.store.status.set(status="running")

    def _check_same_privacy(self, recorded: dict[str, Any]) -> None:
        """A job's epsilon holds only for the noise it was trained with: a coordinator restarted with
        other privacy settings would void it, so it does not start."""
        names = ("dp", "dp_clip", "dp_noise", "dp_delta", "dp_population")
        before = {name: recorded.get(name) for name in names if recorded.get(name) is not None}
        now = {name: self.config.get(name) for name in names if self.config.get(name) is not None}
        if before != now:
            raise StoreError(
                f"job {self.settings.job!r} was trained with privacy settings {before or 'dp off'}; "
                f"a coordinator with {now or 'dp off'} would void the epsilon it reports: "
                "start it with the same --dp settings, or use another --job name"
            )

    def _keep_description(self) -> None:
        """Put the job's description back if someone rewrote it: workers check every task against it."""
        if self.store.status.load_description_text() != self.description.to_json().encode():
            log.warning(kv("description_restored", job=self.settings.job, reason="it was changed in Redis"))
            self.store.status.save_description(self.description)

    def _load_head(self) -> None:
        """(Re)load the head version, its optimizer state and the open tasks from Redis.

        Called at every (re)connect: a commit whose reply was lost in a Redis
        outage may have moved the head after all. With replicas required, first wait until they
        hold all the master holds: a redelivered update is acknowledged as applied on the strength
        of the ledger read here, which must survive the master.
        """
        self.store.versions.await_replicas()
        head = self.store.versions.head()
        if head is None:
            raise StoreError(f"job {self.settings.job!r} was deleted from Redis while its coordinator ran")
        self.head = head
        self.weights = self.store.versions.load_weights(self.head)
        self.head_digest = self.store.versions.digest_of(self.head)
        self.model_norm = l2_norm(self.weights)
        self.optimizer_state = self.store.versions.load_optimizer_state(self.head)
        self.abandoned = frozenset(self.store.versions.abandoned())
        self._reload_open_tasks()
        self.identities.forget()
        self._head_checked = self._bindings_checked = time.monotonic()
        self._partitions_leased = 0.0
        metrics.HEAD_VERSION.labels(self.settings.job).set(self.head)

    def _reload_open_tasks(self) -> None:
        """Mirror the ledger again. Reserved ids this coordinator did not hand out are closed; a
        reserved entry it did hand out keeps its real issue time; one it knows nothing of is a
        predecessor's, which may or may not have gone out: accepted, not counted in flight."""
        unpublished_ids, perhaps = set(self._drop_reservations()), self.perhaps_unpublished
        ours = {task_id: task for task_id, task in self.open_tasks.items() if task_id not in perhaps}
        self.open_tasks, self.perhaps_unpublished = {}, set()
        for task_id, task in self.store.ledger.open_tasks().items():
            if task_id in unpublished_ids:
                continue
            if task.reserved and task_id in ours:
                task = ours[task_id]
            elif task.reserved:
                self.perhaps_unpublished.add(task_id)
            self.open_tasks[task_id] = task

    def _drop_reservations(self) -> list[str]:
        """Close (and return) the reserved ids this coordinator never handed out: nothing can answer them."""
        unpublished = self.reservations.abandon()
        self.store.ledger.close(unpublished)
        return unpublished

    def _evaluate(self, weights: codec.Weights) -> dict[str, float]:
        return self.task.evaluate(load_weights_into(self.model, weights))

    # -- the loop ---------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Serve until a stop condition holds; reconnects to RabbitMQ/Redis after connection loss."""
        self.archiving = archiving = self._start_archiving()
        try:
            self.transport.run(
                self._serve,
                name=f"fedq-coordinator-{self.settings.job}",
                should_stop=lambda: self.finished_reason is not None or self.stop_requested,
                on_connection_lost=self._on_connection_lost,
                also_transient=TRANSIENT_REDIS_ERRORS,
            )
        except TamperedVersionError as error:
            # The head names weights that are not what was committed: nothing can be built on
            # it. Stop and say how to repair it (the message names the rollback command).
            self.store.status.set(status="failed", reason="tampered_head", detail=str(error))
            log.error(kv("head_tampered", detail=str(error)))
            raise
        finally:
            self.read_ahead.close()
            if archiving is not None:
                archiving.stop()  # after one last pass: a finished job's history reaches the archive
        if self.stop_requested and self.finished_reason is None:
            # Not finished: buffered updates return to the queue, tasks stay in flight,
            # and a restarted coordinator continues from the head.
            self._drop_reservations()
            self.store.status.set(status="stopped", reason="signal", head=self.head)
            log.info(kv("stopped", head=self.head))
        return self.summary()

    def _start_archiving(self) -> ArchiveThread | None:
        if self.archive is None:
            return None
        model_bytes = sum(array.nbytes for array in self.weights.values())
        thread = ArchiveThread(
            ModelStore(self.store.redis, self.settings.job),
            self.archive,
            self.settings.hot_window,
            self.settings.checkpoint_every,
            self.settings.archive_seconds,
            self.settings.redis_budget_mb * 2**20,
            reserve_bytes=(self.settings.concurrency + 2) * model_bytes,
        )
        if thread.reserve_too_large:
            log.warning(
                kv(
                    "redis_budget_small",
                    job=self.settings.job,
                    budget_mb=self.settings.redis_budget_mb,
                    in_flight_mb=round((self.settings.concurrency + 2) * model_bytes / 2**20),
                    detail="the updates of the tasks in flight alone may exceed half the budget: "
                    "raise --redis-budget-mb or lower --concurrency",
                )
            )
        thread.start()
        log.info(
            kv(
                "archiving",
                job=self.settings.job,
                archive=self.archive.url,
                hot_versions=self.settings.hot_window,
                checkpoint_every=self.settings.checkpoint_every,
            )
        )
        return thread

    def request_stop(self) -> None:
        """Stop after the current message (signal handlers call this)."""
        self.stop_requested = True

    def _on_connection_lost(self) -> None:
        # Deliveries of the lost channel come back from the broker; forget them.
        self.buffer.clear()
        self.read_ahead.forget()
        self._channel = None

    @property
    def _serving(self) -> Channel:
        """The channel of the session ``_serve`` runs (what handling a message or dispatching uses)."""
        assert self._channel is not None, "no session is being served"
        return self._channel

    def _serve(self, channel: Channel) -> None:
        self._channel = channel
        channel.declare(self.topology)
        self._load_head()
        if self.settings.max_versions is not None and self.head >= self.settings.max_versions:
            # A coordinator killed between its last commit and finishing left tasks open, and
            # their updates would make one version more: finish before taking any.
            self._finish("max_versions")
        self._top_up()
        self.read_ahead.forget()
        # Room for a full buffer plus the updates arriving while it fills.
        prefetch = 2 * max(self.aggregator.buffer_size, self.settings.concurrency) + 8
        deliveries = channel.consume(
            self.topology.updates, prefetch=prefetch, inactivity_timeout=self.settings.idle_seconds
        )
        # Deliveries taken before their turn, their deltas being read (see readahead.py).
        ahead: deque[Delivery] = deque()
        while self.finished_reason is None and not self.stop_requested:
            # None: a quiet idle_seconds; ENDED: the broker cancelled the consumer.
            delivery = ahead.popleft() if ahead else next(deliveries, ENDED)
            if delivery is ENDED:
                break
            if delivery is not None:
                while len(ahead) < READ_AHEAD and channel.waiting():
                    following = next(deliveries, None)
                    if following is None:
                        break
                    ahead.append(following)
                    self.read_ahead.start(following, self._worth_reading)
                self._on_update(delivery)
            else:
                self.store.ledger.open(self.reservations.settle(self.open_tasks))  # (quiet: time to spare)
            self._maintain()
        channel.cancel()

    def _worth_reading(self, task_id: str) -> bool:
        """Whether an update of ``task_id`` could be buffered: its task is open and has no update buffered."""
        return task_id in self.open_tasks and not self._is_duplicate(task_id)  # (no Redis for an open task)

    def _maintain(self) -> None:
        """Between deliveries: notice a rollback, expire lost tasks, check the clock, keep tasks in flight."""
        if time.monotonic() - self._bindings_checked > STRAY_BINDINGS_CHECK_SECONDS:
            self._bindings_checked = time.monotonic()
            self._serving.remove_stray_bindings(self.topology)
        if time.monotonic() - self._partitions_leased > PARTITION_LEASE_SECONDS:
            self._partitions_leased = time.monotonic()
            self._lease_partitions()
        if time.monotonic() - self._head_checked > self.settings.head_check_seconds:
            self._head_checked = time.monotonic()
            self._keep_description()
            stored_head = self.store.versions.head()
            if stored_head is None:
                raise StoreError(f"job {self.settings.job!r} was deleted from Redis while its coordinator ran")
            if stored_head != self.head and not self.buffer:
                log.info(kv("head_changed_elsewhere", old=self.head, new=stored_head))
                self._load_head()
        now = time.time()
        buffered = {pending.update.task_id for pending in self.buffer}
        expired = [
            task_id
            for task_id, task in self.open_tasks.items()
            if now - task.issued_at > self.settings.task_lease_seconds and task_id not in buffered
        ]
        if expired:
            log.warning(kv("tasks_expired", count=len(expired), lease_s=self.settings.task_lease_seconds))
            self._forget(expired)
        refused = [task_id for task_id in self._serving.refused() if task_id in self.open_tasks]
        if refused:
            log.warning(kv("tasks_refused_by_broker", count=len(refused), detail="replacements go out"))
            self._forget(refused)
        self._check_round_deadline()
        if self.settings.max_seconds is not None and time.monotonic() - self.started > self.settings.max_seconds:
            self._finish("max_seconds")
        self._top_up()

    def _lease_partitions(self) -> None:
        plan = plan_leases(self.store.partitions.table(), self.store.workers.live(), self.task.num_partitions)
        for worker in plan.releases:
            self.store.partitions.release(worker)
            log.info(kv("partition_released", worker=worker))
        for worker, partition in plan.leases.items():
            self.store.partitions.lease(worker, partition)
            if worker in plan.shared:
                log.warning(
                    kv(
                        "partition_shared",
                        worker=worker,
                        partition=partition,
                        partitions=self.task.num_partitions,
                        detail="more workers than the task has partitions: this one shares its data",
                    )
                )
            elif worker in plan.moved:
                log.info(
                    kv(
                        "partition_moved",
                        worker=worker,
                        partition=partition,
                        previous=plan.moved[worker],
                        detail="another worker named the previous partition with --partition",
                    )
                )
            else:
                log.info(kv("partition_leased", worker=worker, partition=partition))

    # -- updates ----------------------------------------------------------

    def _on_update(self, delivery: Delivery) -> None:
        expected = Expectations(
            job=self.settings.job,
            head=self.head,
            max_staleness=self.settings.version_bound,
            tensor_specs=self.tensor_specs,
            abandoned=self.abandoned,
            max_delta_bytes=self.max_delta_bytes,
            max_delta_norm=self.norm_guard.bound(self.model_norm),
            worker_norm_bounds=self.norm_guard.worker_bounds(self.model_norm),
            require_identity=self.settings.require_identity,
            expected_staleness=self.fleet.expectations(),
            staleness_tolerance=self.settings.staleness_tolerance if self.settings.adaptive else None,
            encoding=self.uplink.spec,
        )
        try:
            validated = validate_update(
                delivery.body,
                expected,
                self.store,
                self._is_duplicate,
                self._issued_version,
                delivery.user_id,
                self.read_ahead.result_for(delivery),
                self.identities,
            )
        except Rejected as rejection:
            if rejection.duplicate:
                self._skip_duplicate(delivery, rejection)
                return
            task = None if rejection.task_id is None else self.open_tasks.get(rejection.task_id)
            if rejection.worker_id is not None and task is not None:
                self.fleet.arrived(rejection.worker_id, task.issued_at)  # how fast it is, even when refused
            self._dead_letter(delivery, rejection)
            return
        except TRANSIENT_REDIS_ERRORS:
            raise  # Redis is away: reconnect, and this message comes back
        except Exception as error:  # noqa: BLE001 - validate_update wraps its own; this is the last guard
            log.exception(kv("update_unusable", error=repr(error)))
            self._dead_letter(delivery, Rejected(MessageError("unusable", f"{type(error).__name__}: {error}"), None))
            return
        # Its task stays open (in Redis too) until the version is committed: a crash
        # before that redelivers the update, which must still find its task.
        if isinstance(validated, ValidatedRefusal):
            self._on_refusal(delivery, validated.refusal)
            return
        validated = self._measured(validated)
        refusal = self._round_or_age_refusal(validated)
        if refusal is not None:
            self._dead_letter(delivery, Rejected(refusal, validated.update.task_id, worker_id=validated.worker_id))
            return
        self.buffer.append(Pending(delivery, validated))
        self.perhaps_unpublished.discard(validated.update.task_id)  # it was published after all
        metrics.BUFFER_FILL.labels(self.settings.job).set(len(self.buffer))
        crash_point("buffered")
        if self._buffer_ready():
            self._commit()
        self._top_up()

    def _measured(self, validated: ValidatedUpdate) -> ValidatedUpdate:
        """Record the worker's speed from this update, and give the update its worker's data share."""
        update = validated.update
        share = self.fleet.data_share(validated.worker_id, update.num_examples)
        interval = self.fleet.update_interval(validated.worker_id)
        self.fleet.arrived(
            validated.worker_id,
            self.open_tasks[update.task_id].issued_at,
            update.num_examples,
            steps=update.local_steps,
            train_seconds=validated.train_seconds,
            batch_size=self.settings.batch_size,
        )
        return replace(validated, update=replace(update, data_share=share, update_interval=interval))

    def _round_or_age_refusal(self, validated: ValidatedUpdate) -> MessageError | None:
        """Why a valid update still may not be buffered: its worker has one in this synchronous
        round already (workers hand extra tasks back, so it is hostile or buggy), or it is older
        than --max-age-seconds."""
        worker = validated.worker_id
        if self.synchronous and any(pending.validated.worker_id == worker for pending in self.buffer):
            return MessageError("repeated_in_round", f"worker {worker} has an update in round {self.head} already")
        age = time.time() - self.open_tasks[validated.update.task_id].issued_at
        if self.settings.max_age_seconds is not None and age > self.settings.max_age_seconds:
            return MessageError(
                "too_old",
                f"the update arrived {age:.0f} s after its task was issued; the bound is "
                f"{self.settings.max_age_seconds:g} s",
            )
        return None

    def _on_refusal(self, delivery: Delivery, refusal: TaskRefusal) -> None:
        """A worker cannot train an issued task: close it now (a replacement goes out) rather than
        at the end of its lease. A tampered version is restored from this coordinator's verified copy."""
        self._serving.ack(delivery.tag)
        self.store.counters.add("refused", refusal.reason)
        # A worker handing back a second task of a round is the round working as meant.
        say = log.info if refusal.reason == "trained_in_round" else log.warning
        say(
            kv(
                "task_refused",
                task=refusal.task_id,
                worker=refusal.worker_id,
                reason=refusal.reason,
                detail=refusal.detail,
            )
        )
        version = self.open_tasks[refusal.task_id].version
        self._forget([refusal.task_id])
        if refusal.reason == "tampered_version" and self.store.versions.restore(version):
            log.warning(kv("version_restored", version=version, reason="its stored weights were tampered with"))
        if self._buffer_ready():
            self._commit()
        self._top_up()

    def _is_duplicate(self, task_id: str) -> bool:
        if any(pending.update.task_id == task_id for pending in self.buffer):
            return True
        if task_id in self.open_tasks:
            # Not applied: the commit script closes a task in the same transaction that records
            # it applied, and the mirror follows every commit and is reloaded at every reconnect.
            # This spares a Redis round trip for nearly every update.
            return False
        return self.store.ledger.applied_version(task_id) is not None

    def _issued_version(self, task_id: str) -> int | None:
        task = self.open_tasks.get(task_id)
        return None if task is None else task.version

    @property
    def in_flight(self) -> int:
        """Tasks out with workers: open, and not answered by a buffered update (nor perhaps never published)."""
        return len(self.open_tasks) - len(self.perhaps_unpublished) - len(self.buffer)

    def _buffer_ready(self) -> bool:
        return self.policy.buffer_ready(in_flight=self.in_flight, buffered=len(self.buffer))

    def _skip_duplicate(self, delivery: Delivery, duplicate: Rejected) -> None:
        self._serving.ack(delivery.tag)
        self.store.counters.add("skipped", "duplicate")
        metrics.UPDATES_SKIPPED.labels(self.settings.job, "duplicate").inc()
        log.info(kv("update_skipped", reason="duplicate", task=duplicate.task_id, worker=duplicate.worker_id))

    def _dead_letter(self, delivery: Delivery, rejection: Rejected) -> None:
        if rejection.reason == "unusable" and rejection.__cause__ is not None:
            log.error(kv("update_unusable", task=rejection.task_id), exc_info=rejection.__cause__)
        self._serving.publish(
            self.topology.dead,
            delivery.body,
            message_id=delivery.message_id or uuid.uuid4().hex,
            headers=dead_letter_headers(delivery.headers, rejection.reason, rejection.detail, origin="updates"),
        )
        self._serving.ack(delivery.tag)
        self.store.counters.add("rejected", rejection.reason)
        if rejection.worker_id is not None and rejection.task_id in self.open_tasks:
            # Only for an update answering an open task: anything else may name any worker id.
            self.fleet.rejected(rejection.worker_id, rejection.reason)
        metrics.UPDATES_REJECTED.labels(self.settings.job, rejection.reason).inc()
        log.warning(kv("update_rejected", reason=rejection.reason, detail=rejection.detail, task=rejection.task_id))
        if rejection.task_id is not None:
            # The task is over: its replacement is dispatched by the next top-up.
            self._forget([rejection.task_id])
            if self._buffer_ready():
                self._commit()

    # -- the server step --------------------------------------------------

    def _commit(self) -> None:
        pending, self.buffer = self.buffer, []
        updates = [item.update for item in pending]
        aggregation_started = time.perf_counter()
        # Central DP: a fresh seed per step, recorded with the version (replay draws the same noise;
        # see common/privacy.py for who may then read it).
        dp_seed = secrets.randbits(63) if self.privacy.mode == "central" else None
        noise = CentralNoise.of(self.config, dp_seed)
        try:
            new_weights, new_state, weights = server_step(
                self.aggregator,
                self.optimizer,
                self.weights,
                self.optimizer_state,
                updates,
                self.store.versions.load_weights,
                noise,
            )
        except (UnknownVersionError, TamperedVersionError) as error:
            # FedAsync mixes against the update's base version: pruned or tampered with, it cannot be used.
            self._refuse_step(pending, "base_unavailable", str(error))
            return
        aggregation_seconds = time.perf_counter() - aggregation_started
        if not all(np.isfinite(array).all() for array in new_weights.values()):
            # Every update passed its own checks, yet their step is not a model: refuse the
            # step and its updates, keep the head, and go on.
            self._refuse_step(
                pending, "non_finite_step", f"the server step with this update is not finite at head {self.head}"
            )
            return
        step_norm, step_bound = l2_distance(new_weights, self.weights), self.norm_guard.step_bound(self.model_norm)
        if step_bound is not None and noise is not None:
            # The step carries central noise of norm about deviation * sqrt(values): a jump of that
            # size is the privacy working, not an implausible model (3x: far beyond chance).
            step_bound += 3 * noise.standard_deviation(updates, weights) * math.sqrt(self.num_values)
        if step_bound is not None and step_norm > step_bound:
            # Finite, yet a jump no step of this job has come near: not a model to commit.
            self._refuse_step(
                pending,
                "implausible_step",
                f"the server step's L2 norm {step_norm:.4g} exceeds {step_bound:.4g} at head {self.head}",
            )
            return
        version = self.head + 1
        evaluate = self.settings.eval_every > 0 and version % self.settings.eval_every == 0
        scores = self._evaluate(new_weights) if evaluate else {}
        applied = [item.validated.applied(weight) for item, weight in zip(pending, weights)]
        privacy_spent = self._privacy_spent(updates)
        ledger_changes = self.reservations.changes_for_commit(version, time.time(), self.open_tasks)
        commit_started = time.perf_counter()
        try:
            self.head = self.store.versions.commit(
                self.head,
                new_weights,
                applied,
                optimizer_state=new_state,
                update_blobs={
                    item.validated.blob_key: item.validated.inline_payload
                    for item in pending
                    if item.validated.inline_payload
                },
                metrics=scores,
                config=self.config,
                config_digest=config_digest(self.config),
                aggregation_seconds=aggregation_seconds,
                dp_seed=dp_seed,
                keep_arrays=True,  # self.weights becomes this very copy, read-only
                senders=[(identity_of(item.validated.worker_id), item.validated.sender) for item in pending],
                require_identity=self.settings.require_identity,
                open_tasks=ledger_changes.opened,
                close_tasks=ledger_changes.closed,
                **privacy_spent,
            )
        except IdentityRefusedError as error:
            self._drop_reservations()  # reserved for a version that is not
            self._refuse_senders(pending, error.refused)
            return
        except HeadMovedError as error:
            # Someone else moved the head (a rollback): start over from it. The
            # updates go back to the queue and are judged again against the new head.
            log.warning(kv("head_moved", error=str(error)))
            for item in pending:
                self._serving.nack(item.delivery.tag, requeue=True)
            self._load_head()
            return
        for item in pending:  # the commit script closed them in Redis
            self.open_tasks.pop(item.update.task_id, None)
        self.reservations.committed(ledger_changes)
        if self.privacy.mode == "central":
            self.dp_steps += 1
        previous_weights = self.weights
        self.weights, self.optimizer_state = self.store.versions.load_weights(self.head), new_state
        if self.settings.publishes_diffs:
            self._publish_diff(previous_weights)
        self.head_digest = self.store.versions.digest_of(self.head)
        self.model_norm = l2_norm(self.weights)
        self.norm_guard.accepted([(item.validated.worker_id, item.validated.norm) for item in pending])
        crash_point("committed")
        for item in pending:
            self._serving.ack(item.delivery.tag)
        self._observe_commit(updates, scores, aggregation_seconds, time.perf_counter() - commit_started)
        self.fleet.committed(applied)
        stalenesses = [update.staleness for update in updates]
        log.info(
            kv(
                "version_committed",
                version=self.head,
                updates=len(updates),
                mean_staleness=sum(stalenesses) / len(stalenesses),
                max_staleness=max(stalenesses),
                **{key: value for key, value in scores.items()},
            )
        )
        self._check_stop(scores)
        self._check_privacy_budget(privacy_spent)

    def _publish_diff(self, previous_weights: codec.Weights) -> None:
        """The diff from the previous head to this one, for workers that hold the previous: never
        a reason to fail the commit that is already done (a worker without it reads in full)."""
        try:
            self.store.versions.publish_diff(previous_weights, self.weights, self.head)
        except (redis.RedisError, DiffError) as error:
            log.warning(kv("diff_not_published", version=self.head, error=str(error)))

    def _privacy_spent(self, updates: list[BufferedUpdate]) -> dict[str, Any]:
        """The record fields for the privacy spent once the step of ``updates`` is committed:
        epsilon for the job's delta, and over how many noised steps (central) or updates of the
        worker that sent most (local). {} without DP."""
        privacy = self.privacy
        if privacy.mode == "central":
            steps = self.dp_steps + 1
        elif privacy.mode == "local":
            # Noise is spent when a worker sends, applied or not: what the coordinator received of each.
            received = {
                worker: record.applied + sum(record.rejected.values()) for worker, record in self.fleet.workers.items()
            }
            for update in updates:
                received[update.worker_id] = received.get(update.worker_id, 0) + 1
            steps = max(received.values(), default=0)
        else:
            return {}
        return {"epsilon": privacy.epsilon_after(steps, self.aggregator.buffer_size), "dp_steps": steps}

    def _check_privacy_budget(self, spent: dict[str, Any]) -> None:
        """Stop (or warn, once) when one more step would spend more than --dp-epsilon."""
        if spent:
            metrics.PRIVACY_EPSILON.labels(self.settings.job).set(spent["epsilon"])
        budget = self.privacy.epsilon_budget
        if budget is None or not spent:
            return
        privacy = self.privacy
        next_epsilon = privacy.epsilon_after(spent["dp_steps"] + 1, self.aggregator.buffer_size)
        if next_epsilon <= budget:
            return
        if privacy.on_budget == "stop":
            log.warning(
                kv("privacy_budget_spent", epsilon=round(spent["epsilon"], 4), budget=budget, delta=privacy.delta)
            )
            self._finish("privacy_budget")
        elif not self._budget_warned:
            self._budget_warned = True
            log.warning(
                kv(
                    "privacy_budget_exceeded",
                    epsilon=round(spent["epsilon"], 4),
                    next_epsilon=round(next_epsilon, 4),
                    budget=budget,
                    detail="--dp-on-budget warn: the run goes on",
                )
            )

    def _refuse_senders(self, pending: list[Pending], refused: dict[int, str]) -> None:
        """The commit script found updates whose senders the job no longer accepts (revoked since
        they were validated, most likely): dead-letter them as validation would have, their tasks
        left open for another answer; the others wait in the buffer again."""
        self.identities.forget()
        self.buffer = [item for index, item in enumerate(pending) if index not in refused]
        for index, reason in sorted(refused.items()):
            item = pending[index]
            worker = item.validated.worker_id
            detail = f"worker {worker[:64]!r} is no longer accepted from {item.validated.sender!r} (refused at commit)"
            self._dead_letter(item.delivery, Rejected(MessageError(reason, detail), None, worker_id=worker))
        if self._buffer_ready():
            self._commit()

    def _refuse_step(self, pending: list[Pending], reason: str, detail: str) -> None:
        """The buffered updates cannot make a version: dead-letter them, keep the head, go on."""
        log.error(kv("step_rejected", reason=reason, head=self.head, updates=len(pending), detail=detail))
        for item in pending:
            self._dead_letter(
                item.delivery,
                Rejected(MessageError(reason, detail), item.update.task_id, worker_id=item.update.worker_id),
            )

    def _observe_commit(
        self, updates: list[BufferedUpdate], scores: dict[str, float], aggregation_seconds: float, commit_seconds: float
    ) -> None:
        job = self.settings.job
        if scores:
            self.last_metrics = scores
            for name, value in scores.items():
                metrics.MODEL_SCORE.labels(job, name).set(value)
        metrics.UPDATES_APPLIED.labels(job).inc(len(updates))
        metrics.VERSIONS_COMMITTED.labels(job).inc()
        for update in updates:
            metrics.STALENESS.labels(job).observe(update.staleness)
        metrics.AGGREGATION_SECONDS.labels(job).observe(aggregation_seconds)
        metrics.COMMIT_SECONDS.labels(job).observe(commit_seconds)
        metrics.HEAD_VERSION.labels(job).set(self.head)
        metrics.BUFFER_FILL.labels(job).set(len(self.buffer))

    def _check_stop(self, scores: dict[str, float]) -> None:
        score = scores.get(self.task.score_metric)
        if self.settings.target is not None and score is not None and score >= self.settings.target:
            self._finish("target_reached")
        elif self.settings.max_versions is not None and self.head >= self.settings.max_versions:
            self._finish("max_versions")
        elif score is not None and self.plateau.stalled(score):
            if self.settings.target is not None:
                log.warning(
                    kv(
                        "target_unreachable",
                        target=self.settings.target,
                        best=self.plateau.best,
                        evaluations=self.plateau.evaluations,
                        detail=f"no improvement of {self.task.score_metric} by "
                        f"{self.settings.plateau_epsilon} in {self.plateau.patience} evaluations",
                    )
                )
            self._finish("plateau")

    def _finish(self, reason: str) -> None:
        if self.finished_reason is not None:
            return
        self.finished_reason = reason
        # Outstanding tasks would only train a finished model: withdraw them.
        if self._channel is not None:
            self._channel.purge(self.topology.tasks)
        self._forget(list(self.open_tasks))
        self._drop_reservations()
        self.store.status.set(status="finished", reason=reason, head=self.head)
        log.info(kv("finished", reason=reason, head=self.head, **self.last_metrics))

    # -- dispatch ---------------------------------------------------------

    def _top_up(self) -> None:
        if self.finished_reason is not None or self._channel is None:
            return
        held = self.archiving is not None and self.archiving.holding_dispatch()
        if held != self._dispatch_held:
            self._dispatch_held = held
            log.warning(
                kv(
                    "dispatch_held",
                    job=self.settings.job,
                    budget_mb=self.settings.redis_budget_mb,
                    detail="the job's Redis memory is near its budget; new tasks wait for the archiver",
                )
                if held
                else kv("dispatch_resumed", job=self.settings.job)
            )
        if held:
            return
        count = self.policy.tasks_to_dispatch(in_flight=self.in_flight, buffered=len(self.buffer))
        if count and self.synchronous:
            self._round_started, self._round_short_warned = time.monotonic(), False
        if count:
            self._dispatch(count)

    def _dispatch(self, count: int) -> None:
        """Hand out ``count`` new tasks at the head: recorded open in Redis, then published.

        Recorded before the broker has them, so that an update answering one is accepted even if
        this coordinator dies right after publishing: ids reserved by the last commit are recorded
        already (reservations.py), the others in one round trip. A crash before the broker has
        one leaves an open task nobody can answer; it counts as in flight until its lease ends.
        """
        seconds = self._task_seconds()
        reserved = self.reservations.take(self.head, count, time.time())
        task_ids = reserved + [uuid.uuid4().hex for _ in range(count - len(reserved))]
        tasks = [self._new_task(seconds, task_id) for task_id in task_ids]
        opened = {task.task_id: OpenTask(version=task.model_version, issued_at=task.issued_at) for task in tasks}
        self.store.ledger.open({task_id: opened[task_id] for task_id in task_ids[len(reserved) :]})  # ({}: none)
        self.open_tasks.update(opened)
        for task in tasks:
            # Not waiting for the broker's confirm saves a round trip per task (the largest
            # share of a 10k-parameter step); a task it refuses is replaced in _maintain.
            self._serving.publish_unconfirmed(self.topology.tasks, task.to_bytes(), message_id=task.task_id)
            crash_point("dispatched")
        metrics.TASKS_DISPATCHED.labels(self.settings.job).inc(count)
        metrics.TASKS_IN_FLIGHT.labels(self.settings.job).set(len(self.open_tasks))

    def _new_task(self, seconds: float, task_id: str) -> RoundTask:
        task = RoundTask(
            job=self.settings.job,
            task_id=task_id,
            model_version=self.head,
            issued_at=time.time(),
            train=TrainSettings(
                epochs=self.settings.local_epochs,
                batch_size=self.settings.batch_size,
                learning_rate=self.settings.learning_rate,
                seed=int(task_id[:8], 16),
                seconds=seconds,
            ),
            model_digest=self.head_digest,
            synchronous=self.synchronous,
            compression=self.uplink.spec,
            error_feedback=self.uplink.lossy and self.settings.error_feedback,
            dp_clip=self.privacy.clip if self.privacy.mode == "local" else 0.0,
            dp_noise=self.privacy.noise_multiplier if self.privacy.mode == "local" else 0.0,
        )
        return replace(task, signature=self.signing_key.sign(task.signed_document()))

    def _task_seconds(self) -> float:
        if self.settings.task_seconds == AUTO:
            return round(self.fleet.task_seconds(self.settings.local_epochs), 3)
        return float(self.settings.task_seconds)

    def _check_round_deadline(self) -> None:
        """Synchronous: past --round-seconds, close the round if --min-updates came back (its other
        tasks are withdrawn, and their updates will be unknown_task); else say it is short."""
        deadline = self.settings.round_seconds
        if not (self.synchronous and deadline and self._round_started and self.buffer):
            return
        if time.monotonic() - self._round_started <= deadline:
            return
        needed = self.settings.min_updates or self.settings.concurrency
        if len(self.buffer) < needed:
            if not self._round_short_warned:
                self._round_short_warned = True
                log.warning(
                    kv(
                        "round_short",
                        round=self.head,
                        updates=len(self.buffer),
                        needed=needed,
                        deadline_s=deadline,
                        detail="the round stays open until enough updates arrive",
                    )
                )
            return
        buffered = {pending.update.task_id for pending in self.buffer}
        withdrawn = [task_id for task_id in self.open_tasks if task_id not in buffered]
        log.info(kv("round_closed_at_deadline", round=self.head, updates=len(self.buffer), withdrawn=len(withdrawn)))
        self._serving.purge(self.topology.tasks)  # in a synchronous job, every queued task is this round's
        self._forget(withdrawn)
        self._commit()

    def _forget(self, task_ids: list[str]) -> None:
        """Close tasks: refused, expired or withdrawn; an update answering them is unknown_task from now on."""
        for task_id in task_ids:
            self.open_tasks.pop(task_id, None)
            self.perhaps_unpublished.discard(task_id)
        self.store.ledger.close(task_ids)
        metrics.TASKS_IN_FLIGHT.labels(self.settings.job).set(len(self.open_tasks))

    # -- reporting --------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.settings.job,
            "head": self.head,
            "reason": self.finished_reason,
            "metrics": self.last_metrics,
            "seconds": time.monotonic() - self.started,
            "rejected": self.store.counters.get("rejected"),
            "skipped": self.store.counters.get("skipped"),
            "settings": asdict(self.settings) | {"amqp_url": "***", "redis_url": "***"},
        }
