"""A job's history read across both tiers: Redis (the hot tier) first, then the archive.

Readers (replay, show, export, report, rollback, history) never ask which tier
holds a version. Redis keeps the head and a window of recent versions in full;
older versions keep their records and update blobs in the archive, and their
weights only at checkpoints: :func:`fedq.coordinator.ops.replay.reconstruct`
recomputes the rest. Everything read is checked against the digest recorded
when it was committed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from fedq.common.records import AppliedUpdate, VersionRecord
from fedq.common.store import ModelStore
from fedq.common.store.archive import Archive, ArchiveError, JobArchive, model_blob, optimizer_blob
from fedq.common.store.client import TamperedVersionError, UnknownVersionError
from fedq.common.wire import codec


def open_job_archive(
    store: ModelStore, url: str | None = None, storage_options: dict | None = None
) -> JobArchive | None:
    """The job's archive: ``url`` if given, else the one its coordinator recorded (None: it has none)."""
    url = url or store.status.archive_url()
    return None if url is None else Archive(url, storage_options).job(store.job)


def whole_history(store: ModelStore) -> list[VersionRecord]:
    """Every version's record, oldest first, from both tiers (the job's recorded archive)."""
    return list(TieredHistory(store, open_job_archive(store)).records())


class TieredHistory:
    def __init__(self, store: ModelStore, archive: JobArchive | None):
        self.store = store
        self.archive = archive

    @property
    def job(self) -> str:
        return self.store.job

    def last_committed(self) -> int | None:
        return self.store.versions.last_committed()

    def oldest_in_redis(self) -> int:
        """The oldest version whose record Redis still holds (everything older is archived)."""
        return int(self.store.redis.get(self.store.keys.pruned_through) or -1) + 1

    def record(self, version: int) -> VersionRecord:
        """The version's record with its update list. Raises UnknownVersionError when neither tier has it."""
        entries = self.store.versions.history(version, version)
        if entries:
            return entries[0]
        archived = self.archive.record(version) if self.archive is not None else None
        if archived is None:
            head = self.last_committed()
            where = "Redis" if self.archive is None else f"Redis or its archive {self.archive.url}"
            if head is not None and 0 <= version <= head:
                raise UnknownVersionError(f"version {version} of job {self.job!r} is in neither {where}")
            raise UnknownVersionError(f"job {self.job!r} has no version {version} (its head is {head})")
        return archived

    def meta(self, version: int) -> VersionRecord:
        """The version's metadata (its record without the update list)."""
        try:
            return self.store.versions.load_meta(version)
        except UnknownVersionError:
            return self.record(version).with_updates(())

    def records(self, start: int = 0, end: int | None = None) -> Iterator[VersionRecord]:
        """Records of start <= version <= end (default: the newest), oldest first, archive then Redis."""
        newest = self.last_committed()
        end = newest if end is None else end
        if end is None:
            return
        version = start
        first_hot = self.oldest_in_redis()
        record: VersionRecord | None
        if self.archive is not None and version < first_hot:
            for record in self.archive.records(version, min(end, first_hot - 1)):
                yield record
                version = record.version + 1
        if version <= end:
            # A trim that raced this read may have moved more into the archive: read each
            # version from Redis if it is still there, else from the archive.
            hot = {record.version: record for record in self.store.versions.history(version, end)}
            while version <= end:
                record = hot.get(version)
                if record is None and self.archive is not None:
                    record = self.archive.record(version)
                if record is None:
                    return
                yield record
                version += 1

    def update_blob(self, version: int, update: AppliedUpdate) -> bytes | None:
        """The delta ``update`` applied in ``version``, verified against its digest; None if neither tier has it."""
        payload = self.store.blobs.get(update.blob_key)
        if payload is None and self.archive is not None:
            payload = self.archive.blob(version, update.blob_key)
        if payload is not None and codec.digest(payload) != update.digest:
            raise TamperedVersionError(
                f"version {version}: the blob of update {update.task_id} does not match its recorded digest"
            )
        return payload

    def stored_weights(self, version: int) -> codec.Weights | None:
        """The version's weights if a tier stores them (Redis's window, or an archived checkpoint), verified."""
        try:
            return self.store.versions.load_weights(version)
        except UnknownVersionError:
            pass
        if self.archive is None:
            return None
        payload = self.archive.blob(version, model_blob(version))
        if payload is None:
            return None
        if codec.digest(payload) != self.meta(version).digest:
            raise TamperedVersionError(
                f"the archived weights of version {version} of job {self.job!r} do not match "
                "the digest recorded when it was committed"
            )
        return codec.decode(payload)

    def optimizer_state(self, version: int) -> codec.Weights:
        """The server-optimizer state after ``version`` ({} for stateless optimizers)."""
        payload = cast("bytes | None", self.store.redis.get(self.store.keys.optimizer_state(version)))
        if payload is None and self.archive is not None:
            payload = self.archive.blob(version, optimizer_blob(version))
        return {} if payload is None else codec.decode(payload)

    def nearest_stored(self, version: int) -> int | None:
        """The newest version <= ``version`` whose weights a tier stores: where reconstruction starts."""
        for candidate in range(version, max(self.oldest_in_redis(), 0) - 1, -1):
            if self.store.redis.exists(self.store.keys.model(candidate)):
                return candidate
        if self.archive is None:
            return None
        return max((checkpoint for checkpoint in self.archive.checkpoints() if checkpoint <= version), default=None)


__all__ = ["ArchiveError", "TieredHistory", "open_job_archive"]
