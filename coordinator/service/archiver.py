"""The archiver: moves a job's older history from Redis (the hot tier) to the archive, never losing a record.

One pass (:meth:`Archiver.run_once`):

1. **Copy.** Every committed version the archive lacks is written to segments:
   its record, the blob of every update it applied, and its weights and
   optimizer state when it is a checkpoint (version 0 and every
   ``checkpoint_every``-th). A segment is durable before the call returns
   (fsync and rename, or a completed upload).
2. **Note.** ``archived_through`` in Redis moves to the last archived version
   (for status and monitors; the archive's own listing is the truth), and the
   segment's update blobs leave Redis: they are most of its bytes and nothing
   hot reads them.
3. **Trim.** Versions both archived and older than the hot window (the last
   ``hot_versions``) leave Redis, one version per MULTI transaction: weights,
   optimizer state, metadata, update blobs, history entry and idempotency
   records. ``pruned_through`` moves with each.

A crash between any two steps leaves a version in both tiers (a duplicate),
never in neither: step 3 deletes only what the archive listed before it began.
Segments are copied forward from the archive's last version, so a crash after
step 1 makes the next pass start after it, and a crash before it rewrites the
same range. The idempotency records leave with their version: an update
redelivered after that is refused as an ``unknown_task`` (its task was closed
when it was applied), so it is still never applied twice.

Only one archiver runs per job (a Redis lock, freed at once when its holder was
a process of the same host that is gone); the coordinator runs it in a
thread every ``archive_seconds`` and once more when the job finishes, and
``fedq archive`` runs one pass by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import redis

from fedq.common.obs.faults import crash_point
from fedq.common.obs.logs import kv
from fedq.common.records import VersionRecord
from fedq.common.store import ModelStore
from fedq.common.store.archive import JobArchive, model_blob, optimizer_blob

log = logging.getLogger("fedq.archiver")

_DELETE_IF_UNCHANGED = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# A segment closes once its blobs pass this size (at least one version each): big enough that
# an object store sees few requests, small enough to build and upload without strain.
SEGMENT_BYTES = 256 * 1024 * 1024
# The lock is renewed between blobs once a sixth of this has passed (not at every blob: that was
# a round trip per update), so it has to outlive one blob's upload plus 5 s; when its holder dies
# (a killed coordinator) the next archiver waits at most this long.
LOCK_SECONDS = 30
RENEW_SECONDS = LOCK_SECONDS / 6
# A pass reads the history this many records per round trip, and blobs in pipelined batches of
# up to this many bytes (one blob however large): small deltas cost a round trip per batch, not
# per delta, and a batch of large ones holds no more than this in memory at once.
HISTORY_CHUNK = 100
READ_BATCH_BYTES = 16 * 1024 * 1024
# Past this share of its Redis budget, with history still to move, a job's coordinator holds
# new tasks back until the archiver has caught up: the budget is a bound, not only a warning.
HOLD_DISPATCH_FRACTION = 0.9
# ... or earlier, to leave room for what tasks in flight will still bring, but never below this
# share: 1,000 tasks of a 4 MB model reserve 4 GB, and a threshold under zero held dispatch all
# the time (bench/scale.py: tasks went out for 16 of 120 seconds). The coordinator warns then.
HOLD_FLOOR_FRACTION = 0.5
WARN_FRACTION = 0.8
# How often the coordinator measures the job's Redis memory (MEMORY USAGE of every key, pipelined).
MEASURE_SECONDS = 1.0


@dataclass
class ArchivePass:
    """What one pass did."""

    archived: list[tuple[int, int]] = field(default_factory=list)  # (first, last) of each segment written
    trimmed: int = 0  # versions that left Redis
    archived_through: int = -1  # the archive's newest version after the pass
    skipped: str | None = None  # why nothing was done ("another archiver holds the lock", ...)


class Archiver:
    def __init__(
        self,
        store: ModelStore,
        archive: JobArchive,
        hot_versions: int,
        checkpoint_every: int,
        segment_bytes: int = SEGMENT_BYTES,
    ):
        if hot_versions < 1:
            raise ValueError("the hot tier keeps at least the head (hot_versions >= 1)")
        self.store = store
        self.archive = archive
        self.hot_versions = hot_versions
        self.checkpoint_every = checkpoint_every
        self.segment_bytes = segment_bytes

    def is_checkpoint(self, version: int) -> bool:
        return version == 0 or (self.checkpoint_every > 0 and version % self.checkpoint_every == 0)

    def run_once(self, wait_seconds: float = 0.0) -> ArchivePass:
        """One pass; waits up to ``wait_seconds`` for another archiver's lock (or a dead one's to expire)."""
        lock = self.store.redis.lock(self.store.keys.archiver_lock, timeout=LOCK_SECONDS)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        if not lock.acquire(blocking=False, token=token):
            self._break_lock_of_dead_holder()
            if not lock.acquire(blocking=wait_seconds > 0, blocking_timeout=wait_seconds or None, token=token):
                return ArchivePass(skipped="another archiver holds the job's lock")
        try:
            return self._pass(lock)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                pass  # it expired during a very slow pass; nobody else's lock is touched

    def _break_lock_of_dead_holder(self) -> None:
        """Free the lock at once when its holder was a process of this host that no longer runs
        (a coordinator restarted after a crash); anywhere else, only its expiry frees it."""
        key = self.store.keys.archiver_lock
        holder = cast("bytes | None", self.store.redis.get(key))
        if holder is None:
            return
        host, _, rest = holder.decode(errors="replace").partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit():
            return
        try:
            os.kill(int(pid), 0)
            return  # alive (or, in a fresh container, a namesake): wait for the expiry
        except ProcessLookupError:
            pass
        except PermissionError:
            return
        self.store.redis.eval(_DELETE_IF_UNCHANGED, 1, key, holder)
        log.info(
            kv(
                "archive_lock_freed",
                job=self.store.job,
                holder=holder.decode(errors="replace"),
                reason="its process is gone",
            )
        )

    def _pass(self, lock: redis.lock.Lock) -> ArchivePass:
        renew = _Renewal(lock)
        result = ArchivePass()
        head = self.store.versions.last_committed()
        if head is None:
            return result
        through = self.archive.last_archived()
        while through < head:
            records, sizes = self._next_segment(through + 1, head)
            segment = self.archive.write_segment(
                records, self._blobs(records, sizes, renew), self._verified_digests(records)
            )
            crash_point("archive.segment_written")
            through = segment.last
            result.archived.append((segment.first, segment.last))
            self.store.redis.set(self.store.keys.archived_through, through)
            crash_point("archive.cursor_moved")
            self._drop_update_blobs(records)
            log.info(kv("archived", job=self.store.job, first=segment.first, last=segment.last, bytes=segment.size))
        result.archived_through = through
        result.trimmed = self._trim(min(through, head - self.hot_versions), renew)
        return result

    def _next_segment(self, first: int, head: int) -> tuple[list[VersionRecord], dict[str, int]]:
        """The records of the next segment, from ``first`` until the blobs pass the segment size,
        and the size of each blob key they name."""
        records: list[VersionRecord] = []
        sizes: dict[str, int] = {}
        total, version = 0, first
        while version <= head and total < self.segment_bytes:
            end = min(head, version + HISTORY_CHUNK - 1)
            chunk = {record.version: record for record in self.store.versions.history(version, end)}
            keys = [key for record in chunk.values() for key in self._blob_keys(record)]
            lengths = self.store.redis.pipeline(transaction=False)
            for key in keys:
                lengths.strlen(key)
            sizes.update(zip(keys, lengths.execute()))
            while version <= end and total < self.segment_bytes:
                record = chunk.get(version)
                if record is None:
                    # Trimming follows archiving, so this means the record was lost some other way.
                    raise RuntimeError(
                        f"version {version} of job {self.store.job!r} is neither in the archive "
                        f"{self.archive.url} nor in Redis: was the archive moved or deleted?"
                    )
                records.append(record)
                total += sum(sizes[key] for key in self._blob_keys(record))
                version += 1
        return records, sizes

    def _blob_keys(self, record: VersionRecord) -> list[str]:
        keys = [update.blob_key for update in record.updates]
        if self.is_checkpoint(record.version):
            keys += [self.store.keys.model(record.version), self.store.keys.optimizer_state(record.version)]
        return keys

    def _verified_digests(self, records: list[VersionRecord]) -> dict[str, str]:
        """The recorded digests of deltas kept under verified keys: the coordinator checked those
        bytes against the digest before it applied them, and no worker can write there since
        (common/store/blobs.py). Deltas of older records, under the workers' own keys, are hashed."""
        return {
            update.blob_key: update.digest
            for record in records
            for update in record.updates
            if self.store.keys.kind(update.blob_key) == "delta"
        }

    def _blobs(
        self, records: list[VersionRecord], sizes: dict[str, int], renew: _Renewal
    ) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of every blob the segment holds, read from Redis in pipelined batches of
        at most READ_BATCH_BYTES (by the ``sizes`` measured for the segment)."""
        wanted: list[_Blob] = []
        for record in records:
            wanted += [
                _Blob(update.blob_key, update.blob_key, record.version, update.task_id) for update in record.updates
            ]
            if self.is_checkpoint(record.version):
                wanted.append(_Blob(model_blob(record.version), self.store.keys.model(record.version), record.version))
                state_key = self.store.keys.optimizer_state(record.version)
                wanted.append(_Blob(optimizer_blob(record.version), state_key, record.version, optional=True))
        batch: list[_Blob] = []
        batch_bytes = 0
        for index, blob in enumerate(wanted):
            batch.append(blob)
            batch_bytes += sizes.get(blob.key, 0)
            if batch_bytes < READ_BATCH_BYTES and index + 1 < len(wanted):
                continue
            renew()
            reads = self.store.redis.pipeline(transaction=False)
            for item in batch:
                reads.get(item.key)
            for item, payload in zip(batch, reads.execute()):
                if payload is not None:
                    yield item.name, payload
                elif item.task_id is not None:
                    # Written before the archive existed and pruned then: the record says what is missing.
                    log.error(kv("archive_blob_missing", job=self.store.job, version=item.version, task=item.task_id))
                elif not item.optional:
                    raise RuntimeError(
                        f"checkpoint version {item.version} of job {self.store.job!r} has no weights in Redis"
                    )
            batch, batch_bytes = [], 0

    def _drop_update_blobs(self, records: list[VersionRecord]) -> None:
        """Update blobs leave Redis as soon as they are archived: nothing hot reads an applied update
        (replay reads the archive), and they are most of a version's bytes (K deltas per version
        against one set of weights). A crash before this leaves them until their version's trim."""
        keys = [update.blob_key for record in records for update in record.updates]
        for start in range(0, len(keys), 500):
            self.store.redis.delete(*keys[start : start + 500])

    def _trim(self, last: int, renew: _Renewal) -> int:
        """Remove versions up to ``last`` from Redis (the archive holds them); the count removed."""
        keys = self.store.keys
        trimmed = 0
        first = int(self.store.redis.get(keys.pruned_through) or -1) + 1
        for start in range(first, last + 1, HISTORY_CHUNK):
            end = min(last, start + HISTORY_CHUNK - 1)
            records = {record.version: record for record in self.store.versions.history(start, end)}
            for version in range(start, end + 1):
                renew()
                record = records.get(version)
                removal = self.store.redis.pipeline(transaction=True)
                removal.delete(
                    keys.model(version),
                    keys.model_diff(version),
                    keys.optimizer_state(version),
                    keys.meta(version),
                    *(update.blob_key for update in (record.updates if record else ())),
                )
                if record is not None and record.updates:
                    removal.hdel(keys.applied, *(update.task_id for update in record.updates))
                # Stream ids are <version>-1: MINID <version+1>-0 drops exactly the entries up to this version.
                removal.xtrim(keys.history, minid=f"{version + 1}-0", approximate=False)
                removal.set(keys.pruned_through, version)
                removal.execute()
                self.store.versions.forget(version)
                trimmed += 1
                crash_point("archive.version_trimmed")
        return trimmed


@dataclass(frozen=True)
class _Blob:
    """A blob a segment holds: its name in the segment, its Redis key, and whose it is."""

    name: str
    key: str
    version: int
    task_id: str | None = None  # an update's delta (None: the version's weights or optimizer state)
    optional: bool = False  # a version without an optimizer state has none


class _Renewal:
    """Renews a pass's lock when RENEW_SECONDS have passed since it was taken or last renewed."""

    def __init__(self, lock: redis.lock.Lock):
        self.lock = lock
        self.renewed = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.renewed > RENEW_SECONDS:
            self.lock.reacquire()
            self.renewed = time.monotonic()


class ArchiveThread:
    """Runs archive passes in the background of a coordinator, on a Redis connection of its own."""

    def __init__(
        self,
        store: ModelStore,
        archive: JobArchive,
        hot_versions: int,
        checkpoint_every: int,
        every_seconds: float,
        budget_bytes: int,
        reserve_bytes: int = 0,
    ):
        # A store of its own (its own weights cache) on the coordinator's client: redis-py's pool is thread-safe.
        self.store, self.job = store, store.job
        self.archive, self.hot_versions, self.checkpoint_every = archive, hot_versions, checkpoint_every
        self.every_seconds = every_seconds
        self.budget_bytes = budget_bytes
        # What arrives after dispatch stops: an update blob from every task in flight and the
        # versions they make. Held from 90 % of the budget, or earlier if that is more.
        self.hold_above = max(
            budget_bytes * HOLD_FLOOR_FRACTION, min(budget_bytes * HOLD_DISPATCH_FRACTION, budget_bytes - reserve_bytes)
        )
        self.reserve_too_large = budget_bytes - reserve_bytes < budget_bytes * HOLD_FLOOR_FRACTION
        self._stop = threading.Event()
        # Written by the coordinator's thread (holding_dispatch), read by this one (the warning).
        self._holding, self._measured_at, self._peak_bytes = False, float("-inf"), 0
        self.measure_seconds = MEASURE_SECONDS
        self._unmeasurable = False
        self._thread = threading.Thread(target=self._run, name=f"fedq-archiver-{self.job}", daemon=True)
        self.passes = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 600.0) -> None:
        """Stop after one last pass (everything committed so far reaches the archive)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        archiver = Archiver(self.store, self.archive, self.hot_versions, self.checkpoint_every)
        skipped, pause = None, self.every_seconds
        while True:
            stopping = self._stop.wait(pause)
            pause = self.every_seconds
            try:
                # The last pass waits out a lock left by a killed predecessor: a finished
                # job's history should reach the archive.
                done = archiver.run_once(wait_seconds=LOCK_SECONDS + 5 if stopping else 0)
                self.passes += 1
                pause = self.pause_after(done, self._check_budget())
                if done.skipped != skipped:  # say it once, not every pass
                    log.info(
                        kv("archive_skipped", job=self.job, reason=done.skipped)
                        if done.skipped
                        else kv("archive_resumed", job=self.job)
                    )
                    skipped = done.skipped
            except Exception as error:  # noqa: BLE001 - Redis and the archive keep everything; retry next time
                log.warning(kv("archive_failed", job=self.job, error=repr(error)[:300]))
            if stopping:
                return

    def holding_dispatch(self) -> bool:
        """Whether the coordinator should issue no new task for now: the job holds over 90 % of its
        budget (less the reserve) while versions wait for the archive. Called by the coordinator
        between deliveries; measures at most once a second. Only the archive catching up frees
        Redis, so holding helps only while it is behind: a hot window over the budget on its own
        is not held (the warning says what to change). An archive that is down keeps the job
        held, and Redis whole, until it is back."""
        now = time.monotonic()
        if now - self._measured_at < self.measure_seconds:
            return self._holding
        self._measured_at = now
        try:
            used = self._job_bytes()
            head = self.store.versions.last_committed()
            archived = int(self.store.redis.get(self.store.keys.archived_through) or -1)
        except redis.RedisError:
            return self._holding  # the coordinator's own Redis calls will say what is wrong
        self._peak_bytes = max(self._peak_bytes, used)
        self._holding = used > self.hold_above and head is not None and archived < head
        return self._holding

    def pause_after(self, done: ArchivePass, used_bytes: int) -> float:
        """How long to wait before the next pass. A pass that moved something while the job holds
        over half its budget starts the next at once: a large model's updates (tens of MB/s) would
        otherwise pile up for a whole interval; a small one's wait, so that segments are not tiny."""
        if done.archived and used_bytes > self.budget_bytes / 2:
            return 0.0
        return self.every_seconds

    def _job_bytes(self) -> int:
        return sum(self.store.memory_usage().values())

    def _check_budget(self) -> int:
        """The job's Redis memory at its peak since the last pass (it is lowest right after a pass,
        which has just dropped the archived blobs), warned about from 80 % of the budget."""
        try:
            used = self._job_bytes()
        except redis.ResponseError as error:
            # A Redis that refuses MEMORY USAGE (some managed services): archive on, unmeasured.
            if not self._unmeasurable:
                self._unmeasurable = True
                log.warning(kv("redis_budget_unmeasured", job=self.job, error=str(error)[:200]))
            return 0
        peak, self._peak_bytes = max(used, self._peak_bytes), 0
        if peak > self.budget_bytes * WARN_FRACTION:
            log.warning(
                kv(
                    "redis_budget",
                    job=self.job,
                    used_mib=round(peak / 2**20, 1),
                    budget_mib=round(self.budget_bytes / 2**20, 1),
                    advice="lower --hot-versions or --max-staleness, or raise --redis-budget-mb",
                )
            )
        return peak


def wait_for_archive(store: ModelStore, archive: JobArchive, version: int, deadline_seconds: float = 120) -> bool:
    """Whether the archive holds ``version`` within the deadline (for tests and `fedq archive --wait`)."""
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if archive.last_archived() >= version:
            return True
        time.sleep(0.2)
    return False
