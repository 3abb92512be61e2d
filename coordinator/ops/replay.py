"""Recompute versions from the history (Redis and the archive) and check them bit for bit; roll back.

Each history entry names its parent, its aggregation config (in the version's
metadata) and, in order, the updates it applied with their blob keys and
digests. Replaying version v = ``server_step`` on the replayed parent, the
parent's optimizer state and those updates; the result must have exactly the
recorded digest. A rollback version must equal the version it rolled back to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from fedq.common.records import AppliedUpdate, RecordError, VersionRecord
from fedq.common.store import ModelStore, TamperedVersionError
from fedq.common.store.archive import model_blob
from fedq.common.store.tiers import TieredHistory, open_job_archive
from fedq.common.wire import codec, compression
from fedq.coordinator.algorithms.aggregation import BufferedUpdate
from fedq.coordinator.algorithms.step import CentralNoise, build_aggregator, build_optimizer, server_step

# Recently recomputed versions kept for FedAsync's base versions: at most this many bytes of weights.
RECOMPUTE_CACHE_BYTES = 1 << 30


class ReplayError(RuntimeError):
    """Replay cannot proceed (no stored start, a missing blob, ...); one sentence."""


@dataclass
class Divergence:
    version: int
    recorded_digest: str
    replayed_digest: str
    differences: dict[str, float] = field(default_factory=dict)  # tensor -> max |recorded - replayed|
    note: str = ""

    def describe(self) -> str:
        if self.recorded_digest == self.replayed_digest:
            lines = [
                f"version {self.version} replays to its recorded digest {self.recorded_digest[:16]}…, "
                "but its stored weights are different"
            ]
        else:
            lines = [
                f"version {self.version} diverges: recorded digest {self.recorded_digest[:16]}…, "
                f"replayed {self.replayed_digest[:16]}…"
            ]
        if self.differences:
            lines += [f"  tensor {name}: max |difference| {value:.3g}" for name, value in self.differences.items()]
        if self.note:
            lines.append("  " + self.note)
        return "\n".join(lines)


@dataclass
class ReplayResult:
    start: int
    end: int
    verified: list[int]
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None


def _history(source: ModelStore | TieredHistory) -> TieredHistory:
    """Both tiers of the job's history (a bare store reads the archive its coordinator recorded)."""
    if isinstance(source, TieredHistory):
        return source
    return TieredHistory(source, open_job_archive(source))


class _Recomputer:
    """Weights and optimizer state of any version: stored, or recomputed from the nearest stored one.

    Keeps the versions it computed lately (FedAsync mixes against an update's base
    version) within a memory bound; anything evicted is recomputed on demand.
    """

    def __init__(self, history: TieredHistory):
        self.history = history
        self.recent: OrderedDict[int, tuple[codec.Weights, codec.Weights]] = OrderedDict()
        self.capacity = 3

    def remember(self, version: int, weights: codec.Weights, state: codec.Weights) -> None:
        self.recent[version] = (weights, state)
        self.recent.move_to_end(version)
        model_bytes = max(1, sum(array.nbytes for array in weights.values()))
        self.capacity = max(3, min(64, RECOMPUTE_CACHE_BYTES // model_bytes))
        while len(self.recent) > self.capacity:
            self.recent.popitem(last=False)

    def version(self, version: int) -> tuple[codec.Weights, codec.Weights]:
        if version in self.recent:
            self.recent.move_to_end(version)
            return self.recent[version]
        try:
            stored = self.history.stored_weights(version)
        except TamperedVersionError as error:
            raise ReplayError(str(error)) from None
        if stored is not None:
            return stored, self.history.optimizer_state(version)
        start = self.history.nearest_stored(version)
        if start is None:
            raise ReplayError(
                f"no weights at or before version {version} are stored in Redis or the archive; cannot recompute it"
            )
        weights, state = self.version(start)
        for record in _records(self.history, start + 1, version):
            weights, state = self.step(record, self.history.meta(record.version), weights, state)
        return weights, state

    def step(
        self, entry: VersionRecord, meta: VersionRecord, weights: codec.Weights, state: codec.Weights
    ) -> tuple[codec.Weights, codec.Weights]:
        """The version ``entry`` describes, from its parent's weights and state."""
        if meta.rollback_of is not None:
            weights, state = self.version(meta.rollback_of)
        else:
            try:
                if meta.config is None:
                    raise ValueError("none was recorded")
                aggregator, optimizer = build_aggregator(meta.config), build_optimizer(meta.config)
            except (KeyError, TypeError, ValueError) as error:
                raise ReplayError(
                    f"version {entry.version}: its recorded aggregation config cannot be used: {error}"
                ) from None
            try:
                noise = CentralNoise.of(meta.config, meta.dp_seed)
            except ValueError as error:
                raise ReplayError(f"version {entry.version}: {error}") from None
            specs = codec.tensor_specs(weights)
            weights, state, _ = server_step(
                aggregator,
                optimizer,
                weights,
                state,
                self._updates(entry, specs),
                lambda base: self.version(base)[0],
                noise,
            )
        self.remember(entry.version, weights, state)
        return weights, state

    @staticmethod
    def _decoded(version: int, record: AppliedUpdate, payload: bytes, specs: compression.TensorSpecs) -> codec.Weights:
        """The delta as the coordinator decoded it when it applied it (from its stored encoding)."""
        try:
            return compression.decode(payload, specs)[1]
        except codec.CodecError as error:
            raise ReplayError(
                f"version {version}: the blob of update {record.task_id} cannot be decoded: {error}"
            ) from None

    def _updates(self, entry: VersionRecord, specs: compression.TensorSpecs) -> list[BufferedUpdate]:
        updates = []
        for record in entry.updates:
            try:
                payload = self.history.update_blob(entry.version, record)
            except TamperedVersionError as error:
                raise ReplayError(str(error)) from None
            if payload is None:
                raise ReplayError(
                    f"version {entry.version}: the blob of update {record.task_id} is in neither "
                    "Redis nor the archive; cannot replay past it"
                )
            updates.append(
                BufferedUpdate(
                    task_id=record.task_id,
                    worker_id=record.worker_id,
                    base_version=record.base_version,
                    staleness=record.staleness,
                    num_examples=record.num_examples,
                    delta=self._decoded(entry.version, record, payload, specs),
                    expected_staleness=record.expected_staleness,
                    data_share=record.data_share,
                    update_interval=record.update_interval,
                    local_steps=record.local_steps,
                )
            )
        return updates


def _records(history: TieredHistory, start: int, end: int) -> Iterator[VersionRecord]:
    """Records start..end in order; a missing one is an error, not an early end."""
    expected = start
    for record in history.records(start, end):
        if record.version != expected:
            break
        yield record
        expected += 1
    if expected <= end:
        raise ReplayError(
            f"the history of versions {start}..{end} is incomplete: version {expected} is in "
            "neither Redis nor the archive"
        )


def reconstruct(source: ModelStore | TieredHistory, version: int) -> codec.Weights:
    """The weights of ``version``, stored or recomputed (checked against the recorded digest)."""
    history = _history(source)
    weights, _ = _Recomputer(history).version(version)
    if codec.weights_digest(weights) != history.meta(version).digest:
        raise ReplayError(
            f"version {version} recomputes to weights that differ from the recorded digest; "
            f"run fedq replay to find where the history diverges"
        )
    return weights


def replay(
    source: ModelStore | TieredHistory,
    start: int,
    end: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> ReplayResult:
    """Recompute versions start+1..end from version ``start``; stop at the first divergence.

    Reads both tiers: records and update blobs from Redis or the archive, and the
    start from stored weights or, between checkpoints, recomputed.
    """
    history = _history(source)
    head = history.last_committed()
    if head is None:
        raise ReplayError(f"job {history.job!r} has no versions")
    if not 0 <= start < end <= head:
        raise ReplayError(f"need 0 <= from < to <= head ({head}); got from {start}, to {end}")
    recomputer = _Recomputer(history)
    weights, state = recomputer.version(start)
    recomputer.remember(start, weights, state)
    verified: list[int] = []
    for position, entry in enumerate(_records(history, start + 1, end), 1):
        version = entry.version
        # The metadata, not the history entry, is what the version's digest and config are
        # read from: it is what `fedq show` prints and what tampering would change.
        meta = history.meta(version)
        weights, state = recomputer.step(entry, meta, weights, state)
        digest = codec.weights_digest(weights)
        if digest != meta.digest or _stored_differs(history, version):
            # Either the history does not recompute to the record, or the stored weights
            # (what workers train from and export writes) are not what was recorded.
            return ReplayResult(start, end, verified, _divergence(history, version, meta, digest, weights))
        verified.append(version)
        progress(position, end - start)
    return ReplayResult(start, end, verified, None)


def _stored_differs(history: TieredHistory, version: int) -> bool:
    try:
        history.stored_weights(version)
        return False
    except (TamperedVersionError, codec.CodecError, RecordError):
        return True


def _divergence(
    history: TieredHistory, version: int, meta: VersionRecord, digest: str, weights: codec.Weights
) -> Divergence:
    divergence = Divergence(version, meta.digest, digest)
    store = history.store
    payload = cast("bytes | None", store.redis.get(store.keys.model(version)))
    if payload is None and history.archive is not None:
        payload = history.archive.blob(version, model_blob(version))
    if payload is None:
        divergence.note = "the version's weights are not stored (only checkpoints are), so only digests can be compared"
        return divergence
    if codec.digest(payload) != meta.digest:
        divergence.note = (
            f"the stored weights of version {version} do not match its recorded digest: tampered "
            f"with or corrupted ({store.versions.repair_advice()})"
        )
    try:
        recorded = codec.decode(payload)
    except codec.CodecError:
        divergence.note += "; they are not even a safetensors file"
        return divergence
    for name, array in recorded.items():
        if name not in weights or weights[name].shape != array.shape:
            divergence.differences[name] = float("inf")
        elif not np.array_equal(weights[name], array):
            divergence.differences[name] = float(np.max(np.abs(weights[name].astype(np.float64) - array)))
    return divergence


def rollback(source: ModelStore | TieredHistory, version: int) -> int:
    """Make ``version`` the head again as a new version; history is never rewritten.

    The versions after ``version`` are marked abandoned: updates computed from
    them are refused. Workers pick the new head up with their next task.
    """
    history = _history(source)
    store = history.store
    try:
        head, tampered_head = store.versions.head(), None
    except TamperedVersionError:
        # The repair: the new version follows the last one committed, whatever the head key holds now.
        head, tampered_head = store.versions.last_committed(), store.versions.raw_head() or b""
    if head is None or not 0 <= version <= head:
        raise ReplayError(f"job {store.job!r} has no version {version} (head is {head})")
    if version == head and tampered_head is None:
        raise ReplayError(f"version {version} is already the head")
    # An archived version between checkpoints is recomputed; the result must match its record.
    weights, state = _Recomputer(history).version(version)
    target = history.meta(version)
    if codec.weights_digest(weights) != target.digest:
        raise ReplayError(
            f"version {version} recomputes to weights that differ from its recorded digest; "
            "run fedq replay to find where the history diverges"
        )
    # Privacy once spent stays spent: the versions rolled back were released all the same, so the
    # new head carries the privacy the job had spent at the old one (a restarted coordinator counts on).
    spent = history.meta(head)
    return store.versions.commit(
        head,
        weights,
        optimizer_state=state,
        abandon=range(version + 1, head + 1),
        rollback_of=version,
        config=target.config,
        metrics=target.metrics,
        replacing_head=tampered_head,
        epsilon=spent.epsilon,
        dp_steps=spent.dp_steps,
    )
