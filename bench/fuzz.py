"""Hostile-message fuzzer: thousands of malformed, oversized and hostile messages at a running job.

Run from the repository root:

    .venv/bin/python bench/fuzz.py --messages 10000          # ~12 minutes on a shared 2-core machine
    .venv/bin/python bench/fuzz.py --messages 120 --seed 7   # what tests/integration/test_fuzz.py runs

It starts a real coordinator (digits, FedBuff K=2) and two honest workers as subprocesses, waits
until they have committed a few versions, and then sends ``--messages`` messages of the kinds in
``bench/fuzz_messages.py`` while the honest workers keep training: garbage and broken updates on
the update exchange, hostile answers to genuine tasks it takes off the task queue (as any worker
can), and forged tasks on the task exchange. It keeps the update queue's backlog under
``--window`` messages, so that the honest updates and the stolen tasks' replacements are not
stuck behind all of it.

Every message is labelled with the outcome the services must give it. The fuzzer drains the
job's dead-letter queue and reads the coordinator's counters in Redis until every message is
accounted for (a dead letter with its message id, a skipped duplicate or an accepted refusal),
then waits for two more versions and prints: sent by kind with the outcomes observed, dead
letters by reason, duplicates skipped, the workers' refusals of forged tasks, hostile updates
applied (any applied update whose task id or worker id is the fuzzer's: must be 0), honest
updates applied, whether every service is still alive, the coordinator's RSS before / peak /
after, the versions committed and the longest gap between two while fuzzing, and the final
accuracy.

Exit status: 0 when all is well; 1 when a hostile update was applied or a service died; 2 when a
message was not accounted for or got another outcome than expected.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

# Run as a file (python bench/fuzz.py): make ``bench.`` importable from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
import pika.exceptions  # noqa: E402

from bench import fuzz_messages as fm  # noqa: E402
from fedq.broker.connection import connect  # noqa: E402
from fedq.broker.topology import ROUTING_KEY, Topology  # noqa: E402
from fedq.broker.transport import REASON_HEADER  # noqa: E402
from fedq.common.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL  # noqa: E402
from fedq.common.store import ModelStore  # noqa: E402
from fedq.common.store.tiers import whole_history  # noqa: E402
from fedq.common.tasks import load_task  # noqa: E402
from fedq.common.wire import codec  # noqa: E402
from fedq.common.wire.limits import max_update_message_bytes  # noqa: E402
from fedq.common.wire.messages import MessageError, RoundTask, parse_task  # noqa: E402

PARAMS = {"num_partitions": 2}
# Two digits workers that learn within a few dozen versions (as tests/integration/test_hostile_participant.py).
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
    "--algorithm",
    "fedbuff",
    "--buffer-size",
    "2",
]
HELD_AT_ONCE = 2  # genuine tasks held back at a time, to be answered once they are too stale


# -- the services under attack ---------------------------------------------------------------


class Services:
    """A coordinator and two honest workers of one job, as subprocesses with their logs."""

    def __init__(
        self,
        job: str,
        amqp_url: str,
        redis_url: str,
        log_dir: Path,
        *,
        concurrency: int,
        max_staleness: int,
        workers: int = 2,
    ):
        self.log_dir = log_dir
        flags = ["--job", job, "--amqp-url", amqp_url, "--redis-url", redis_url]
        self.processes: dict[str, subprocess.Popen] = {}
        self._start(
            "coordinator",
            "coordinator",
            *flags,
            *TRAINING,
            "--concurrency",
            str(concurrency),
            "--max-staleness",
            str(max_staleness),
        )
        for index in range(workers):
            self._start(
                f"worker-{index}", "worker", *flags, "--worker-id", fm.HONEST_WORKERS[index], "--partition", str(index)
            )

    def _start(self, name: str, *args: str) -> None:
        with open(self.log_dir / f"{name}.log", "w") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "fedq.common.cli", *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def coordinator(self) -> subprocess.Popen:
        return self.processes["coordinator"]

    def alive(self) -> dict[str, bool]:
        return {name: process.poll() is None for name, process in self.processes.items()}

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop(self, grace: float = 60.0) -> dict[str, int | None]:
        """SIGTERM everything (workers first), SIGKILL what is left after ``grace``; the exit codes."""
        for name in sorted(self.processes, reverse=True):  # worker-1, worker-0, coordinator
            if self.processes[name].poll() is None:
                self.processes[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(process.poll() is None for process in self.processes.values()):
            time.sleep(0.2)
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        return {name: process.returncode for name, process in self.processes.items()}


def rss_mib(pid: int) -> float | None:
    """A process's resident set size, from /proc/<pid>/status (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- the broker side: publishing, taking tasks, draining the dead letters -----------------------


class Broker:
    """The fuzzer's own connection: confirmed publishing, taking tasks off the queue, queue depths.

    A message the broker refuses by closing the connection (it does for some header values) is
    reported as not delivered, and the connection is opened again.
    """

    def __init__(self, amqp_url: str, job: str):
        self.amqp_url = amqp_url
        self.topology = Topology(job)
        self.connection: pika.BlockingConnection | None = None
        self.channel = None
        self.reconnects = 0
        self._open()

    def _open(self) -> None:
        self.connection = connect(self.amqp_url, name=f"fedq-fuzzer-{self.topology.job}")
        self.channel = self.connection.channel()
        self.topology.declare(self.channel)
        self.channel.confirm_delivery()

    def _reopen(self) -> None:
        self.reconnects += 1
        try:
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        except pika.exceptions.AMQPError:
            pass
        self._open()

    @property
    def frame_max(self) -> int:
        return int(self.connection._impl.params.frame_max)  # what the broker and pika agreed on

    def publish(
        self, exchange: str, body: bytes, message_id: str | bytes | None, headers: dict[str, Any]
    ) -> str | None:
        """Publish with a broker confirm; None when the broker has it, else why it refused it."""
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            timestamp=int(time.time()),
            headers=headers or {},
        )
        try:
            with fm.raw_header_encoding():
                self.channel.basic_publish(exchange, ROUTING_KEY, body, properties=properties, mandatory=True)
            return None
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as error:
            return f"{type(error).__name__}"
        except pika.exceptions.AMQPError as error:
            self._reopen()
            return f"{type(error).__name__}: {error}"[:200]

    def take(self, queue: str) -> tuple[Any, bytes] | None:
        """One message off ``queue`` (auto-acked): (properties, body), or None when it is empty."""
        try:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
        except pika.exceptions.AMQPError:
            self._reopen()
            return None
        return None if method is None else (properties, body)

    def ready(self, queue: str) -> int:
        try:
            return self.channel.queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.AMQPError:
            self._reopen()
            return 0

    def close(self) -> None:
        try:
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass


@dataclass(frozen=True)
class Letter:
    """One message found in the dead-letter queue."""

    message_id: Any
    reason: str
    digest: str
    size: int


def letter_reason(headers: dict[str, Any]) -> str:
    """fedq's reason header, or ``broker:<reason>`` for a message the broker dead-lettered itself
    (delivery limit, ...), whatever reason header its sender put on it."""
    if "x-death" in headers or "x-first-death-reason" in headers:
        reason = headers.get("x-first-death-reason", "?")
        return "broker:" + (reason.decode() if isinstance(reason, bytes) else str(reason))
    reason = headers.get(REASON_HEADER)
    return "(no reason header)" if reason is None else reason.decode() if isinstance(reason, bytes) else str(reason)


class DeadLetterCollector(threading.Thread):
    """Drains the job's dead-letter queue in the background, on a connection of its own."""

    def __init__(self, amqp_url: str, job: str):
        super().__init__(daemon=True, name="dead-letters")
        self.amqp_url = amqp_url
        self.topology = Topology(job)
        self.letters: list[Letter] = []
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                connection = connect(self.amqp_url, name=f"fedq-fuzzer-dead-{self.topology.job}")
            except Exception as error:  # noqa: BLE001 - keep trying until stopped
                self.errors.append(repr(error)[:200])
                time.sleep(1)
                continue
            try:
                channel = connection.channel()
                self.topology.declare(channel)
                for method, properties, body in channel.consume(
                    self.topology.dead, auto_ack=True, inactivity_timeout=0.2
                ):
                    if self.stopping.is_set():
                        break
                    if method is None:
                        continue
                    letter = Letter(
                        properties.message_id,
                        letter_reason(dict(properties.headers or {})),
                        hashlib.sha256(body).hexdigest(),
                        len(body),
                    )
                    with self.lock:
                        self.letters.append(letter)
            except Exception as error:  # noqa: BLE001 - a dead letter pika cannot decode costs the connection
                self.errors.append(repr(error)[:200])
                time.sleep(0.5)
            finally:
                try:
                    connection.close()
                except Exception:  # noqa: BLE001
                    pass

    def drain(self) -> list[Letter]:
        with self.lock:
            letters, self.letters = self.letters, []
        return letters

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


# -- accounting --------------------------------------------------------------------------------


class Ledger:
    """Every message sent, and what became of it."""

    def __init__(self, store: ModelStore):
        self.store = store
        self.sent: list[fm.Message] = []
        self.by_id: dict[Any, fm.Message] = {}
        self.by_digest: dict[str, list[fm.Message]] = collections.defaultdict(list)
        self.observed: dict[int, list[str]] = collections.defaultdict(list)  # index -> dead-letter reasons
        self.other_letters: collections.Counter[str] = collections.Counter()
        self.matched = 0
        self.not_delivered: list[tuple[fm.Message, str]] = []
        self.closed: list[RoundTask] = []  # stolen tasks whose answer came back: replayable
        self.answers: dict[int, RoundTask] = {}  # index -> the stolen task it answers, until its outcome is in
        self.stolen_ids: set[str] = set()
        counters = self.store.counters
        self.skipped_before = counters.get("skipped").get(fm.DUPLICATE, 0)
        self.refused_before = counters.get("refused")

    def record(self, message: fm.Message, task: RoundTask | None = None) -> None:
        self.sent.append(message)
        # A task an honest worker takes is accounted for by the coordinator's letter for its update
        # (the task id) or by the worker's letter for the task itself (the message id we gave it).
        keys = [message.account_id, message.message_id] if message.via == "honest_update" else [message.message_id]
        if isinstance(keys[0], str):
            for key in keys:
                if isinstance(key, str):
                    self.by_id[key] = message
        else:
            self.by_digest[hashlib.sha256(message.body).hexdigest()].append(message)
        if task is not None:
            self.answers[message.index] = task

    def absorb(self, letters: list[Letter]) -> None:
        for letter in letters:
            message = self.by_id.get(letter.message_id) if isinstance(letter.message_id, str) else None
            if message is None and self.by_digest.get(letter.digest):
                message = self.by_digest[letter.digest].pop(0)
            if message is None:
                self.other_letters[letter.reason] += 1
                continue
            if not self.observed[message.index]:
                self.matched += 1
                task = self.answers.pop(message.index, None)
                if task is not None and message.kind != "duplicate_hostile":
                    self.closed.append(task)
            self.observed[message.index].append(letter.reason)

    def counted(self) -> tuple[int, dict[str, int]]:
        """Duplicates skipped and refusals accepted (by reason) since the fuzzer started."""
        counters = self.store.counters
        skipped = counters.get("skipped").get(fm.DUPLICATE, 0) - self.skipped_before
        refused = {
            reason: count - self.refused_before.get(reason, 0) for reason, count in counters.get("refused").items()
        }
        return skipped, refused

    def outcomes(self) -> dict[int, str]:
        """Each message's outcome: its dead-letter reason, ``duplicate`` or ``refused:<reason>`` (read
        off the counters, in the order sent), or ``(none)``."""
        skipped, refused = self.counted()
        not_delivered = {id(message) for message, _ in self.not_delivered}
        result = {}
        for message in self.sent:
            if id(message) in not_delivered:
                continue
            reasons = self.observed.get(message.index)
            if reasons:
                result[message.index] = (
                    reasons[0]
                    if len(reasons) == 1
                    else f"dead-lettered {len(reasons)} times: " + _counts(collections.Counter(reasons))
                )
            elif message.via == "skipped" and skipped > 0:
                skipped -= 1
                result[message.index] = fm.DUPLICATE
            elif message.via == "refused":
                reason = next(iter(message.expected)).split(":", 1)[1]
                if refused.get(reason, 0) > 0:
                    refused[reason] -= 1
                    result[message.index] = f"refused:{reason}"
                else:
                    result[message.index] = "(none)"
            else:
                result[message.index] = "(none)"
        return result

    def unaccounted(self) -> int:
        return sum(outcome == "(none)" for outcome in self.outcomes().values())


# -- the run -----------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    job: str
    seed: int
    log_dir: str
    messages: int  # planned
    sent: list[fm.Message] = field(default_factory=list)
    outcomes: dict[int, str] = field(default_factory=dict)
    not_delivered: list[tuple[str, str]] = field(default_factory=list)  # (kind/variant, broker's answer)
    not_sent: collections.Counter = field(default_factory=collections.Counter)  # kind -> count (no task to take)
    rejected: dict[str, int] = field(default_factory=dict)  # the coordinator's counters, increase during the run
    skipped: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    worker_refusals: collections.Counter = field(default_factory=collections.Counter)
    other_letters: collections.Counter = field(default_factory=collections.Counter)
    hostile_applied: list[dict] = field(default_factory=list)
    honest_applied: int = 0
    alive: dict[str, bool] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    tracebacks: dict[str, int] = field(default_factory=dict)
    reconnects: dict[str, int] = field(default_factory=dict)
    rss_before: float | None = None
    rss_peak: float | None = None
    rss_after: float | None = None
    head_before: int = 0
    head_after_fuzz: int = 0
    head_final: int = 0
    versions_while_fuzzing: int = 0
    longest_gap: float = 0.0
    longest_gap_between: tuple[int | None, int | None] = (None, None)
    median_gap: float | None = None
    median_gap_before: float | None = None
    fuzz_seconds: float = 0.0
    settle_seconds: float = 0.0
    total_seconds: float = 0.0
    accuracy: float | None = None
    recirculated: int = 0
    stolen: int = 0
    collector_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[tuple[fm.Message, str]]:
        return [
            (message, self.outcomes[message.index])
            for message in self.sent
            if message.index in self.outcomes and self.outcomes[message.index] not in message.expected
        ]

    @property
    def unaccounted(self) -> int:
        return sum(outcome == "(none)" for outcome in self.outcomes.values())

    @property
    def all_alive(self) -> bool:
        return bool(self.alive) and all(self.alive.values())

    @property
    def exit_code(self) -> int:
        if self.hostile_applied or not self.all_alive:
            return 1
        if self.unaccounted or self.mismatches:
            return 2
        return 0


class Progress:
    def __init__(self, out: TextIO | None, every: float = 2.0):
        self.out = out
        self.every = every
        self.last = 0.0

    def __call__(self, text: str, force: bool = False) -> None:
        if self.out is None or (not force and time.monotonic() - self.last < self.every):
            return
        self.last = time.monotonic()
        print(f"fuzz: {text}", file=self.out, flush=True)


def _wait(condition, timeout: float, what: str, services: Services, progress: Progress, status) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [name for name, alive in services.alive().items() if not alive]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; logs in {services.log_dir}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:.0f} s; logs in {services.log_dir}")
        progress(status())
        time.sleep(0.2)


def run(
    messages: int = 300,
    *,
    seed: int = 0,
    job: str | None = None,
    amqp_url: str = DEFAULT_AMQP_URL,
    redis_url: str = DEFAULT_REDIS_URL,
    log_dir: str | Path | None = None,
    window: int = 200,
    only: set[str] | None = None,
    concurrency: int = 6,
    max_staleness: int = 6,
    warmup_versions: int = 3,
    settle_quiet: float = 60.0,
    timeout: float = 300.0,
    progress: TextIO | None = sys.stderr,
    cleanup: bool = True,
) -> FuzzReport:
    """Start a job, fuzz it with ``messages`` messages, account for every one; the report.

    ``timeout`` bounds each wait for the services (start-up, a task to take, versions after the
    fuzzing); the accounting waits until ``settle_quiet`` seconds pass without news.
    """
    started = time.monotonic()
    job = job or f"fuzz-{uuid.uuid4().hex[:8]}"
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fedq-fuzz-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    say = Progress(progress)
    report = FuzzReport(job=job, seed=seed, log_dir=str(log_dir), messages=messages)
    store = ModelStore.open(redis_url, job)
    services = Services(job, amqp_url, redis_url, log_dir, concurrency=concurrency, max_staleness=max_staleness)
    broker: Broker | None = None
    collector: DeadLetterCollector | None = None
    say(f"job {job}, logs in {log_dir}; waiting for {warmup_versions} versions", force=True)
    try:
        pid = services.coordinator.pid
        _wait(
            lambda: (store.versions.last_committed() or 0) >= warmup_versions,
            timeout,
            f"{warmup_versions} versions",
            services,
            say,
            lambda: f"warming up: head {store.versions.last_committed()}",
        )
        weights = load_task("digits", PARAMS).initial_weights(0)
        max_delta = codec.max_encoded_size(codec.tensor_specs(weights))
        broker = Broker(amqp_url, job)
        ctx = fm.Context(
            job=job,
            store=store,
            weights=weights,
            max_message_bytes=max_update_message_bytes(max_delta),
            max_delta_bytes=max_delta,
            frame_max=broker.frame_max,
        )
        collector = DeadLetterCollector(amqp_url, job)
        collector.start()
        ledger = Ledger(store)
        rejected_before = store.counters.get("rejected")
        report.rss_before = report.rss_peak = rss_mib(pid)
        report.head_before = store.versions.last_committed()
        fuzz_started = time.time()
        _fuzz(
            report,
            ctx,
            ledger,
            broker,
            collector,
            services,
            store,
            seed=seed,
            only=only,
            window=window,
            max_staleness=max_staleness,
            timeout=timeout,
            say=say,
        )
        report.fuzz_seconds = time.time() - fuzz_started
        settle_started = time.monotonic()
        _settle(report, ledger, collector, services, store, quiet=settle_quiet, say=say)
        report.settle_seconds = time.monotonic() - settle_started
        fuzz_ended = time.time()
        report.head_after_fuzz = store.versions.last_committed()
        report.rss_after = rss_mib(pid)
        report.rss_peak = max(filter(None, [report.rss_peak, report.rss_after]), default=None)
        # Training goes on after the attack: two more versions.
        try:
            _wait(
                lambda: store.versions.last_committed() >= report.head_after_fuzz + 2,
                timeout,
                "versions after the fuzzing",
                services,
                say,
                lambda: f"after the fuzzing: head {store.versions.last_committed()}",
            )
        except RuntimeError as error:
            report.notes.append(str(error))
        ledger.absorb(collector.drain())
        report.alive = services.alive()
        _collect(report, ledger, store, rejected_before, fuzz_started, fuzz_ended)
        report.collector_errors = collector.errors
    finally:
        if collector is not None:
            collector.stop()
        if broker is not None:
            broker.close()
        if not report.alive:
            report.alive = services.alive()
        report.exit_codes = services.stop()
        for name in services.processes:
            log = services.log(name)
            report.tracebacks[name] = log.count("Traceback")
            report.reconnects[name] = log.count("event=connection_lost")
        if cleanup:
            from fedq.coordinator.ops.status import remove_job

            try:
                remove_job(amqp_url, store, archive=True)
            except Exception as error:  # noqa: BLE001 - the report matters more than the clean-up
                report.notes.append(f"could not delete job {job}: {error!r}")
    report.total_seconds = time.monotonic() - started
    return report


def _fuzz(
    report: FuzzReport,
    ctx: fm.Context,
    ledger: Ledger,
    broker: Broker,
    collector: DeadLetterCollector,
    services: Services,
    store: ModelStore,
    *,
    seed: int,
    only: set[str] | None,
    window: int,
    max_staleness: int,
    timeout: float,
    say: Progress,
) -> None:
    """Send every planned message, answering genuine tasks as they become available."""
    kinds = list(enumerate(fm.plan(report.messages, seed, only=only)))
    task_kinds = collections.deque(
        (index, name) for index, name in kinds if fm.KINDS[name].family == "task" and name != "too_stale"
    )
    stale = collections.deque(index for index, name in kinds if name == "too_stale")
    others = collections.deque((index, name) for index, name in kinds if fm.KINDS[name].family != "task")
    held: list[tuple[int, RoundTask]] = []
    forged: dict[str, fm.Message] = {}
    updates, tasks = broker.topology.updates, broker.topology.tasks
    last_task = time.monotonic()
    since_check = window
    refreshed = 0.0

    def rng_for(index: int) -> random.Random:
        return random.Random(seed * 1_000_003 + index)

    def take_task() -> RoundTask | None:
        """A genuine task off the queue, or None. A forged one of ours found there is put back, and we
        leave the queue alone until the next round: taking it again and again would keep it from the
        workers, who must refuse it, and cost ~6 ms a time."""
        for _ in range(20):
            taken = broker.take(tasks)
            if taken is None:
                return None
            properties, body = taken
            if properties.message_id in forged:
                message = forged[properties.message_id]
                broker.publish(tasks, message.body, message.message_id, message.headers)
                report.recirculated += 1
                return None
            try:
                task = parse_task(body)
            except MessageError:
                report.notes.append(f"took a task message that does not parse: {body[:80]!r}")
                continue
            report.stolen += 1
            ledger.stolen_ids.add(task.task_id)
            ctx.seen_tasks.append(task)
            return task
        return None

    def send(index: int, name: str, task: RoundTask | None = None) -> None:
        message = fm.KINDS[name].build(ctx, rng_for(index), task)
        message.index = index
        if not message.keep_message_id:
            message.message_id = f"fz-{index:05d}-{message.kind}"
        exchange = broker.topology.updates if message.exchange == fm.UPDATES else broker.topology.tasks
        message.sent_at = time.time()
        refused = broker.publish(exchange, message.body, message.message_id, message.headers)
        ledger.record(message, task)
        ctx.sent.append(message)
        if refused is not None:
            ledger.not_delivered.append((message, refused))
            report.not_delivered.append((f"{message.kind}: {message.variant}", refused))
        elif message.exchange == fm.TASKS and message.via != "honest_update":
            forged[message.message_id] = message
        elif message.via == "honest_update":
            forged[message.message_id] = message  # put back if we take it ourselves

    total = len(kinds)
    while task_kinds or others or stale or held:
        now = time.monotonic()
        if now - refreshed > 1.0:
            refreshed = now
            ctx.head = store.versions.last_committed()
            ctx.head_digest = store.versions.digest_of(ctx.head)
            if len(ctx.applied) < 200:
                ctx.applied = [
                    update
                    for record in store.versions.recent_history(100)
                    for update in record.updates
                    if not update.worker_id.startswith("fz-")
                ]
            ledger.absorb(collector.drain())
            ctx.closed_tasks.extend(ledger.closed)
            ledger.closed.clear()
            report.rss_peak = max(filter(None, [report.rss_peak, rss_mib(services.coordinator.pid)]), default=None)
            if services.coordinator.poll() is not None:
                report.notes.append("the coordinator exited while the fuzzer was sending")
                break
            say(
                f"sent {len(ledger.sent)}/{total}, accounted {ledger.matched}, head {ctx.head} "
                f"(+{ctx.head - report.head_before}), rss {report.rss_peak or 0:.0f} MiB"
            )
        if since_check >= 10:
            since_check = 0
            while broker.ready(updates) > window and services.coordinator.poll() is None:
                say(f"sent {len(ledger.sent)}/{total}, waiting for the coordinator to catch up")
                time.sleep(0.05)
        # Held tasks are answered once the head has moved past --max-staleness.
        for item in list(held):
            if ctx.head - item[1].model_version > max_staleness:
                held.remove(item)
                send(item[0], "too_stale", item[1])
                since_check += 1
        if stale and len(held) < HELD_AT_ONCE:
            task = take_task()
            if task is not None:
                held.append((stale.popleft(), task))
                last_task = time.monotonic()
                continue
        progressed = False
        if task_kinds:
            task = take_task()
            if task is not None:
                index, name = task_kinds.popleft()
                send(index, name, task)
                progressed = True
                last_task = time.monotonic()
        if not progressed and others:
            index, name = others.popleft()
            send(index, name)
            progressed = True
        if progressed:
            since_check += 1
            continue
        if not task_kinds and not stale and held:
            ctx.head = store.versions.last_committed()  # only held tasks left: wait for the head to move
        if time.monotonic() - last_task > timeout:
            # No task to take for that long: the remaining answers to genuine tasks are not sent.
            for _, name in list(task_kinds):
                report.not_sent[name] += 1
            if stale:
                report.not_sent["too_stale"] += len(stale)
            task_kinds.clear()
            stale.clear()
            for index, task in held:  # answered as they are, too stale or not
                send(index, "too_stale", task)
                ledger.sent[-1].expected = frozenset({"too_stale", "not_finite"})
            held.clear()
            report.notes.append(f"no genuine task to take for {timeout:.0f} s: stopped answering tasks")
            break
        time.sleep(0.02)
    say(f"sent {len(ledger.sent)} messages; accounting for them", force=True)


def _settle(
    report: FuzzReport,
    ledger: Ledger,
    collector: DeadLetterCollector,
    services: Services,
    store: ModelStore,
    *,
    quiet: float,
    say: Progress,
) -> None:
    """Wait until every message is accounted for, or nothing new was for ``quiet`` seconds."""
    last_change, last_unaccounted = time.monotonic(), None
    while True:
        ledger.absorb(collector.drain())
        unaccounted = ledger.unaccounted()
        report.rss_peak = max(filter(None, [report.rss_peak, rss_mib(services.coordinator.pid)]), default=None)
        if unaccounted == 0:
            return
        if unaccounted != last_unaccounted:
            last_unaccounted, last_change = unaccounted, time.monotonic()
        if time.monotonic() - last_change > quiet:
            report.notes.append(f"{unaccounted} message(s) still unaccounted for after {quiet:.0f} s without news")
            return
        if services.coordinator.poll() is not None and time.monotonic() - last_change > 5:
            report.notes.append("the coordinator exited before every message was accounted for")
            return
        say(f"accounting: {unaccounted} of {len(ledger.sent)} not yet seen, head {store.versions.last_committed()}")
        time.sleep(0.25)


def _collect(
    report: FuzzReport,
    ledger: Ledger,
    store: ModelStore,
    rejected_before: dict[str, int],
    fuzz_started: float,
    fuzz_ended: float,
) -> None:
    report.sent = ledger.sent
    report.outcomes = ledger.outcomes()
    report.skipped, report.refused = ledger.counted()
    report.refused = {reason: count for reason, count in report.refused.items() if count}
    rejected = store.counters.get("rejected")
    report.rejected = {
        reason: count - rejected_before.get(reason, 0)
        for reason, count in rejected.items()
        if count - rejected_before.get(reason, 0)
    }
    report.worker_refusals = collections.Counter(
        report.outcomes[message.index]
        for message in ledger.sent
        if message.exchange == fm.TASKS and message.via != "honest_update" and message.index in report.outcomes
    )
    report.other_letters = ledger.other_letters
    fuzz_tasks = {message.task_id for message in ledger.sent if message.task_id and message.via != "skipped"}
    fuzz_tasks |= ledger.stolen_ids
    # Both tiers: the archiver has moved the older versions (and what they applied) out of Redis.
    history = whole_history(store)
    for record in history:
        for update in record.updates:
            if update.task_id in fuzz_tasks or update.worker_id.startswith("fz-"):
                report.hostile_applied.append(
                    {"version": record.version, "task_id": update.task_id, "worker_id": update.worker_id}
                )
    window = [record for record in history if fuzz_started <= record.created <= fuzz_ended]
    report.honest_applied = sum(
        1
        for record in window
        for update in record.updates
        if update.task_id not in fuzz_tasks and not update.worker_id.startswith("fz-")
    )
    report.versions_while_fuzzing = len(window)
    stamps = [(None, fuzz_started)] + [(record.version, record.created) for record in window] + [(None, fuzz_ended)]
    gaps = [(later[1] - earlier[1], earlier[0], later[0]) for earlier, later in zip(stamps, stamps[1:])]
    longest = max(gaps)
    report.longest_gap, report.longest_gap_between = longest[0], (longest[1], longest[2])
    inner = [gap for gap, first, second in gaps if first is not None and second is not None]
    report.median_gap = statistics.median(inner) if inner else None
    before = [record.created for record in history if record.created < fuzz_started and record.version > 0]
    report.median_gap_before = (
        statistics.median([b - a for a, b in zip(before, before[1:])]) if len(before) > 1 else None
    )
    report.head_final = store.versions.last_committed()
    report.accuracy = store.versions.load_meta(report.head_final).metrics.get("accuracy")


# -- the table ---------------------------------------------------------------------------------


def _counts(counter: dict[str, int]) -> str:
    return (
        ", ".join(f"{reason} {count}" for reason, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))
        or "none"
    )


def print_report(report: FuzzReport, out: TextIO = sys.stdout) -> None:
    def line(text: str = "") -> None:
        print(text, file=out)

    by_kind: dict[str, list[fm.Message]] = collections.defaultdict(list)
    for message in report.sent:
        by_kind[message.kind].append(message)
    line(
        f"fedq fuzzer: job {report.job}, seed {report.seed}, {len(report.sent)} messages sent "
        f"in {report.fuzz_seconds:.0f} s, accounted for {report.settle_seconds:.0f} s later "
        f"({report.total_seconds:.0f} s in all); logs in {report.log_dir}"
    )
    line()
    rows = []
    family_names = {"updates": "update", "task": "task", "tasks": "forged"}
    for family in ("updates", "task", "tasks"):
        for name in sorted(by_kind):
            if fm.KINDS[name].family != family:
                continue
            messages = by_kind[name]
            expected = collections.Counter(outcome for message in messages for outcome in sorted(message.expected)[:1])
            observed = collections.Counter(
                report.outcomes.get(message.index, "(not delivered)") for message in messages
            )
            expected_text = _counts(expected) if len(expected) <= 2 else f"{len(expected)} reasons"
            ok = all(
                report.outcomes.get(message.index) in message.expected
                for message in messages
                if message.index in report.outcomes
            )
            observed_text = "as expected" if ok and len(expected) > 2 else _counts(observed)
            rows.append(
                (
                    name,
                    family_names[family],
                    len(messages),
                    expected_text,
                    observed_text + ("" if ok else "   <-- MISMATCH"),
                )
            )
    width = max([len("expected")] + [len(row[3]) for row in rows]) + 2
    names = max([22] + [len(row[0]) for row in rows])
    line(f"{'sent by kind':<{names + 2}}{'family':>8}{'sent':>7}  {'expected':<{width}}observed")
    for name, family, count, expected_text, observed_text in rows:
        line(f"  {name:<{names}}{family:>8}{count:>7}  {expected_text:<{width}}{observed_text}")
    line(f"  {'total':<{names}}{'':>8}{len(report.sent):>7}")
    if report.not_sent:
        line(f"  not sent (no genuine task to take): {_counts(report.not_sent)}")
    if report.not_delivered:
        line(f"  refused by the broker itself (connection closed, not counted below): {len(report.not_delivered)}")
        for what, error in report.not_delivered[:5]:
            line(f"      {what}: {error}")
    line()
    coordinator_letters = collections.Counter(
        report.outcomes[message.index]
        for message in report.sent
        if message.index in report.outcomes
        and (message.exchange == fm.UPDATES or message.via == "honest_update")
        and report.outcomes[message.index] not in ("(none)", fm.DUPLICATE)
        and not report.outcomes[message.index].startswith("refused:")
    )
    line(
        "dead-lettered by the coordinator, by reason (its Redis counters during the run; "
        "fuzz messages in the dead-letter queue):"
    )
    for reason in sorted(
        set(report.rejected) | set(coordinator_letters), key=lambda key: (-report.rejected.get(key, 0), key)
    ):
        line(f"  {reason:<24}{report.rejected.get(reason, 0):>7}{coordinator_letters.get(reason, 0):>7}")
    line(f"  {'total':<24}{sum(report.rejected.values()):>7}{sum(coordinator_letters.values()):>7}")
    expected_skips = sum(1 for message in report.sent if fm.DUPLICATE in message.expected)
    line(f"duplicates skipped (not dead-lettered): {report.skipped} (fuzz messages that may be: {expected_skips})")
    line(f"refusals of genuine tasks accepted (task closed, nothing applied): {_counts(report.refused)}")
    line(f"forged tasks refused by the honest workers: {_counts(report.worker_refusals)}")
    if report.other_letters:
        line(f"other dead letters (honest traffic, not the fuzzer's): {_counts(report.other_letters)}")
    line(
        f"outcome as expected: {len(report.outcomes) - len(report.mismatches) - report.unaccounted}"
        f"/{len(report.outcomes)}; other outcome: {len(report.mismatches)}; unaccounted: {report.unaccounted}"
    )
    for message, outcome in report.mismatches[:15]:
        line(f"    {message.kind} ({message.variant}): expected {'/'.join(sorted(message.expected))}, got {outcome}")
    line()
    line(
        f"applied hostile updates: {len(report.hostile_applied)}"
        + (f"   <-- {report.hostile_applied[:5]}" if report.hostile_applied else "")
    )
    line(f"honest updates applied while fuzzing: {report.honest_applied}")
    line(
        f"genuine tasks taken off the queue and answered with hostile messages: {report.stolen}"
        f" (forged tasks of ours taken and put back: {report.recirculated})"
    )
    alive = ", ".join(f"{name} {'alive' if up else 'DEAD'}" for name, up in sorted(report.alive.items()))
    line(
        f"services at the end: {alive}; exit codes after SIGTERM: "
        + ", ".join(f"{name} {code}" for name, code in sorted(report.exit_codes.items()))
    )
    line(
        "reconnects (event=connection_lost): "
        + ", ".join(f"{name} {count}" for name, count in sorted(report.reconnects.items()))
        + "; tracebacks in logs: "
        + ", ".join(f"{name} {count}" for name, count in sorted(report.tracebacks.items()))
    )

    def mib(value: float | None) -> str:
        return "?" if value is None else f"{value:.0f}"

    line(
        f"coordinator RSS before / peak / after: {mib(report.rss_before)} / {mib(report.rss_peak)} / "
        f"{mib(report.rss_after)} MiB"
    )
    gap_between = report.longest_gap_between
    where = (
        f"version {gap_between[0]} -> {gap_between[1]}"
        if None not in gap_between
        else "start -> first version"
        if gap_between[0] is None and gap_between[1] is not None
        else "last version -> end"
        if gap_between[0] is not None
        else "no version at all"
    )
    median_before = "?" if report.median_gap_before is None else f"{report.median_gap_before:.2f}"
    median = "?" if report.median_gap is None else f"{report.median_gap:.2f}"
    line(
        f"versions committed while fuzzing: {report.versions_while_fuzzing} (head {report.head_before} -> "
        f"{report.head_after_fuzz}); longest gap between versions: {report.longest_gap:.2f} s ({where}); "
        f"median gap {median} s (before fuzzing {median_before} s)"
    )
    accuracy = "?" if report.accuracy is None else f"{report.accuracy:.3f}"
    line(f"after the fuzzing: head {report.head_final}, accuracy {accuracy}")
    for note in report.notes:
        line(f"note: {note}")
    if report.collector_errors:
        line(
            f"note: the dead-letter reader lost its connection {len(report.collector_errors)} time(s): "
            f"{report.collector_errors[0]}"
        )
    verdicts = ["OK", "FAILED (hostile update applied or service died)", "ACCOUNTING MISMATCH"]
    line(f"result: {verdicts[report.exit_code]}")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so that the services this run started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000, help="how many hostile messages (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kinds and variants (default 0)")
    parser.add_argument(
        "--window",
        type=int,
        default=200,
        help="most messages waiting in the update queue before the fuzzer waits (default 200)",
    )
    parser.add_argument("--only", default="", help="comma-separated kinds to send (default: all)")
    parser.add_argument("--list", action="store_true", help="list the kinds and exit")
    parser.add_argument("--concurrency", type=int, default=6, help="coordinator --concurrency (default 6)")
    parser.add_argument("--max-staleness", type=int, default=6, help="coordinator --max-staleness (default 6)")
    parser.add_argument(
        "--settle-quiet",
        type=float,
        default=60.0,
        help="stop waiting for outcomes after this many seconds without news (default 60)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of each wait for the services")
    parser.add_argument("--job", default=None, help="job name (default: fuzz-<random>)")
    parser.add_argument("--keep-job", action="store_true", help="leave the job's keys and queues for inspection")
    parser.add_argument("--log-dir", default=None, help="where service logs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--amqp-url", default=os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("FEDQ_REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if args.list:
        for name, entry in sorted(fm.KINDS.items(), key=lambda item: (item[1].family, item[0])):
            print(f"{name:<24}{entry.family:<8}{entry.weight:>5}  {entry.description}")
        return 0
    only = {name.strip() for name in args.only.split(",") if name.strip()} or None
    unknown = (only or set()) - set(fm.KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))} (see --list)")
    try:
        report = run(
            args.messages,
            seed=args.seed,
            job=args.job,
            amqp_url=args.amqp_url,
            redis_url=args.redis_url,
            log_dir=args.log_dir,
            window=args.window,
            only=only,
            concurrency=args.concurrency,
            max_staleness=args.max_staleness,
            settle_quiet=args.settle_quiet,
            timeout=args.timeout,
            cleanup=not args.keep_job,
        )
    except RuntimeError as error:  # the services did not start, or died before the fuzzing began
        print(f"fuzz: {error}", file=sys.stderr)
        return 1
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(report), indent=2))
    return report.exit_code


def to_json(report: FuzzReport) -> dict[str, Any]:
    sent = collections.Counter(message.kind for message in report.sent)
    return {
        "job": report.job,
        "seed": report.seed,
        "sent": len(report.sent),
        "sent_by_kind": dict(sent),
        "outcomes": dict(collections.Counter(report.outcomes.values())),
        "rejected": report.rejected,
        "skipped": report.skipped,
        "refused": report.refused,
        "worker_refusals": dict(report.worker_refusals),
        "mismatches": [
            {"kind": m.kind, "variant": m.variant, "expected": sorted(m.expected), "got": outcome}
            for m, outcome in report.mismatches
        ],
        "unaccounted": report.unaccounted,
        "hostile_applied": report.hostile_applied,
        "honest_applied": report.honest_applied,
        "alive": report.alive,
        "exit_codes": report.exit_codes,
        "rss_mib": {"before": report.rss_before, "peak": report.rss_peak, "after": report.rss_after},
        "versions_while_fuzzing": report.versions_while_fuzzing,
        "longest_gap_s": report.longest_gap,
        "accuracy": report.accuracy,
        "exit_code": report.exit_code,
    }


if __name__ == "__main__":
    sys.exit(main())
