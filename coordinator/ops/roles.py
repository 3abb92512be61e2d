"""The three roles of a job and exactly what each may do on RabbitMQ and Redis.

Pure data: :mod:`fedq.coordinator.ops.admin` applies it through the RabbitMQ management API
and Redis ``ACL SETUSER``; docs/security.md explains it. A role is granted per job:

- **coordinator**: the job's exchanges and queues (declare, bind, publish, consume, delete),
  and every Redis key of the job.
- **worker** (one per worker id): consume the job's task queue; publish to the job's update
  exchange (with its own user as ``user_id``: RabbitMQ refuses any other) and dead-letter
  exchange (a task it refuses, with the reason); read the job's description, model versions (and
  the diffs between them) and their metadata and the partition leased to it; write only its own
  update blobs and its own liveness key. It never reads the
  signing key, the ledger or the history, and never writes the head, a version or another
  worker's keys.
- **monitor**: read-only: queue depths through the management API, and every key of the job
  but the signing key.

Names come from :func:`fedq.common.store.identities.identity_user`; a worker id must match
:data:`ENROLLABLE_WORKER_ID` (it becomes part of a user name and of Redis key patterns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedq.broker.topology import Topology
from fedq.common.store.identities import ENROLLABLE_WORKER_ID
from fedq.common.store.keys import JobKeys

ROLES = ("worker", "coordinator", "monitor")
NOTHING = "^$"  # a RabbitMQ permission pattern no resource name matches

# Commands every client needs to connect; nothing of @connection beyond that, which would include
# CLIENT KILL. (redis-py also sends CLIENT SETINFO, which Redis 7.0 does not know and redis-py
# does without when refused: naming it here would make ACL SETUSER fail on 7.0.)
CONNECT_COMMANDS = ("+ping", "+hello", "+auth", "+client|setname", "+client|id", "+select")
# STRLEN: the sizes of the model diffs it could read instead of a version's weights.
# (WAIT: a worker waits for --redis-wait-replicas replicas to hold its update blob)
WORKER_COMMANDS = ("+get", "+set", "+del", "+strlen", "+wait")
MONITOR_COMMANDS = (
    "+get",
    "+mget",
    "+strlen",
    "+exists",
    "+type",
    "+ttl",
    "+hget",
    "+hgetall",
    "+hlen",
    "+hmget",
    "+smembers",
    "+scard",
    "+sismember",
    "+xrange",
    "+xrevrange",
    "+xlen",
    "+scan",
    "+memory|usage",
)
# The coordinator runs Lua commits and WATCH/MULTI, scans its own keys; nothing server-wide.
COORDINATOR_COMMANDS = ("+@all", "-@dangerous", "-@admin", "-@pubsub", "+memory|usage")
# Every kind of key of a job except the signing key (see fedq.common.store.keys).
READABLE_KINDS = (
    "spec",
    "head",
    "model:*",
    "modeldiff:*",
    "meta:*",
    "optstate:*",
    "history",
    "abandoned",
    "pruned_through",
    "archive",
    "archived_through",
    "applied",
    "inflight",
    "update:*",
    "delta:*",
    "worker:*",
    "counters",
    "state",
    "identities",
    "staging:*",
    "partitions",
    "partition:*",
    "fleet",
)


class RoleError(ValueError):
    """A role or name that cannot be provisioned; the message is one sentence."""


@dataclass(frozen=True)
class RabbitPermissions:
    configure: str
    write: str
    read: str
    tags: str = ""  # management tags: "management" lets a user read its vhosts through the API


@dataclass(frozen=True)
class Grant:
    role: str
    name: str  # the worker id, or the coordinator's / monitor's name
    rabbitmq: RabbitPermissions
    redis_rules: tuple[str, ...]  # ACL SETUSER rules after "reset on >password"


def _alternatives(*names: str) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def grant(role: str, job: str, name: str) -> Grant:
    """What ``role`` ``name`` may do in ``job``."""
    if role not in ROLES:
        raise RoleError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if not ENROLLABLE_WORKER_ID.fullmatch(name):
        raise RoleError(
            f"{name!r} cannot be enrolled: use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    topology, keys = Topology(job), JobKeys(job)
    if role == "worker":
        rabbitmq = RabbitPermissions(
            configure=NOTHING, write=_alternatives(topology.updates, topology.dead), read=_alternatives(topology.tasks)
        )
        # Its own blobs and liveness, and those of its replicas (worker ids "<name>.<replica>").
        patterns = (
            *(f"%R~{keys.prefix}{kind}" for kind in ("spec", "model:*", "modeldiff:*", "meta:*")),
            f"%W~{keys.update(name, '*')}",
            f"%W~{keys.update(name + '.*', '*')}",
            f"~{keys.worker(name)}",
            f"~{keys.worker(name + '.*')}",
            f"%R~{keys.partition(name)}",
            f"%R~{keys.partition(name + '.*')}",
        )
        return Grant(role, name, rabbitmq, ("resetchannels", *patterns, "-@all", *CONNECT_COMMANDS, *WORKER_COMMANDS))
    if role == "coordinator":
        everything = _alternatives(*topology.queues)
        return Grant(
            role,
            name,
            RabbitPermissions(everything, everything, everything),
            ("resetchannels", f"~{keys.all()}", *COORDINATOR_COMMANDS, *CONNECT_COMMANDS),
        )
    return Grant(
        role,
        name,
        RabbitPermissions(NOTHING, NOTHING, NOTHING, tags="management"),
        (
            "resetchannels",
            *(f"%R~{keys.prefix}{kind}" for kind in READABLE_KINDS),
            "-@all",
            *CONNECT_COMMANDS,
            *MONITOR_COMMANDS,
        ),
    )
