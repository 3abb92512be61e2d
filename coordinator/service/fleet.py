"""The coordinator's measurements of its workers: how fast each is, how stale its updates are
expected to be, and what it contributed.

Expected staleness. A task spans the versions committed between its issue and its update's
arrival, so a worker whose tasks take T_i seconds from issue to arrival, in a job that commits
r versions a second, sends updates about tau_hat_i = r T_i versions stale (T_i includes the
time the task waited in the queue). Both are smoothed (exponentially, SMOOTHING per
observation). Adaptive staleness judges and damps each update against its own worker's
tau_hat_i (see algorithms/aggregation.py, AdaptiveStaleness), so a slow worker is never cut off
for being slow. Its weight uses u_i = r D_i, the versions between two of the worker's updates
(D_i: the smoothed gap between their arrivals), which is tau_hat_i when each worker has one
task at a time, and less when tasks wait in the queue.

Contribution: updates applied (and the weight they got), refused by reason, and when; saved
in Redis (common/store/fleet.py) for `fedq status`, `monitor` and `report`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator, Mapping

from fedq.common.obs import metrics
from fedq.common.records import AppliedUpdate
from fedq.common.store.fleet import FleetRecords, WorkerRecord

# Weight of the newest observation in the smoothed round trip and commit interval.
SMOOTHING = 0.3
# A live worker is "quiet" when nothing of it was applied for this long, or for this many of its
# own round trips if it is slower.
QUIET_SECONDS = 120.0
QUIET_ROUND_TRIPS = 5
# A worker counts towards the examples of the fleet while it sent an update this recently, or
# within this many of its round trips.
ACTIVE_SECONDS = 300.0
ACTIVE_ROUND_TRIPS = 3
# Updates refused in a row before a worker is reported as being rejected.
REJECTED_STREAK_WARNING = 3


class _ExpectedStaleness(Mapping[str, float]):
    """The workers' expected staleness, read from their records when asked (see Fleet.expectations)."""

    def __init__(self, workers: dict[str, WorkerRecord]):
        self._workers = workers

    def __getitem__(self, worker: str) -> float:
        expected = self._workers[worker].expected_staleness
        if expected is None:
            raise KeyError(worker)
        return expected

    def __iter__(self) -> Iterator[str]:
        return (worker for worker, record in self._workers.items() if record.expected_staleness is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Fleet:
    def __init__(self, records: FleetRecords, job: str):
        self.records = records
        self.job = job
        self.workers: dict[str, WorkerRecord] = records.load()
        self.commit_interval: float | None = None  # smoothed seconds between commits
        self._last_commit: float | None = None

    @property
    def version_rate(self) -> float | None:
        """Versions committed per second, smoothed."""
        return None if not self.commit_interval else 1.0 / self.commit_interval

    def _worker(self, worker_id: str, now: float) -> WorkerRecord:
        if worker_id not in self.workers:
            self.workers[worker_id] = WorkerRecord(worker_id, first_seen=now)
        return self.workers[worker_id]

    def expectations(self) -> Mapping[str, float]:
        """worker id -> the staleness its speed predicts, for every worker measured so far: a live
        view, so that judging an update looks up its own worker instead of copying the fleet."""
        return _ExpectedStaleness(self.workers)

    def arrived(
        self,
        worker_id: str,
        issued_at: float,
        examples: int | None = None,
        now: float | None = None,
        steps: int = 0,
        train_seconds: float = 0.0,
        batch_size: int = 0,
    ) -> None:
        """An update (accepted or not) answering a task issued at ``issued_at`` arrived now.

        Called after the update was judged: its own round trip does not excuse it."""
        now = time.time() if now is None else now
        record = self._worker(worker_id, now)
        round_trip = max(now - issued_at, 0.0)
        record.round_trip_s = _smoothed(record.round_trip_s, round_trip)
        if record.last_arrival is not None:
            # A worker away for a while (stopped, no tasks) is not slow: a gap counts at most as
            # long as a round trip.
            record.interval_s = _smoothed(record.interval_s, min(now - record.last_arrival, record.round_trip_s))
        record.last_arrival = now
        if examples is not None:
            record.examples = examples
        if steps and train_seconds > 0:
            speed = steps / train_seconds
            record.steps_per_second = _smoothed(record.steps_per_second, speed)
            if examples and batch_size:
                record.seconds_per_epoch = _smoothed(record.seconds_per_epoch, -(-examples // batch_size) / speed)
        if self.version_rate is not None:
            record.expected_staleness = self.version_rate * record.round_trip_s
        metrics.PER_WORKER_ROUND_TRIP.labels(self.job, worker_id).set(record.round_trip_s)

    def update_interval(self, worker_id: str) -> float | None:
        """How many versions pass between two updates of ``worker_id`` (None: not measured yet)."""
        record = self.workers.get(worker_id)
        if record is None or record.interval_s is None or self.version_rate is None:
            return None
        return self.version_rate * record.interval_s

    def task_seconds(self, epochs: int, now: float | None = None) -> float:
        """The time budget of an automatically sized task: what ``epochs`` epochs take the median
        active worker. Faster workers finish their epochs sooner; slower ones train the steps
        that fit and return as often as the median one. 0 (whole epochs) until measured."""
        now = time.time() if now is None else now
        measured = sorted(
            record.seconds_per_epoch
            for record in self.workers.values()
            if record.seconds_per_epoch and self._active(record, now)
        )
        return epochs * statistics.median(measured) if measured else 0.0

    def data_share(self, worker_id: str, examples: int, now: float | None = None) -> float:
        """``examples`` (the worker's update's count) as a share of the examples of the workers active
        now: those with an update in the last ACTIVE_SECONDS, or in their last ACTIVE_ROUND_TRIPS
        round trips if they are slower."""
        now = time.time() if now is None else now
        others = sum(
            record.examples
            for worker, record in self.workers.items()
            if worker != worker_id and self._active(record, now)
        )
        return max(examples, 1) / (max(examples, 1) + others)

    @staticmethod
    def _active(record: WorkerRecord, now: float) -> bool:
        if record.last_arrival is None:
            return False
        return now - record.last_arrival <= max(ACTIVE_SECONDS, ACTIVE_ROUND_TRIPS * (record.round_trip_s or 0.0))

    def committed(self, applied: Iterable[AppliedUpdate], now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self._last_commit is not None:
            interval = now - self._last_commit
            self.commit_interval = _smoothed(self.commit_interval, interval)
        self._last_commit = now
        changed = []
        for update in applied:
            record = self._worker(update.worker_id, now)
            record.applied += 1
            record.applied_weight += update.weight
            record.rejected_streak = 0
            record.last_applied = now
            changed.append(record)
            metrics.PER_WORKER_APPLIED.labels(self.job, update.worker_id).inc()
        self.records.save(changed)

    def rejected(self, worker_id: str, reason: str, now: float | None = None) -> None:
        record = self._worker(worker_id, time.time() if now is None else now)
        record.rejected[reason] = record.rejected.get(reason, 0) + 1
        record.rejected_streak += 1
        self.records.save([record])
        metrics.PER_WORKER_REJECTED.labels(self.job, worker_id, reason).inc()


def _smoothed(previous: float | None, observed: float) -> float:
    return observed if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * observed


def contribution(records: dict[str, WorkerRecord]) -> list[dict]:
    """Per worker: its share of the applied updates and of the influence against its share of the
    examples (of the workers that had anything applied), and its speed."""
    applied = sum(record.applied for record in records.values())
    weight = sum(record.applied_weight for record in records.values())
    examples = sum(record.examples for record in records.values())
    return [
        {
            "worker_id": record.worker_id,
            "applied": record.applied,
            "applied_share": record.applied / applied if applied else 0.0,
            "weight_share": record.applied_weight / weight if weight else 0.0,
            "examples": record.examples,
            "data_share": record.examples / examples if examples else 0.0,
            "rejected": dict(record.rejected),
            "round_trip_s": record.round_trip_s,
            "steps_per_second": record.steps_per_second,
            "expected_staleness": record.expected_staleness,
            "last_applied": record.last_applied,
            "rejected_streak": record.rejected_streak,
        }
        for record in sorted(records.values(), key=lambda record: record.worker_id)
    ]


def contribution_warnings(records: dict[str, WorkerRecord], live: Iterable[str], now: float) -> list[str]:
    """A live worker whose updates keep being refused, or of which nothing was applied for a while."""
    warnings = []
    for worker_id in sorted(live):
        record = records.get(worker_id)
        if record is None:
            continue
        if record.rejected_streak >= REJECTED_STREAK_WARNING:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(record.rejected.items()))
            warnings.append(
                f"worker {worker_id}: its last {record.rejected_streak} updates were rejected "
                f"({reasons}); it contributes nothing"
            )
            continue
        quiet_limit = max(QUIET_SECONDS, QUIET_ROUND_TRIPS * (record.round_trip_s or 0.0))
        since = now - (record.last_applied or record.first_seen)
        if since > quiet_limit:
            what = (
                "no update of it was ever applied"
                if record.last_applied is None
                else f"none of its updates was applied in the last {since:.0f} s"
            )
            warnings.append(f"worker {worker_id}: {what}")
    return warnings
