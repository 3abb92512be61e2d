"""The Redis model store: every global version, its history, and the job's bookkeeping.

Key layout (all keys of one job share the hash tag ``{job}`` so they live in one
Redis Cluster slot and a Lua script may touch them together)::

    fedq:{job}:spec              JSON: task plugin, its parameters, training settings
    fedq:{job}:head              the current global version number
    fedq:{job}:model:<v>         safetensors bytes of version v (immutable once head passed it)
    fedq:{job}:meta:<v>          JSON metadata of version v (parent, digest, staleness, metrics, ...)
    fedq:{job}:history           stream, one entry per version, listing every update applied
    fedq:{job}:applied           hash task_id -> version that applied it (idempotency record)
    fedq:{job}:inflight          hash task_id -> JSON {version, issued_at} of dispatched tasks
    fedq:{job}:update:<task_id>  weight delta of one update: a TTL while it is a pending claim
                                 check, kept (for replay) once applied, until retention prunes it
    fedq:{job}:abandoned         set of versions left behind by a rollback
    fedq:{job}:pruned_through    retention has handled every version up to this one
    fedq:{job}:worker:<id>       JSON liveness of one worker (host, tasks done, last seen), short TTL
    fedq:{job}:staging:<v>:<attempt>:model|optstate   weights of a commit in progress (TTL)
    fedq:{job}:counters          hash: rejected.<reason> / skipped.<reason> -> count
    fedq:{job}:optstate:<v>      safetensors server-optimizer state after version v (stateful optimizers)
    fedq:{job}:state             JSON {status, reason, ...}: running / finished

A version is committed by first SETting its weights blob under a staging key of
this attempt (with a TTL), then running one Lua script that checks the expected
head and only then renames the blob to ``model:<v>``, moves the head, writes the
metadata, appends the history entry and records the applied task ids. A crash
before the script leaves only a staged blob that expires; a crash after it
leaves a complete version; a writer that loses the compare-and-set touches
nothing of the winner's.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np
import redis

from common import codec

# Versions are immutable, so cached weights never go stale; a few cover the
# staleness window FedAsync needs (it mixes against the update's base version).
WEIGHTS_CACHE_VERSIONS = 8

_COMMIT_SCRIPT = """
local head = redis.call('GET', KEYS[1])
if (head or '') ~= ARGV[1] then
  return redis.error_reply('HEADMOVED ' .. (head or 'none'))
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


# Staged weights of a commit attempt that died before its script ran expire after this.
STAGING_TTL_SECONDS = 3600
# Errors after which waiting and retrying can succeed (Redis restarting, network blip).
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class StoreError(RuntimeError):
    """Redis is unreachable or holds something we cannot use; the message is for the user."""


class HeadMovedError(StoreError):
    """Another writer committed first: the compare-and-set of the head failed."""


class UnknownVersionError(StoreError):
    pass


def connect_redis(url: str, *, blocking: bool = False) -> redis.Redis:
    """A client for ``url``; ``blocking`` clients have no socket timeout (for XREAD BLOCK)."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=None if blocking else 30,
                                      socket_connect_timeout=5, health_check_interval=30)
        client.ping()
    except ValueError as error:
        raise StoreError(f"Redis URL {url!r} is not valid: {error}") from None
    except redis.RedisError as error:
        raise StoreError(f"cannot reach Redis at {url}: {error}") from None
    return client


class ModelStore:
    """All Redis state of one job. Methods raise :class:`StoreError` subclasses, never KeyError."""

    def __init__(self, client: redis.Redis, job: str):
        self.redis = client
        self.job = job
        self.prefix = f"fedq:{{{job}}}:"
        self._commit = client.register_script(_COMMIT_SCRIPT)
        self._weights_cache: OrderedDict[int, codec.Weights] = OrderedDict()

    def key(self, *parts: Any) -> str:
        return self.prefix + ":".join(str(part) for part in parts)

    # -- the job's spec ---------------------------------------------------

    def load_spec(self) -> dict[str, Any] | None:
        raw = self.redis.get(self.key("spec"))
        return None if raw is None else json.loads(raw)

    def save_spec(self, spec: dict[str, Any]) -> None:
        self.redis.set(self.key("spec"), json.dumps(spec, sort_keys=True))

    # -- versions ---------------------------------------------------------

    def head(self) -> int | None:
        raw = self.redis.get(self.key("head"))
        return None if raw is None else int(raw)

    def load_weights(self, version: int) -> codec.Weights:
        """The weights of ``version``; callers must not modify the returned arrays."""
        cached = self._weights_cache.get(version)
        if cached is not None:
            self._weights_cache.move_to_end(version)
            return cached
        payload = self.redis.get(self.key("model", version))
        if payload is None:
            raise UnknownVersionError(f"job {self.job!r} has no model version {version}")
        weights = codec.decode(payload)
        for array in weights.values():
            array.flags.writeable = False
        self._remember(version, weights)
        return weights

    def _remember(self, version: int, weights: codec.Weights) -> None:
        self._weights_cache[version] = weights
        while len(self._weights_cache) > WEIGHTS_CACHE_VERSIONS:
            self._weights_cache.popitem(last=False)

    def load_meta(self, version: int) -> dict[str, Any]:
        raw = self.redis.get(self.key("meta", version))
        if raw is None:
            raise UnknownVersionError(f"job {self.job!r} has no model version {version}")
        return json.loads(raw)

    def commit(self, expected_head: int | None, weights: codec.Weights, meta: dict[str, Any],
               applied: list[dict[str, Any]], *, update_blobs: dict[str, bytes] | None = None,
               optimizer_state: codec.Weights | None = None, abandon: Iterable[int] = ()) -> int:
        """Write version ``expected_head + 1`` (or 0 when there is no head) atomically.

        ``applied`` lists the updates folded in, in order, each with its
        ``task_id`` and ``blob_key``; their task ids become idempotency records
        and leave the in-flight set, and their blobs lose any TTL, in the same
        transaction. ``update_blobs`` are blobs to write first (inline deltas,
        kept for replay). ``abandon`` marks versions a rollback leaves behind.
        Raises HeadMovedError when the head is no longer
        ``expected_head``.
        """
        version = 0 if expected_head is None else expected_head + 1
        payload = codec.encode(weights)
        meta = {**meta, "version": version, "parent": expected_head, "digest": codec.digest(payload),
                "created": meta.get("created", time.time()), "updates_applied": len(applied)}
        entry = {**meta, "updates": applied}
        # Everything the script references is written first. Weights go to staging keys
        # of this attempt: a writer that loses the compare-and-set must not overwrite the
        # winner's blob. A crash leaves only staged keys, which expire by themselves.
        attempt = uuid.uuid4().hex
        staged_model = self.key("staging", version, attempt, "model")
        staged_state = self.key("staging", version, attempt, "optstate")
        writes = self.redis.pipeline(transaction=False)
        writes.set(staged_model, payload, ex=STAGING_TTL_SECONDS)
        if optimizer_state:
            writes.set(staged_state, codec.encode(optimizer_state), ex=STAGING_TTL_SECONDS)
        for key, blob in (update_blobs or {}).items():
            writes.set(key, blob)  # keyed by task id: identical content whoever writes it
        writes.execute()
        try:
            self._commit(
                keys=[self.key("head"), self.key("meta", version), self.key("history"),
                      self.key("applied"), self.key("inflight"), self.key("abandoned"),
                      staged_model, self.key("model", version), staged_state, self.key("optstate", version)],
                args=["" if expected_head is None else str(expected_head), str(version),
                      json.dumps(meta, sort_keys=True), json.dumps(entry, sort_keys=True),
                      json.dumps([update["task_id"] for update in applied]),
                      json.dumps([update["blob_key"] for update in applied]),
                      json.dumps([int(version) for version in abandon]), "1" if optimizer_state else "0"])
        except redis.ResponseError as error:
            if "HEADMOVED" in str(error):
                raise HeadMovedError(f"job {self.job!r}: head moved ({error}); is another coordinator running?") from None
            raise
        frozen = {name: array.copy() for name, array in weights.items()}
        for array in frozen.values():
            array.flags.writeable = False
        self._remember(version, frozen)
        return version

    def abandoned_versions(self) -> set[int]:
        """Versions a rollback left behind; updates computed from them are refused."""
        return {int(version) for version in self.redis.smembers(self.key("abandoned"))}

    def history(self, start_version: int = 0, end_version: int | None = None) -> list[dict[str, Any]]:
        """History entries with start_version <= version <= end_version, oldest first."""
        upper = "+" if end_version is None else f"{end_version}-1"
        return [json.loads(fields[b"entry"])
                for _, fields in self.redis.xrange(self.key("history"), min=f"{start_version}-0", max=upper)]

    def load_optimizer_state(self, version: int) -> codec.Weights:
        payload = self.redis.get(self.key("optstate", version))
        return {} if payload is None else codec.decode(payload)

    def set_state(self, **state: Any) -> None:
        self.redis.set(self.key("state"), json.dumps({**state, "updated": time.time()}))

    def load_state(self) -> dict[str, Any]:
        raw = self.redis.get(self.key("state"))
        return {} if raw is None else json.loads(raw)

    def recent_history(self, count: int) -> list[dict[str, Any]]:
        """The last ``count`` history entries, oldest first."""
        newest_first = self.redis.xrevrange(self.key("history"), count=count)
        return [json.loads(fields[b"entry"]) for _, fields in reversed(newest_first)]

    # -- idempotency and in-flight tasks ---------------------------------

    def applied_version(self, task_id: str) -> int | None:
        raw = self.redis.hget(self.key("applied"), task_id)
        return None if raw is None else int(raw)

    def record_dispatch(self, task_id: str, version: int, issued_at: float) -> None:
        self.redis.hset(self.key("inflight"), task_id,
                        json.dumps({"version": version, "issued_at": issued_at}))

    def in_flight(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(self.key("inflight"))
        return {task_id.decode(): json.loads(value) for task_id, value in raw.items()}

    def forget_tasks(self, task_ids: Iterable[str]) -> None:
        task_ids = list(task_ids)
        if task_ids:
            self.redis.hdel(self.key("inflight"), *task_ids)

    # -- claim-checked update blobs ---------------------------------------

    def update_key(self, task_id: str) -> str:
        return self.key("update", task_id)

    def put_update_blob(self, task_id: str, payload: bytes, ttl_seconds: int) -> str:
        key = self.update_key(task_id)
        self.redis.set(key, payload, ex=ttl_seconds)
        return key

    def get_blob(self, key: str) -> bytes | None:
        return self.redis.get(key)

    # -- worker liveness ---------------------------------------------------

    def touch_worker(self, worker_id: str, info: dict[str, Any], ttl_seconds: int) -> None:
        """Say that ``worker_id`` is alive; the key disappears ``ttl_seconds`` after the last call."""
        self.redis.set(self.key("worker", worker_id), json.dumps({**info, "last_seen": time.time()}),
                       ex=ttl_seconds)

    def forget_worker(self, worker_id: str) -> None:
        self.redis.delete(self.key("worker", worker_id))

    def live_workers(self) -> list[dict[str, Any]]:
        """Workers seen within their liveness TTL, by id."""
        keys = sorted(self.redis.scan_iter(match=self.key("worker", "*"), count=1000))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(value) for value in values if value is not None]

    # -- counters ---------------------------------------------------------

    def count(self, outcome: str, reason: str) -> None:
        """Count an update that was not applied: outcome 'rejected' (dead-lettered) or 'skipped'."""
        self.redis.hincrby(self.key("counters"), f"{outcome}.{reason}", 1)

    def counters(self, outcome: str) -> dict[str, int]:
        """reason -> count for one outcome."""
        prefix = outcome + "."
        return {name.decode()[len(prefix):]: int(count)
                for name, count in self.redis.hgetall(self.key("counters")).items()
                if name.decode().startswith(prefix)}

    # -- retention and memory ---------------------------------------------

    def prune(self, head: int, keep_last: int, checkpoint_every: int) -> list[int]:
        """Delete the weights, optimizer state and update blobs of old versions.

        Kept: the last ``keep_last`` versions and every version divisible by
        ``checkpoint_every`` (0: no checkpoints). Metadata and history entries
        are always kept: they are small and say how each version came to be.
        Returns the versions pruned now.
        """
        pruned_through = int(self.redis.get(self.key("pruned_through")) or -1)
        last_to_prune = head - keep_last
        pruned = []
        for version in range(pruned_through + 1, last_to_prune + 1):
            if checkpoint_every and version % checkpoint_every == 0:
                continue
            entries = self.history(version, version)
            blob_keys = [update["blob_key"] for entry in entries for update in entry["updates"]
                         if update.get("blob_key")]
            self.redis.delete(self.key("model", version), self.key("optstate", version), *blob_keys)
            self._weights_cache.pop(version, None)
            pruned.append(version)
        if last_to_prune > pruned_through:
            self.redis.set(self.key("pruned_through"), last_to_prune)
        return pruned

    def memory_usage(self) -> dict[str, int]:
        """Bytes Redis uses for this job, by kind of key (model, meta, update, history, ...)."""
        usage: dict[str, int] = {}
        for key in self.redis.scan_iter(match=self._match_all(), count=1000):
            kind = key.decode()[len(self.prefix):].split(":", 1)[0]
            usage[kind] = usage.get(kind, 0) + int(self.redis.memory_usage(key, samples=0) or 0)
        return usage

    def _match_all(self) -> str:
        # Job names are validated to hold no glob characters (see common.settings).
        return self.prefix + "*"

    def delete_job(self) -> int:
        """Remove every key of the job (tests, and `fedq demo` starting afresh)."""
        keys = list(self.redis.scan_iter(match=self._match_all(), count=1000))
        return self.redis.delete(*keys) if keys else 0


def weights_equal(first: codec.Weights, second: codec.Weights) -> bool:
    return first.keys() == second.keys() and all(np.array_equal(first[name], second[name]) for name in first)
