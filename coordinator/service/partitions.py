"""Leasing a built-in task's data partitions so that N live workers train on N distinct ones.

Before leases, a worker took ``crc32(worker id) % partitions``: three workers saw three
arbitrary partitions, two of them often the same, and the rest of the data was never
learnt. Now the coordinator, the one writer, reads the workers' liveness records: each
worker that asks (``partition_source == "lease"``) gets the lowest partition that no live
worker holds, by its lease or by its own ``--partition`` flag. A lease ends when its worker's
liveness key does (a clean stop at once, a crash after the liveness TTL), and the partition
goes to the next worker that asks. With more workers than partitions, the extra ones share
the least-held partitions, and the coordinator says so.

A worker that names its partition with a flag may come up after a leased worker was given
that same partition (it imports torch, connects over TLS, ...). The flag is the user's word,
so the leased worker moves: a lease that shares its partition while another partition is
held by nobody is re-leased to the free one (the newest such worker first, so early workers
keep their data). Workers read their lease before every task, so the move takes effect at
the next task.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LeasePlan:
    leases: dict[str, int]  # worker id -> partition, to write
    releases: list[str]  # worker ids whose lease ends
    shared: dict[str, int]  # the new leases of a partition someone else holds too
    moved: dict[str, int]  # worker id -> its previous partition, for leases that moved


def plan_leases(current: dict[str, int], live: list[dict[str, Any]], num_partitions: int) -> LeasePlan:
    """What to change so that every live worker asking for a lease holds one, as few shared as can be."""
    # Earliest first: a worker that was there before keeps the low partitions it had.
    asking = [
        record["worker_id"]
        for record in sorted(live, key=lambda record: (record.get("started", 0), record["worker_id"]))
        if record.get("partition_source") == "lease"
    ]
    releases = [worker for worker in current if worker not in asking]
    held = Counter(
        partition for worker, partition in current.items() if worker in asking and 0 <= partition < num_partitions
    )
    for record in live:  # a worker's own --partition is taken as well
        if record.get("partition_source") == "flag" and isinstance(record.get("partition"), int):
            held[record["partition"] % num_partitions] += 1
    leases, shared, moved = {}, {}, {}
    partition: int | None
    for worker in asking:
        if worker in current and 0 <= current[worker] < num_partitions:
            continue
        partition = min(range(num_partitions), key=lambda candidate: (held[candidate], candidate))
        if held[partition]:
            shared[worker] = partition
        held[partition] += 1
        leases[worker] = partition
    for worker in reversed(asking):  # newest first: a shared lease moves to a partition nobody holds
        partition = leases.get(worker, current.get(worker))
        free = [candidate for candidate in range(num_partitions) if not held[candidate]]
        if not free or partition is None or held[partition] < 2:
            continue
        held[partition] -= 1
        held[free[0]] += 1
        if worker in current and worker not in leases:
            moved[worker] = partition
        leases[worker] = free[0]
        shared.pop(worker, None)
    return LeasePlan(leases, releases, shared, moved)
