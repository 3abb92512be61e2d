"""Every Redis key name of a job, in one place.

All keys of one job share the hash tag ``{job}`` so they live in one Redis
Cluster slot and one Lua script may touch them together::

    fedq:{job}:spec              JSON job description, signed: task name, parameters, seed, tensors, public key
    fedq:{job}:signing_key       the coordinator's Ed25519 private key (raw 32 bytes): the coordinator's alone
    fedq:{job}:head              the current global version number
    fedq:{job}:model:<v>         safetensors bytes of version v (immutable once head passed it)
    fedq:{job}:modeldiff:<v>     exact compressed difference from version v-1's weights to v's
                                 (common/wire/downlink.py), for workers that hold v-1; written after
                                 v is committed, may be missing; removed with model:<v>
    fedq:{job}:meta:<v>          JSON metadata of version v (parent, digest, staleness, metrics, ...)
    fedq:{job}:optstate:<v>      safetensors server-optimizer state after version v (stateful optimizers)
    fedq:{job}:history           stream, one entry per version, listing every update applied
    fedq:{job}:abandoned         set of versions left behind by a rollback
    fedq:{job}:pruned_through    every version up to this one has left the hot tier (its records and blobs
                                 are in the archive only; see coordinator/service/archiver.py)
    fedq:{job}:archive           JSON {url, hot_versions, checkpoint_every, redis_budget_mb}: how history is kept
    fedq:{job}:archived_through  the archive holds every version up to this one
    fedq:{job}:archiver_lock     held by the one archiver moving the job's history (a redis-py Lock)
    fedq:{job}:staging:<v>:<attempt>:model|optstate   weights of a commit in progress (TTL)
    fedq:{job}:applied           hash task_id -> version that applied it (idempotency record)
    fedq:{job}:inflight          hash task_id -> JSON {version, issued_at}: tasks issued and not closed
    fedq:{job}:update:<worker_id>:<task_id>  weight delta of one update, under its worker's id (a
                                 worker's Redis user may write only its own): the claim check, with a TTL
    fedq:{job}:delta:<worker_id>:<task_id>   the same delta once the coordinator read it: the claim check is
                                 renamed here (inline deltas are written here at commit), where no worker
                                 may write, so a delta cannot change after it was verified; kept (for
                                 replay) once applied, until it is archived
    fedq:{job}:worker:<id>       JSON liveness of one worker (host, tasks done, last seen), short TTL
    fedq:{job}:partitions        hash worker_id -> the data partition the coordinator leased to it
    fedq:{job}:partition:<id>    that worker's partition, alone: the one key of the lease its worker may read
    fedq:{job}:fleet             hash worker_id -> JSON of what the coordinator measured of it (speed,
                                 expected staleness, updates applied and rejected)
    fedq:{job}:identities        hash worker_id -> JSON identity enrolled by `fedq admin` (user, revoked_at)
    fedq:{job}:counters          hash: rejected.<reason> / skipped.<reason> -> count
    fedq:{job}:state             JSON {status, reason, ...}: running / stopped / finished
    fedq:{job}:replication_probe the time of a coordinator's last check that the replicas it requires
                                 (--redis-wait-replicas) hold everything: a write for WAIT to count
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobKeys:
    job: str

    @property
    def prefix(self) -> str:
        return f"fedq:{{{self.job}}}:"

    def _key(self, *parts: Any) -> str:
        return self.prefix + ":".join(str(part) for part in parts)

    def all(self) -> str:
        """A SCAN pattern for every key of the job (job names hold no glob characters)."""
        return self.prefix + "*"

    def kind(self, key: str) -> str:
        """The kind of one of the job's keys: 'model', 'meta', 'update', ..."""
        return key[len(self.prefix) :].split(":", 1)[0]

    spec = property(lambda self: self._key("spec"))
    signing_key = property(lambda self: self._key("signing_key"))
    head = property(lambda self: self._key("head"))
    history = property(lambda self: self._key("history"))
    abandoned = property(lambda self: self._key("abandoned"))
    pruned_through = property(lambda self: self._key("pruned_through"))
    archive = property(lambda self: self._key("archive"))
    archived_through = property(lambda self: self._key("archived_through"))
    archiver_lock = property(lambda self: self._key("archiver_lock"))
    applied = property(lambda self: self._key("applied"))
    inflight = property(lambda self: self._key("inflight"))
    counters = property(lambda self: self._key("counters"))
    state = property(lambda self: self._key("state"))
    replication_probe = property(lambda self: self._key("replication_probe"))
    identities = property(lambda self: self._key("identities"))
    partitions = property(lambda self: self._key("partitions"))
    fleet = property(lambda self: self._key("fleet"))

    def model(self, version: int) -> str:
        return self._key("model", version)

    def model_diff(self, version: int) -> str:
        """The diff from version ``version - 1`` to ``version``."""
        return self._key("modeldiff", version)

    def meta(self, version: int) -> str:
        return self._key("meta", version)

    def optimizer_state(self, version: int) -> str:
        return self._key("optstate", version)

    def staging(self, version: int | str, attempt: str, kind: str) -> str:
        return self._key("staging", version, attempt, kind)

    def staging_pattern(self) -> str:
        return self._key("staging", "*")

    def update(self, worker_id: str, task_id: str) -> str:
        return self._key("update", worker_id, task_id)

    def delta(self, worker_id: str, task_id: str) -> str:
        return self._key("delta", worker_id, task_id)

    def worker(self, worker_id: str) -> str:
        return self._key("worker", worker_id)

    def partition(self, worker_id: str) -> str:
        return self._key("partition", worker_id)

    def worker_pattern(self) -> str:
        return self._key("worker", "*")
