"""Global model versions: the head, weights, metadata, history stream and optimizer state in Redis.

A version is committed by first SETting its weights blob under a staging key of
this attempt (with a TTL), then running one Lua script that checks the expected
head and only then renames the blob to ``model:<v>``, moves the head, writes the
metadata, appends the history entry and records the applied task ids. A crash
before the script leaves only a staged blob that expires; a crash after it
leaves a complete version; a writer that loses the compare-and-set touches
nothing of the winner's.

Downlink diffs: after committing v the coordinator may also store the exact
difference from v-1 to v (:meth:`VersionStore.publish_diff`, key ``modeldiff:<v>``);
a worker that holds an older version then reads the chain of diffs instead of the
full weights when that is smaller (:meth:`VersionStore.load_weights_from`), and
falls back to the full weights whenever the chain is missing, larger, unreadable
or does not give the digest the task names.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from fedq.common.records import AppliedUpdate, RecordError, VersionRecord
from fedq.common.store.client import (
    HeadMovedError,
    Replication,
    StoreError,
    TamperedVersionError,
    UnknownVersionError,
)
from fedq.common.store.keys import JobKeys
from fedq.common.store.ledger import OpenTask, write_changes
from fedq.common.wire import codec, downlink

# Versions are immutable, so cached weights never go stale; a few cover the
# staleness window FedAsync needs (it mixes against the update's base version).
WEIGHTS_CACHE_VERSIONS = 8
# The longest chain of diffs a worker asks for; further behind, diffs would be larger than the weights.
MAX_DIFF_CHAIN = 32
# Staged weights of a commit attempt that died before its script ran expire after this.
STAGING_TTL_SECONDS = 3600
# The history stream's entries as our clients read them: (id, fields), in bytes (no client
# decodes responses; redis-py's types also allow the str a decoding client would get).
_Entries = list[tuple[bytes, dict[bytes, bytes]]]

_COMMIT_SCRIPT = """
local head = redis.call('GET', KEYS[1])
if (head or '') ~= ARGV[1] then
  return redis.error_reply('HEADMOVED ' .. (head or 'none'))
end
-- the senders of the updates applied, judged on the job's identities as they are now: a worker
-- revoked after its update was validated gets nothing in (nothing is written; the caller drops it)
if ARGV[10] == '1' or redis.call('HLEN', KEYS[11]) > 0 then
  local refused = {}
  for index, sender in ipairs(cjson.decode(ARGV[9])) do
    local raw = redis.call('HGET', KEYS[11], sender[1])
    local reason = nil
    if not raw then
      reason = 'unknown_worker'
    else
      local identity = cjson.decode(raw)
      if identity['revoked_at'] ~= nil and identity['revoked_at'] ~= cjson.null then
        reason = 'revoked_worker'
      elseif identity['user'] ~= sender[2] then
        reason = 'impersonation'
      end
    end
    if reason then
      table.insert(refused, (index - 1) .. ':' .. reason)
    end
  end
  if #refused > 0 then
    return redis.error_reply('IDENTITY ' .. table.concat(refused, ','))
  end
end
local version = ARGV[2]
-- the weights (and optimizer state) were staged under keys of this attempt alone;
-- only the winner of the compare-and-set moves them to their final keys
redis.call('RENAME', KEYS[7], KEYS[8])
redis.call('PERSIST', KEYS[8])
if ARGV[8] == '1' then
  redis.call('RENAME', KEYS[9], KEYS[10])
  redis.call('PERSIST', KEYS[10])
end
redis.call('SET', KEYS[2], ARGV[3])
-- the stream id <version>-1 lets readers range over versions without a scan
redis.call('XADD', KEYS[3], version .. '-1', 'version', version, 'entry', ARGV[4])
local task_ids = cjson.decode(ARGV[5])
for _, task_id in ipairs(task_ids) do
  redis.call('HSET', KEYS[4], task_id, version)
  redis.call('HDEL', KEYS[5], task_id)
end
-- claim-checked blobs were written with a TTL; once applied they are part of the record
for _, blob_key in ipairs(cjson.decode(ARGV[6])) do
  redis.call('PERSIST', blob_key)
end
-- a rollback abandons the versions after its target: updates based on them are refused
for _, abandoned in ipairs(cjson.decode(ARGV[7])) do
  redis.call('SADD', KEYS[6], abandoned)
end
redis.call('SET', KEYS[1], version)
return version
"""


class IdentityRefusedError(StoreError):
    """The commit script refused updates whose senders the job's identities no longer accept."""

    def __init__(self, refused: dict[int, str]):
        super().__init__(f"updates refused at commit by the job's identities: {refused}")
        self.refused = refused  # index in the commit's ``applied`` -> reason (revoked_worker, ...)

    @classmethod
    def parse(cls, reply: str) -> IdentityRefusedError:
        """From the script's ``IDENTITY <index>:<reason>,...`` reply."""
        listed = reply.split("IDENTITY ", 1)[1].split()[0]
        pairs = (item.split(":", 1) for item in listed.split(","))
        return cls({int(index): reason for index, reason in pairs})


@dataclass(frozen=True)
class _Verified:
    """Weights whose bytes matched ``digest`` when they were read (or written)."""

    weights: codec.Weights
    digest: str


@dataclass(frozen=True)
class LoadedWeights:
    """Verified weights of ``version`` and how they were read.

    ``source`` is "cache" (this process held them: nothing read; worker/model_cache.py says "held"
    for its own), "diffs" (``diffs`` diffs applied to held weights) or "full" (the whole model
    read). ``bytes_read`` counts every value read from Redis, diffs that were then not used
    included. ``fallback`` says why diffs were not used when a held version could have served:
    "missing", "larger", "too_far", "denied" (the Redis user may not read diffs), "corrupt" or
    "mismatch" (a chain that did not give the expected digest).
    """

    weights: codec.Weights
    version: int
    source: str
    bytes_read: int
    diffs: int = 0
    fallback: str | None = None


def _frozen(weights: codec.Weights) -> codec.Weights:
    for array in weights.values():
        array.flags.writeable = False
    return weights


class VersionStore:
    """The job's global versions. Raises :class:`UnknownVersionError` for a version it does not hold."""

    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys
        self._commit = client.register_script(_COMMIT_SCRIPT)
        self.replication = Replication()
        self._weights_cache: OrderedDict[int, _Verified] = OrderedDict()

    def head(self) -> int | None:
        """The head version; raises :class:`TamperedVersionError` when the head is not a committed version."""
        reads = self.redis.pipeline(transaction=False)
        reads.get(self.keys.head)
        reads.xrevrange(self.keys.history, count=1)
        raw, newest = reads.execute()
        last = None if not newest else int(newest[0][1][b"version"])
        if raw is None and last is None:
            return None  # a new job
        if raw != str(last).encode():
            raise TamperedVersionError(
                f"the head of job {self.keys.job!r} is {raw and raw[:40]!r}, but the last committed version is {last}: "
                f"{self.repair_advice()}"
            )
        return last

    def last_committed(self) -> int | None:
        """The newest version in the history stream: what the head must be."""
        newest = cast(_Entries, self.redis.xrevrange(self.keys.history, count=1))
        return None if not newest else int(newest[0][1][b"version"])

    def load_weights(self, version: int, expected_digest: str | None = None) -> codec.Weights:
        """The weights of ``version``, verified against ``expected_digest`` or else the digest its
        metadata recorded; callers must not modify the returned arrays.

        Raises :class:`UnknownVersionError` when they are not stored (never committed, or
        pruned) and :class:`TamperedVersionError` when they do not match.
        """
        return self._load(version, expected_digest)[0]

    def _cached(self, version: int, expected_digest: str | None) -> codec.Weights | None:
        cached = self._weights_cache.get(version)
        if cached is not None and expected_digest in (None, cached.digest):
            self._weights_cache.move_to_end(version)
            return cached.weights
        return None

    def _load(self, version: int, expected_digest: str | None) -> tuple[codec.Weights, int]:
        """:meth:`load_weights`, and how many bytes it read (0 from the cache)."""
        cached = self._cached(version, expected_digest)
        if cached is not None:
            return cached, 0
        reads = self.redis.pipeline(transaction=False)
        reads.get(self.keys.model(version))
        reads.get(self.keys.meta(version))
        payload, meta = reads.execute()
        if payload is None:
            raise UnknownVersionError(f"job {self.keys.job!r} has no model version {version}")
        recorded = expected_digest or (VersionRecord.from_json(meta).digest if meta is not None else None)
        digest = codec.digest(payload)
        if digest != recorded:
            raise TamperedVersionError(
                f"the stored weights of version {version} of job {self.keys.job!r} do not match the digest "
                f"{'the coordinator signed' if expected_digest else 'recorded when it was committed'} "
                "(tampered with or corrupted)"
            )
        weights = _frozen(codec.decode(payload))
        self._remember(version, _Verified(weights, digest))
        return weights, len(payload)

    def load_weights_from(
        self, held_version: int | None, held_weights: codec.Weights | None, version: int, expected_digest: str
    ) -> LoadedWeights:
        """The weights of ``version``, verified against ``expected_digest``, read as the diffs from
        ``held_version`` (whose weights the caller holds) when they are stored and smaller than the
        full weights, and in full otherwise (or when ``held_version`` is None or not older).

        Weights rebuilt from diffs are returned only when their digest is ``expected_digest``;
        anything else about the diffs (missing, larger, unreadable, not permitted, a wrong result)
        falls back to :meth:`load_weights`, whose errors are the caller's as usual.
        """
        cached = self._cached(version, expected_digest)
        if cached is not None:
            return LoadedWeights(cached, version, "cache", 0)
        spent = 0
        fallback = None
        if held_version is None or held_weights is None or held_version >= version:
            pass
        elif version - held_version > MAX_DIFF_CHAIN:
            fallback = "too_far"
        else:
            chain = range(held_version + 1, version + 1)
            rebuilt, spent, fallback = self._through_diffs(held_weights, chain, version, expected_digest)
            if rebuilt is not None:
                self._remember(version, _Verified(rebuilt, expected_digest))
                return LoadedWeights(rebuilt, version, "diffs", spent, diffs=len(chain))
        weights, read = self._load(version, expected_digest)
        return LoadedWeights(weights, version, "full", spent + read, fallback=fallback)

    def _through_diffs(
        self, weights: codec.Weights, chain: range, version: int, expected_digest: str
    ) -> tuple[codec.Weights | None, int, str | None]:
        """(the weights rebuilt through the diffs of ``chain``, or None; bytes read; why not)."""
        try:
            sizes = self.redis.pipeline(transaction=False)
            for step in chain:
                sizes.strlen(self.keys.model_diff(step))
            sizes.strlen(self.keys.model(version))
            *diff_sizes, full_size = sizes.execute()
            if not full_size or not all(diff_sizes):
                return None, 0, "missing"
            if sum(diff_sizes) >= full_size:
                return None, 0, "larger"
            reads = self.redis.pipeline(transaction=False)
            for step in chain:
                reads.get(self.keys.model_diff(step))
            diffs = cast("list[bytes | None]", reads.execute())
        except redis.ResponseError:  # NOPERM: a worker's grant from before diffs existed
            return None, 0, "denied"
        spent = sum(len(diff) for diff in diffs if diff is not None)
        if any(diff is None for diff in diffs):  # trimmed since the sizes were read
            return None, spent, "missing"
        try:
            for diff in diffs:
                weights = downlink.apply_diff(weights, cast(bytes, diff))
        except downlink.DiffError:
            return None, spent, "corrupt"
        if codec.weights_digest(weights) != expected_digest:
            return None, spent, "mismatch"
        return _frozen(weights), spent, None

    def save_diff(self, version: int, diff: bytes) -> None:
        """Store the diff from ``version - 1`` to ``version`` (after ``version`` is committed)."""
        self.redis.set(self.keys.model_diff(version), diff)

    def publish_diff(self, previous_weights: codec.Weights, new_weights: codec.Weights, version: int) -> int:
        """Make and store the diff from ``previous_weights`` (version ``version - 1``) to
        ``new_weights`` (``version``, just committed); its size, or 0 when it was not stored because
        it is not smaller than the weights themselves (no worker would read it).

        Call it after the commit and never let it fail one: a missing diff only makes workers
        read the full weights. Raises DiffError when the versions' tensors differ.
        """
        diff = downlink.make_diff(previous_weights, new_weights)
        if len(diff) >= sum(array.nbytes for array in new_weights.values()):
            return 0
        self.save_diff(version, diff)
        return len(diff)

    def digest_of(self, version: int) -> str:
        """The recorded sha256 of ``version``'s weights (what tasks sign and workers check)."""
        cached = self._weights_cache.get(version)
        return cached.digest if cached is not None else self.load_meta(version).digest

    def restore(self, version: int) -> bool:
        """Write back ``version``'s weights from this process's verified copy if the stored bytes
        differ from it; True when it did. A copy exists for recent versions this process committed
        or read (the coordinator's head among them)."""
        cached = self._weights_cache.get(version)
        if cached is None:
            return False
        stored = cast("bytes | None", self.redis.get(self.keys.model(version)))
        if stored is not None and codec.digest(stored) == cached.digest:
            return False
        payload = codec.encode(cached.weights)
        if codec.digest(payload) != cached.digest:
            return False
        self.redis.set(self.keys.model(version), payload)
        return True

    def verify(self, version: int) -> bool | None:
        """Whether the stored weights of ``version`` match their recorded digest; None when not stored."""
        try:
            self.load_weights(version)
            return True
        except UnknownVersionError:
            return None
        except (TamperedVersionError, codec.CodecError, RecordError):
            return False

    def last_good_version(self, below: int | None = None, search: int = 1000) -> int | None:
        """The newest version (below ``below``) whose weights are stored and verify, looking back ``search``."""
        newest = self.last_committed() if below is None else below - 1
        if newest is None:
            return None
        for version in range(newest, max(newest - search, -1), -1):
            if self.verify(version):
                return version
        return None

    def repair_advice(self) -> str:
        """The command that makes the newest good version the head again."""
        good = self.last_good_version()
        if good is None:
            return "no stored version verifies; start the job afresh under a new --job name"
        return (
            f"make version {good} (the newest that verifies) the head again with: "
            f"fedq rollback --job {self.keys.job} {good}"
        )

    def _remember(self, version: int, weights: _Verified) -> None:
        self._weights_cache[version] = weights
        while len(self._weights_cache) > WEIGHTS_CACHE_VERSIONS:
            self._weights_cache.popitem(last=False)

    def load_meta(self, version: int) -> VersionRecord:
        """The record of ``version`` without its update list (that is in the history)."""
        raw = self.redis.get(self.keys.meta(version))
        if raw is None:
            raise UnknownVersionError(f"job {self.keys.job!r} has no model version {version}")
        return VersionRecord.from_json(raw)

    def load_optimizer_state(self, version: int) -> codec.Weights:
        payload = cast("bytes | None", self.redis.get(self.keys.optimizer_state(version)))
        return {} if payload is None else codec.decode(payload)

    def raw_head(self) -> bytes | None:
        """The head key as stored, whatever it holds (for repairing a tampered head)."""
        return cast("bytes | None", self.redis.get(self.keys.head))

    def commit(
        self,
        expected_head: int | None,
        weights: codec.Weights,
        applied: Sequence[AppliedUpdate] = (),
        *,
        update_blobs: dict[str, bytes] | None = None,
        optimizer_state: codec.Weights | None = None,
        abandon: Iterable[int] = (),
        replacing_head: bytes | None = None,
        keep_arrays: bool = False,
        senders: Sequence[tuple[str, str | None]] = (),
        require_identity: bool = False,
        open_tasks: Mapping[str, OpenTask] | None = None,
        close_tasks: Sequence[str] = (),
        **record_fields: Any,
    ) -> int:
        """Write version ``expected_head + 1`` (or 0 when there is no head) atomically; return it.

        ``applied`` lists the updates folded in, in order; their task ids become
        idempotency records and leave the in-flight set, and their blobs lose any
        TTL, in the same transaction. ``update_blobs`` are blobs to write first
        (inline deltas, kept for replay). ``abandon`` marks versions a rollback
        leaves behind. ``record_fields`` are the rest of the :class:`VersionRecord`
        (metrics, config, ...). Raises HeadMovedError when the head is no longer
        ``expected_head`` (or, when repairing a tampered head, no longer holds
        ``replacing_head``).

        ``senders`` are, in the order of ``applied``, the enrolled identity each update names and the
        RabbitMQ user that published it: once the job has enrolled identities (or
        ``require_identity``), the script checks them against the entries as they are then, and
        raises :class:`IdentityRefusedError` naming the updates refused, having written nothing.

        ``open_tasks`` and ``close_tasks`` are task ledger entries to write and remove on the way, in
        the round trip that stages the weights, before the script (the coordinator's reservations
        for the new version: see ``common/store/ledger.py``). They are written whether or not the
        script then moves the head.

        The store keeps a verified copy of the weights it committed; with ``keep_arrays`` it keeps
        ``weights`` themselves, made read-only, sparing a copy of the model (for a caller that
        is done with them, like the coordinator after its step).
        """
        version = 0 if expected_head is None else expected_head + 1
        payload = codec.encode(weights)
        record = VersionRecord.build(version, expected_head, codec.digest(payload), tuple(applied), **record_fields)
        # Everything the script references is written first. Weights go to staging keys
        # of this attempt: a writer that loses the compare-and-set must not overwrite the
        # winner's blob. A crash leaves only staged keys, which expire by themselves.
        attempt = uuid.uuid4().hex
        staged_model = self.keys.staging(version, attempt, "model")
        staged_state = self.keys.staging(version, attempt, "optstate")
        writes = self.redis.pipeline(transaction=False)
        writes.set(staged_model, payload, ex=STAGING_TTL_SECONDS)
        if optimizer_state:
            writes.set(staged_state, codec.encode(optimizer_state), ex=STAGING_TTL_SECONDS)
        for key, blob in (update_blobs or {}).items():
            writes.set(key, blob)  # keyed by task id: identical content whoever writes it
        write_changes(writes, self.keys, open_tasks or {}, close_tasks)
        writes.execute()
        try:
            keys = [
                self.keys.head,
                self.keys.meta(version),
                self.keys.history,
                self.keys.applied,
                self.keys.inflight,
                self.keys.abandoned,
                staged_model,
                self.keys.model(version),
                staged_state,
                self.keys.optimizer_state(version),
                self.keys.identities,
            ]
            args = [
                replacing_head.decode(errors="replace")
                if replacing_head is not None
                else ""
                if expected_head is None
                else str(expected_head),
                str(version),
                record.meta_json(),
                record.entry_json(),
                json.dumps([update.task_id for update in applied]),
                json.dumps([update.blob_key for update in applied]),
                json.dumps([int(version) for version in abandon]),
                "1" if optimizer_state else "0",
                json.dumps([list(sender) for sender in senders]),
                "1" if require_identity else "0",
            ]
            if self.replication.replicas:
                # WAIT follows the script on its connection: one pipeline.
                pipe = self.redis.pipeline(transaction=False)
                self._commit(keys=keys, args=args, client=pipe)
                self.replication.wait_in(pipe)
                _, acknowledged = pipe.execute()
                self.replication.check(acknowledged, f"version {version} of job {self.keys.job!r}")
            else:
                # The script alone, one EVALSHA (in a pipeline, redis-py asks SCRIPT EXISTS first).
                self._commit(keys=keys, args=args)
        except redis.ResponseError as error:
            if "HEADMOVED" in str(error):
                raise HeadMovedError(
                    f"job {self.keys.job!r}: head moved ({error}); is another coordinator running?"
                ) from None
            if "IDENTITY " in str(error):
                self.redis.delete(staged_model, staged_state, *(update_blobs or {}))
                raise IdentityRefusedError.parse(str(error)) from None
            raise
        kept = dict(weights) if keep_arrays else {name: array.copy() for name, array in weights.items()}
        self._remember(version, _Verified(_frozen(kept), record.digest))
        return version

    def await_replicas(self) -> None:
        """Return once the replicas required hold everything the master holds now (a write, then
        ``WAIT`` on its connection); raise :class:`NotReplicatedError` if they do not in time."""
        if not self.replication.replicas:
            return
        probe = self.redis.pipeline(transaction=False)
        probe.set(self.keys.replication_probe, str(time.time()))
        self.replication.wait_in(probe)
        _, acknowledged = probe.execute()
        self.replication.check(acknowledged, f"job {self.keys.job!r}")

    def abandoned(self) -> set[int]:
        """Versions a rollback left behind; updates computed from them are refused."""
        return {int(version) for version in self.redis.smembers(self.keys.abandoned)}

    def history(self, start_version: int = 0, end_version: int | None = None) -> list[VersionRecord]:
        """Records (with their updates) of start_version <= version <= end_version, oldest first."""
        upper = "+" if end_version is None else f"{end_version}-1"
        return [
            VersionRecord.from_json(fields[b"entry"])
            for _, fields in cast(_Entries, self.redis.xrange(self.keys.history, min=f"{start_version}-0", max=upper))
        ]

    def recent_history(self, count: int) -> list[VersionRecord]:
        """The records of the last ``count`` versions, oldest first."""
        newest_first = cast(_Entries, self.redis.xrevrange(self.keys.history, count=count))
        return [VersionRecord.from_json(fields[b"entry"]) for _, fields in reversed(newest_first)]

    def follow(
        self, blocking_client: redis.Redis, after_id: str = "0-0", block_ms: int = 500, count: int = 500
    ) -> tuple[str, list[VersionRecord]]:
        """Records committed after stream id ``after_id``, waiting up to ``block_ms`` for one.

        Needs a client without a socket timeout (``connect_redis(url, blocking=True)``).
        Returns the id to pass next time and the records, oldest first.
        """
        records = []
        streams = cast(
            "list[tuple[bytes, _Entries]] | None",
            blocking_client.xread({self.keys.history: after_id}, block=block_ms, count=count),
        )
        for _, messages in streams or []:
            for message_id, fields in messages:
                after_id = message_id.decode()
                records.append(VersionRecord.from_json(fields[b"entry"]))
        return after_id, records

    def forget(self, version: int) -> None:
        """Drop this process's cached copy of ``version`` (it left Redis for the archive)."""
        self._weights_cache.pop(version, None)
