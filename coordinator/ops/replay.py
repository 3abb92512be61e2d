"""Recompute versions from the Redis history and check them bit for bit; roll back.

Each history entry names its parent, its aggregation config (in the version's
metadata) and, in order, the updates it applied with their blob keys and
digests. Replaying version v = ``server_step`` on the replayed parent, the
parent's optimizer state and those updates; the result must have exactly the
recorded digest. A rollback version must equal the version it rolled back to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedq.common.records import VersionRecord
from fedq.common.wire import codec
from fedq.common.store import ModelStore, TamperedVersionError, UnknownVersionError
from fedq.coordinator.algorithms.aggregation import BufferedUpdate
from fedq.coordinator.algorithms.step import build_aggregator, build_optimizer, server_step


class ReplayError(RuntimeError):
    """Replay cannot proceed (missing start version, pruned blob, ...); one sentence."""


@dataclass
class Divergence:
    version: int
    recorded_digest: str
    replayed_digest: str
    differences: dict[str, float] = field(default_factory=dict)  # tensor -> max |recorded - replayed|
    note: str = ""

    def describe(self) -> str:
        if self.recorded_digest == self.replayed_digest:
            lines = [f"version {self.version} replays to its recorded digest {self.recorded_digest[:16]}…, "
                     "but its stored weights are different"]
        else:
            lines = [f"version {self.version} diverges: recorded digest {self.recorded_digest[:16]}…, "
                     f"replayed {self.replayed_digest[:16]}…"]
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


def _kept_weights(store: ModelStore, version: int, advice: str) -> codec.Weights:
    try:
        return store.versions.load_weights(version)
    except UnknownVersionError:
        raise ReplayError(f"the weights of version {version} were pruned; {advice}") from None
    except TamperedVersionError as error:
        raise ReplayError(str(error)) from None


def _load_updates(store: ModelStore, entry: VersionRecord) -> list[BufferedUpdate]:
    updates = []
    for record in entry.updates:
        payload = store.blobs.get(record.blob_key)
        if payload is None:
            raise ReplayError(f"version {entry.version}: the blob of update {record.task_id} is gone "
                              f"(pruned by retention or never kept); cannot replay past it")
        if codec.digest(payload) != record.digest:
            raise ReplayError(f"version {entry.version}: the blob of update {record.task_id} does not "
                              f"match its recorded digest")
        updates.append(BufferedUpdate(task_id=record.task_id, worker_id=record.worker_id,
                                      base_version=record.base_version, staleness=record.staleness,
                                      num_examples=record.num_examples, delta=codec.decode(payload)))
    return updates


def replay(store: ModelStore, start: int, end: int,
           progress: Callable[[int, int], None] = lambda done, total: None) -> ReplayResult:
    """Recompute versions start+1..end from version ``start``; stop at the first divergence."""
    head = store.versions.last_committed()
    if head is None:
        raise ReplayError(f"job {store.job!r} has no versions")
    if not 0 <= start < end <= head:
        raise ReplayError(f"need 0 <= from < to <= head ({head}); got from {start}, to {end}")
    weights = _kept_weights(store, start, "start from a kept version")
    state = store.versions.load_optimizer_state(start)
    replayed: dict[int, codec.Weights] = {start: weights}

    def base_weights(version: int) -> codec.Weights:
        if version in replayed:
            return replayed[version]
        try:
            return store.versions.load_weights(version)
        except UnknownVersionError:
            raise ReplayError(f"base version {version} was pruned; cannot replay an update computed from it") from None
        except TamperedVersionError as error:
            raise ReplayError(str(error)) from None

    verified = []
    entries = store.versions.history(start + 1, end)
    if [entry.version for entry in entries] != list(range(start + 1, end + 1)):
        raise ReplayError(f"the history of versions {start + 1}..{end} is incomplete")
    for position, entry in enumerate(entries, 1):
        version = entry.version
        # The metadata, not the history entry, is what the version's digest and config are
        # read from: it is what `fedq show` prints and what tampering would change.
        meta = store.versions.load_meta(version)
        if meta.rollback_of is not None:
            weights = base_weights(meta.rollback_of)
            state = store.versions.load_optimizer_state(meta.rollback_of)
        else:
            try:
                aggregator, optimizer = build_aggregator(meta.config), build_optimizer(meta.config)
            except (KeyError, TypeError, ValueError) as error:
                raise ReplayError(f"version {version}: its recorded aggregation config cannot be used: {error}") from None
            weights, state, _ = server_step(aggregator, optimizer, weights, state, _load_updates(store, entry),
                                            base_weights)
        replayed[version] = weights
        digest = codec.weights_digest(weights)
        if digest != meta.digest or store.versions.verify(version) is False:
            # Either the history does not recompute to the record, or the stored weights
            # (what workers train from and export writes) are not what was recorded.
            return ReplayResult(start, end, verified, _divergence(store, version, meta, digest, weights))
        verified.append(version)
        progress(position, len(entries))
    return ReplayResult(start, end, verified, None)


def _divergence(store: ModelStore, version: int, meta: VersionRecord, digest: str,
                weights: codec.Weights) -> Divergence:
    divergence = Divergence(version, meta.digest, digest)
    payload = store.redis.get(store.keys.model(version))
    if payload is None:
        divergence.note = "the recorded weights were pruned, so only the digests can be compared"
        return divergence
    if codec.digest(payload) != meta.digest:
        divergence.note = (f"the stored weights of version {version} do not match its recorded digest: tampered "
                           f"with or corrupted ({store.versions.repair_advice()})")
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


def rollback(store: ModelStore, version: int) -> int:
    """Make ``version`` the head again as a new version; history is never rewritten.

    The versions after ``version`` are marked abandoned: updates computed from
    them are refused. Workers pick the new head up with their next task.
    """
    try:
        head, tampered_head = store.versions.head(), None
    except TamperedVersionError:
        # The repair: the new version follows the last one committed, whatever the head key holds now.
        head, tampered_head = store.versions.last_committed(), store.versions.raw_head() or b""
    if head is None or not 0 <= version <= head:
        raise ReplayError(f"job {store.job!r} has no version {version} (head is {head})")
    if version == head and tampered_head is None:
        raise ReplayError(f"version {version} is already the head")
    weights = _kept_weights(store, version, "choose a kept version")
    target = store.versions.load_meta(version)
    return store.versions.commit(head, weights, optimizer_state=store.versions.load_optimizer_state(version),
                                 abandon=range(version + 1, head + 1), rollback_of=version, config=target.config,
                                 metrics=target.metrics, replacing_head=tampered_head)
