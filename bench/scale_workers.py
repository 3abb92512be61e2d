"""The simulated workers of ``scale.py``: one OS process answers for many workers, each with its own id.

``python -m bench.scale_workers SPEC`` (from the repository root; ``launch`` starts it) reads a
JSON spec: the job, the URLs, this process's worker ids, the model's tensor specs and the training
time. The process opens one pika connection and one channel, consumes the job's task queue with
prefetch = its number of workers, and hands each delivery to an idle worker id. That worker "trains"
for a random time, then answers with the all-zeros delta of ``throughput_workers.ZeroDelta``
(claim-checked in Redis for the 1M model), published with publisher confirms, and the task is acked
on the channel that received it: one task at a time per worker, as a real ``fedq worker`` does,
without 1,000 connections. Pending answers wait in a heap of due times.

Training times are uniform in mean * (1 +- spread), from a seeded RNG per process. A worker's first
task waits only what would be left of a task already under way: as if the workers had been
running for a while (the stationary residual of the renewal process: a length-biased training
time times a uniform fraction), so that updates arrive at the steady rate from the start instead
of in a wave after ``mean``.

On SIGTERM the process stops taking tasks and writes one CSV row per answered task:
task id, worker id, the task's ``issued_at`` (coordinator clock), and when this process received it,
meant to answer it, and published the answer (all ``time.time()``; one host, one clock).
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import fedq_command, start
from bench.throughput_workers import ZeroDelta
from fedq.broker.connection import connect
from fedq.broker.publisher import publish
from fedq.broker.topology import Topology
from fedq.common.store import ModelStore
from fedq.common.wire.messages import RoundTask, parse_task

STAMP_COLUMNS = ("task_id", "worker_id", "issued_at", "received_at", "due_at", "published_at")
# The longest the loop leaves the connection alone: heartbeats and new deliveries need it.
MAX_WAIT_SECONDS = 0.5


@dataclass(order=True)
class PendingAnswer:
    due_at: float
    sequence: int  # ties on due_at are broken by arrival, never by comparing tasks
    delivery_tag: int = field(compare=False)
    task: RoundTask = field(compare=False)
    worker_id: str = field(compare=False)
    received_at: float = field(compare=False)
    train_seconds: float = field(compare=False)


class SimulatedWorkers:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.topology = Topology(spec["job"])
        self.idle = list(reversed(spec["worker_ids"]))  # a stack: which worker takes the next task
        self.never_trained = set(spec["worker_ids"])
        self.rng = random.Random(spec["seed"])
        weights = {name: np.zeros(shape, dtype=dtype) for name, (shape, dtype) in spec["tensor_specs"].items()}
        self.delta = ZeroDelta(weights)  # encoded once for all of this process's workers
        self.pending: list[PendingAnswer] = []
        self.sequence = 0
        self.stamps: list[tuple[str, str, float, float, float, float]] = []
        self.stopping = False

    def training_seconds(self, worker_id: str) -> float:
        mean, spread = self.spec["mean_seconds"], self.spec["spread"]
        shortest, longest = mean * (1 - spread), mean * (1 + spread)
        if worker_id not in self.never_trained:
            return self.rng.uniform(shortest, longest)
        self.never_trained.discard(worker_id)
        # The task under way when one looks is drawn in proportion to its length (density ~ x on
        # [shortest, longest]: inverse CDF below), and a uniform fraction of it is left.
        length_biased = math.sqrt(shortest**2 + self.rng.random() * (longest**2 - shortest**2))
        return self.rng.random() * length_biased

    def received(self, _channel, method, _properties, body: bytes) -> None:
        now = time.time()
        if not self.idle:
            # Cannot happen with prefetch = number of workers; if it does, the broker over-delivered.
            raise RuntimeError(f"a task arrived while all {len(self.spec['worker_ids'])} workers were busy")
        worker_id = self.idle.pop()
        seconds = self.training_seconds(worker_id)
        self.sequence += 1
        heapq.heappush(
            self.pending,
            PendingAnswer(now + seconds, self.sequence, method.delivery_tag, parse_task(body), worker_id, now, seconds),
        )

    def answer_due(self, channel, store: ModelStore) -> None:
        while self.pending and self.pending[0].due_at <= time.time() and not self.stopping:
            answer = heapq.heappop(self.pending)
            update = self.delta.update(store, answer.task, answer.worker_id, train_seconds=answer.train_seconds)
            published_at = time.time()
            publish(channel, self.topology.updates, update.to_bytes(), message_id=update.task_id)
            channel.basic_ack(answer.delivery_tag)
            self.idle.append(answer.worker_id)
            self.stamps.append(
                (
                    answer.task.task_id,
                    answer.worker_id,
                    answer.task.issued_at,
                    answer.received_at,
                    answer.due_at,
                    published_at,
                )
            )

    def run(self) -> None:
        store = ModelStore.open(self.spec["redis_url"], self.spec["job"])
        connection = connect(self.spec["amqp_url"], name=f"fedq-bench-scale-{self.spec['index']}")
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=len(self.spec["worker_ids"]))
            channel.basic_consume(self.topology.tasks, on_message_callback=self.received)
            print("ready", flush=True)
            while not self.stopping:
                self.answer_due(channel, store)
                wait = MAX_WAIT_SECONDS
                if self.pending:
                    wait = min(wait, max(self.pending[0].due_at - time.time(), 0.0))
                # Deliveries are handed to ``received`` only from here, never inside a publish.
                connection.process_data_events(time_limit=wait)
        finally:
            self.write_stamps()
            if connection.is_open:
                connection.close()  # unanswered tasks go back to the queue

    def write_stamps(self) -> None:
        with open(self.spec["stamps_path"], "w", newline="") as stamps_file:
            writer = csv.writer(stamps_file)
            writer.writerow(STAMP_COLUMNS)
            writer.writerows(self.stamps)


# -- the parent's side -----------------------------------------------------------


def launch(spec: dict[str, Any], spec_path: Path, log_path: Path) -> subprocess.Popen:
    """Start one process of simulated workers (``harness.stop_all`` stops it) and wait until it consumes."""
    spec_path.write_text(json.dumps(spec))
    process = start(
        fedq_command(str(spec_path), module="bench.scale_workers"), log_path, stdout=subprocess.PIPE, text=True
    )
    if process.stdout is None or process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"simulated workers {spec['index']} did not start; see {log_path}")
    return process


def read_stamps(path: Path) -> list[dict[str, Any]]:
    """The rows a process wrote (empty if it wrote none: killed before it could)."""
    if not path.exists():
        return []
    with open(path, newline="") as stamps_file:
        return [
            {name: value if name in ("task_id", "worker_id") else float(value) for name, value in row.items()}
            for row in csv.DictReader(stamps_file)
        ]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python -m bench.scale_workers SPEC  (started by bench/scale.py)")
    workers = SimulatedWorkers(json.loads(Path(argv[0]).read_text()))

    def stop(_signum, _frame):
        workers.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
