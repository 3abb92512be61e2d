"""The archive: the cold tier of a job's history, in immutable segment files on any fsspec filesystem.

Redis holds the head and a window of recent versions; everything older lives
here. The archive root is a local directory by default (no server needed) or
any fsspec URL (``s3://bucket/prefix``, ``gs://…``, ``file://…``); a job's
segments sit under ``<root>/<job>/``::

    segment-<first:010d>-<last:010d>.fqseg

A segment holds versions first..last: their records (with the updates each
applied, in order), the blob of every applied update, and the weights and
server-optimizer state of checkpoint versions. Replay needs no more: a version
between checkpoints is recomputed from the checkpoint before it. The file is::

    blob bytes, back to back | index JSON | index length (8 bytes, little endian) | MAGIC

so a reader fetches the footer, then the index, then only the byte ranges of
the blobs it needs (a range request on object stores). The index gives each
blob its offset, length and sha256, and its own sha256 sits in the footer's
JSON envelope; every read is checked.

A segment is written whole or not at all: on a local disk to a temporary name,
fsynced, renamed and the directory fsynced; on an object store as one upload,
which is visible only once complete. Segments are never modified. Two
segments may cover the same version (an archiver that crashed after writing
one and before Redis learnt of it writes the range again): their contents
are identical, and readers take either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedq.common.records import VersionRecord
from fedq.common.store.client import StoreError

MAGIC = b"FQSEG001"
FOOTER = struct.Struct("<Q")
SEGMENT_SCHEMA = "fedq.segment/1"
_SEGMENT_NAME = re.compile(r"segment-(\d{10})-(\d{10})\.fqseg$")
# Parsed indexes kept per process: a replay walks segments in order and reads each index once.
INDEX_CACHE_SEGMENTS = 16


class ArchiveError(StoreError):
    """The archive cannot be reached, or holds something unreadable; the message is for the user."""


def default_archive_url() -> str:
    """``$XDG_DATA_HOME/fedq/archive`` (``~/.local/share/fedq/archive``): the embedded default."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "fedq", "archive")


def normalise_url(url: str) -> str:
    """A plain path becomes absolute, so the URL recorded in Redis means the same to every reader on the host."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


@dataclass(frozen=True)
class BlobRef:
    offset: int
    length: int
    digest: str  # sha256 hex of the blob's bytes


@dataclass(frozen=True)
class Segment:
    first: int
    last: int
    path: str
    size: int = 0

    def covers(self, version: int) -> bool:
        return self.first <= version <= self.last


@dataclass(frozen=True)
class SegmentIndex:
    segment: Segment
    records: dict[int, VersionRecord]
    blobs: dict[str, BlobRef]


def model_blob(version: int) -> str:
    return f"model:{version}"


def optimizer_blob(version: int) -> str:
    return f"optstate:{version}"


class Archive:
    """An archive root; :meth:`job` gives one job's segments."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec  # imported here: commands that never touch the archive do not pay for it

        self.url = normalise_url(url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError, OSError) as error:
            raise ArchiveError(f"cannot open the archive {self.url!r}: {error}") from None
        self.local = "file" in _protocols(self.fs)

    def job(self, job: str) -> JobArchive:
        return JobArchive(self, job)

    def jobs(self) -> list[str]:
        """Names of the jobs with a folder in this archive."""
        try:
            return sorted(Path(entry).name for entry in self.fs.ls(self.root, detail=False) if self.fs.isdir(entry))
        except FileNotFoundError:
            return []


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class JobArchive:
    """The segments of one job: written by the archiver, read by replay, show, export and rollback."""

    def __init__(self, archive: Archive, job: str):
        self.archive = archive
        self.fs = archive.fs
        self.job = job
        self.folder = f"{archive.root.rstrip('/')}/{job}"
        self._indexes: OrderedDict[str, SegmentIndex] = OrderedDict()
        self._segments: list[Segment] | None = None

    @property
    def url(self) -> str:
        return f"{self.archive.url.rstrip('/')}/{self.job}"

    # -- listing ------------------------------------------------------------

    def segments(self, refresh: bool = False) -> list[Segment]:
        """The job's segments, by first version (a listing; cached until ``refresh``)."""
        if self._segments is None or refresh:
            try:
                entries = (
                    self.fs.ls(self.folder, detail=True, refresh=True)
                    if self._ls_refreshes()
                    else self.fs.ls(self.folder, detail=True)
                )
            except FileNotFoundError:
                entries = []
            except OSError as error:
                raise ArchiveError(f"cannot list the archive {self.url!r}: {error}") from None
            segments = []
            for entry in entries:
                match = _SEGMENT_NAME.search(entry["name"])
                if match:
                    segments.append(Segment(int(match[1]), int(match[2]), entry["name"], int(entry.get("size") or 0)))
            self._segments = sorted(segments, key=lambda segment: (segment.first, segment.last))
        return self._segments

    def _ls_refreshes(self) -> bool:
        # Object-store filesystems cache listings; a local one has no such keyword.
        return not self.archive.local

    def last_archived(self, refresh: bool = True) -> int:
        """The newest version the archive holds (-1: none). Segments are written in order, so
        every version up to it is there."""
        segments = self.segments(refresh)
        return max((segment.last for segment in segments), default=-1)

    def size(self) -> int:
        """Bytes the job's segments take."""
        return sum(segment.size for segment in self.segments(refresh=True))

    def segment_of(self, version: int) -> Segment | None:
        for segment in reversed(self.segments()):
            if segment.covers(version):
                return segment
        if self._segments is not None and version > max((s.last for s in self._segments), default=-1):
            # Perhaps written since we listed.
            for segment in reversed(self.segments(refresh=True)):
                if segment.covers(version):
                    return segment
        return None

    # -- writing ------------------------------------------------------------

    def write_segment(
        self,
        records: list[VersionRecord],
        blobs: Iterable[tuple[str, bytes]],
        known_digests: Mapping[str, str] | None = None,
    ) -> Segment:
        """Write one segment of ``records`` (consecutive versions, oldest first) and their ``blobs``
        (name, bytes); return it once it is durable.

        ``known_digests`` (name -> sha256 hex) are digests the caller verified when the blob was
        written and that nobody could have changed since: those blobs are not hashed again (at
        4 MB a delta, hashing cost the coordinator's process as much as verifying the update).
        Reading the blob back checks it against that digest all the same."""
        known = known_digests or {}
        first, last = records[0].version, records[-1].version
        if [record.version for record in records] != list(range(first, last + 1)):
            raise ValueError("a segment holds consecutive versions")
        name = f"segment-{first:010d}-{last:010d}.fqseg"
        path = f"{self.folder}/{name}"
        refs: dict[str, BlobRef] = {}
        offset = 0
        with _DurableWriter(self.archive, self.folder, path) as out:
            for blob_name, payload in blobs:
                out.write(payload)
                digest = known.get(blob_name) or hashlib.sha256(payload).hexdigest()
                refs[blob_name] = BlobRef(offset, len(payload), digest)
                offset += len(payload)
            index = json.dumps(
                {
                    "schema": SEGMENT_SCHEMA,
                    "job": self.job,
                    "first": first,
                    "last": last,
                    "records": [record.to_dict() for record in records],
                    "blobs": {blob_name: [ref.offset, ref.length, ref.digest] for blob_name, ref in refs.items()},
                },
                sort_keys=True,
            ).encode()
            envelope = json.dumps(
                {"index_sha256": hashlib.sha256(index).hexdigest(), "index_offset": offset, "index_length": len(index)}
            ).encode()
            out.write(index)
            out.write(envelope)
            out.write(FOOTER.pack(len(envelope)))
            out.write(MAGIC)
        self._segments = None
        self._indexes.pop(path, None)
        return Segment(first, last, path, offset + len(index) + len(envelope) + FOOTER.size + len(MAGIC))

    # -- reading ------------------------------------------------------------

    def index(self, segment: Segment) -> SegmentIndex:
        cached = self._indexes.get(segment.path)
        if cached is not None:
            self._indexes.move_to_end(segment.path)
            return cached
        try:
            size = self.fs.size(segment.path)
            tail = self.fs.cat_file(segment.path, start=size - FOOTER.size - len(MAGIC), end=size)
            if tail[-len(MAGIC) :] != MAGIC:
                raise ArchiveError(f"archive segment {segment.path} is not a fedq segment (bad magic)")
            (envelope_length,) = FOOTER.unpack(tail[: FOOTER.size])
            envelope_end = size - FOOTER.size - len(MAGIC)
            envelope = json.loads(
                self.fs.cat_file(segment.path, start=envelope_end - envelope_length, end=envelope_end)
            )
            index_bytes = self.fs.cat_file(
                segment.path, start=envelope["index_offset"], end=envelope["index_offset"] + envelope["index_length"]
            )
        except (OSError, ValueError, KeyError) as error:
            raise ArchiveError(f"cannot read archive segment {segment.path}: {error}") from None
        if hashlib.sha256(index_bytes).hexdigest() != envelope["index_sha256"]:
            raise ArchiveError(f"the index of archive segment {segment.path} does not match its digest (corrupted)")
        document = json.loads(index_bytes)
        if document.get("schema") != SEGMENT_SCHEMA:
            raise ArchiveError(
                f"archive segment {segment.path} has schema {document.get('schema')!r}, "
                f"this build reads {SEGMENT_SCHEMA}"
            )
        records = {}
        for raw in document["records"]:
            record = VersionRecord.from_json(json.dumps(raw))
            records[record.version] = record
        index = SegmentIndex(segment, records, {name: BlobRef(*ref) for name, ref in document["blobs"].items()})
        self._indexes[segment.path] = index
        while len(self._indexes) > INDEX_CACHE_SEGMENTS:
            self._indexes.popitem(last=False)
        return index

    def record(self, version: int) -> VersionRecord | None:
        segment = self.segment_of(version)
        return None if segment is None else self.index(segment).records.get(version)

    def records(self, start: int, end: int) -> Iterator[VersionRecord]:
        """Archived records of start <= version <= end, oldest first (stops at the first one missing)."""
        version = start
        while version <= end:
            segment = self.segment_of(version)
            if segment is None:
                return
            index = self.index(segment)
            while version <= min(end, segment.last):
                yield index.records[version]
                version += 1

    def blob(self, version: int, name: str) -> bytes | None:
        """The blob ``name`` archived with ``version``, checked against its digest; None if not archived."""
        segment = self.segment_of(version)
        if segment is None:
            return None
        ref = self.index(segment).blobs.get(name)
        if ref is None:
            return None
        try:
            payload = self.fs.cat_file(segment.path, start=ref.offset, end=ref.offset + ref.length)
        except OSError as error:
            raise ArchiveError(f"cannot read {name} from archive segment {segment.path}: {error}") from None
        if hashlib.sha256(payload).hexdigest() != ref.digest:
            raise ArchiveError(f"{name} in archive segment {segment.path} does not match its digest (corrupted)")
        return payload

    def checkpoints(self) -> list[int]:
        """Versions whose weights the archive holds, oldest first."""
        found: set[int] = set()
        for segment in self.segments():
            found.update(int(name.split(":", 1)[1]) for name in self.index(segment).blobs if name.startswith("model:"))
        return sorted(found)

    def delete(self) -> None:
        """Remove the job's folder and every segment in it."""
        try:
            self.fs.rm(self.folder, recursive=True)
        except FileNotFoundError:
            pass
        self._segments, self._indexes = None, OrderedDict()


class _DurableWriter:
    """Writes a file so that it exists whole and durably, or not at all."""

    def __init__(self, archive: Archive, folder: str, path: str):
        self.archive, self.folder, self.path = archive, folder, path
        self.temporary = f"{folder}/.{Path(path).name}.{uuid.uuid4().hex}.tmp" if archive.local else None

    def __enter__(self):
        if self.archive.local:
            assert self.temporary is not None  # set for every local archive
            os.makedirs(self.folder, exist_ok=True)
            self.file = open(self.temporary, "wb")
        else:
            # One object, visible only when the upload completes (a multipart upload is
            # committed at close); a crash before leaves nothing behind.
            self.file = self.archive.fs.open(self.path, "wb")
        return self.file

    def __exit__(self, kind, error, traceback):
        if not self.archive.local:
            if kind is None:
                try:
                    self.file.close()
                except OSError as failure:
                    raise ArchiveError(f"cannot upload {self.path}: {failure}") from None
            else:
                _discard(self.file)
            return False
        assert self.temporary is not None  # set for every local archive
        renamed = False
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if kind is None:
                os.replace(self.temporary, self.path)
                renamed = True
                directory = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(directory)  # the rename itself is durable only once its directory is
                finally:
                    os.close(directory)
        finally:
            if not renamed:
                try:
                    os.unlink(self.temporary)
                except FileNotFoundError:
                    pass
        return False


def _discard(file) -> None:
    """Abandon an object-store upload without completing it."""
    for method in ("discard", "abort"):
        if hasattr(file, method):
            try:
                getattr(file, method)()
            except Exception:  # noqa: BLE001 - already failing; the upload was never committed
                pass
            return
