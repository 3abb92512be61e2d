"""What the coordinator measured of each worker: speed, expected staleness and contribution.

One hash, ``fedq:{job}:fleet``: worker id -> JSON :class:`WorkerRecord`. The coordinator
writes it (coordinator/service/fleet.py); `fedq status`, `monitor` and `report` read it. It
outlives liveness: a worker that left still shows what it contributed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import cast

import redis

from fedq.common.store.keys import JobKeys


@dataclass
class WorkerRecord:
    worker_id: str
    examples: int = 0  # the example count of its latest update
    applied: int = 0  # updates folded into versions
    applied_weight: float = 0.0  # the sum of the weights they got: its influence on the model
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> updates refused
    rejected_streak: int = 0  # refused in a row since its last applied update
    round_trip_s: float | None = None  # smoothed seconds from a task's issue to its update's arrival
    interval_s: float | None = None  # smoothed seconds between two of its updates' arrivals
    expected_staleness: float | None = None  # versions a task of this worker is expected to span
    steps_per_second: float | None = None  # smoothed local training speed, as the worker reports it
    seconds_per_epoch: float | None = None  # smoothed, from the same reports
    first_seen: float = 0.0
    last_arrival: float | None = None
    last_applied: float | None = None

    @classmethod
    def from_json(cls, text: bytes | str) -> WorkerRecord:
        document = json.loads(text)
        known = cls.__dataclass_fields__
        return cls(**{name: value for name, value in document.items() if name in known})


class FleetRecords:
    def __init__(self, client: redis.Redis, keys: JobKeys):
        self.redis = client
        self.keys = keys

    def load(self) -> dict[str, WorkerRecord]:
        return {
            worker.decode(): WorkerRecord.from_json(value)
            for worker, value in cast("dict[bytes, bytes]", self.redis.hgetall(self.keys.fleet)).items()
        }

    def save(self, records: list[WorkerRecord]) -> None:
        if records:
            self.redis.hset(
                self.keys.fleet, mapping={record.worker_id: json.dumps(asdict(record)) for record in records}
            )
