"""Leasing a built-in task's data partitions so that N live workers train on N distinct ones.

Before leases, a worker took ``crc32(worker id) % partitions``: three workers saw three
arbitrary partitions, two of them often the same, and the rest of the data was never
learnt. Now the coordinator, the one writer, reads the workers' liveness records: each
worker that asks (``partition_source == "lease"``) gets the lowest partition that no live
worker holds, by its lease or by its own ``--partition`` flag. A lease ends when its worker's
liveness key does (a clean stop at once, a crash after the liveness TTL), and the partition
goes to the next worker that asks. With more workers than partitions, the extra ones share
the least-held partitions, and the coordinator says so.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LeasePlan:
    leases: dict[str, int]       # worker id -> partition, to write
    releases: list[str]          # worker ids whose lease ends
    shared: dict[str, int]       # the new leases of a partition someone else holds too


def plan_leases(current: dict[str, int], live: list[dict[str, Any]], num_partitions: int) -> LeasePlan:
    """What to change so that every live worker asking for a lease holds one, as few shared as can be."""
    # Earliest first: a worker that was there before keeps the low partitions it had.
    asking = [record["worker_id"] for record in sorted(live, key=lambda record: (record.get("started", 0),
                                                                                   record["worker_id"]))
              if record.get("partition_source") == "lease"]
    releases = [worker for worker in current if worker not in asking]
    held = Counter(partition for worker, partition in current.items()
                   if worker in asking and 0 <= partition < num_partitions)
    for record in live:  # a worker's own --partition is taken as well
        if record.get("partition_source") == "flag" and isinstance(record.get("partition"), int):
            held[record["partition"] % num_partitions] += 1
    leases, shared = {}, {}
    for worker in asking:
        if worker in current and 0 <= current[worker] < num_partitions:
            continue
        partition = min(range(num_partitions), key=lambda candidate: (held[candidate], candidate))
        if held[partition]:
            shared[worker] = partition
        held[partition] += 1
        leases[worker] = partition
    return LeasePlan(leases, releases, shared)
