"""How much does a steady share of poisoned updates hurt a job, under each defence?

One real coordinator (digits, FedBuff) and honest ``fedq worker`` processes per arm, plus
Mallory: a participant in this process who takes genuine tasks off the task queue, as any
worker may, and answers them with poisoned updates so that they make ``--share`` (10 %) of
the updates sent. Each poisoned update is built from the last honest delta the job applied
(a real, current update), so the attacks are:

- ``boost``: that delta times 100 (model replacement: one update outweighs the buffer);
- ``flip``: times -5 (gradient ascent);
- ``noise``: Gaussian noise with 8 times its norm;
- ``filled``: every value 1e30 (finite, so no NaN check catches it);
- ``none``: Mallory sends nothing (the baseline of each defence).

Defences: the default (the norm bound of ``NormGuard``), no bound at all
(``--norm-outlier-factor 0``), and the bound with the coordinate-wise median (``--robust median``).
Each arm prints the final test accuracy, Mallory's share of the updates sent, how many of
hers were applied, and how far the honest updates' norms came to the bound (the largest ratio
of one to the running median of the norms accepted before it).

    .venv/bin/python bench/poisoning.py                    # 5 attacks x 3 defences x 40 s: ~12 minutes
    .venv/bin/python bench/poisoning.py --seconds 20 --attacks boost,filled --defences default
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import cleanup, fedq_command, start, stop_all  # noqa: E402
from fedq.broker.connection import connect  # noqa: E402
from fedq.broker.publisher import publish  # noqa: E402
from fedq.broker.topology import Topology  # noqa: E402
from fedq.common.store import ModelStore  # noqa: E402
from fedq.common.store.tiers import whole_history  # noqa: E402
from fedq.common.tasks import load_task, load_weights_into  # noqa: E402
from fedq.common.wire import codec  # noqa: E402
from fedq.common.wire.messages import InlineDelta, MessageError, ModelUpdate, parse_task  # noqa: E402

AMQP_URL = os.environ.get("FEDQ_AMQP_URL", "amqp://guest:guest@localhost:5672/")
REDIS_URL = os.environ.get("FEDQ_REDIS_URL", "redis://localhost:6379/0")
HONEST_WORKERS = 3
TASK_PARAMS = {"num_partitions": HONEST_WORKERS}
TRAINING = [
    "--task",
    "digits",
    "--task-params",
    json.dumps(TASK_PARAMS),
    "--algorithm",
    "fedbuff",
    "--buffer-size",
    "3",
    "--concurrency",
    "4",
    "--local-epochs",
    "1",
    "--learning-rate",
    "0.1",
    "--batch-size",
    "16",
    "--eval-every",
    "0",
]
MALLORY = "mallory"


def _noise(delta: codec.Weights, rng: np.random.Generator) -> codec.Weights:
    noise = {name: rng.standard_normal(array.shape).astype(np.float32) for name, array in delta.items()}
    scale = 8 * _norm(delta) / max(_norm(noise), 1e-12)
    return {name: array * np.float32(scale) for name, array in noise.items()}


ATTACKS = {
    "none": None,
    "boost": lambda delta, rng: {name: array * np.float32(100) for name, array in delta.items()},
    "flip": lambda delta, rng: {name: array * np.float32(-5) for name, array in delta.items()},
    "noise": _noise,
    "filled": lambda delta, rng: {name: np.full_like(array, 1e30) for name, array in delta.items()},
}
DEFENCES = {
    "default": [],
    "no bound": ["--norm-outlier-factor", "0"],
    "bound + median": ["--robust", "median"],
}


def _norm(weights: codec.Weights) -> float:
    return float(np.sqrt(sum(np.square(array, dtype=np.float64).sum() for array in weights.values())))


class Mallory(threading.Thread):
    """Takes tasks and answers them with poison whenever her share of the updates sent is below ``share``."""

    def __init__(self, job: str, store: ModelStore, attack, share: float, seed: int = 0):
        super().__init__(daemon=True)
        self.job, self.store, self.attack, self.share = job, store, attack, share
        self.rng = np.random.default_rng(seed)
        self.sent = 0
        self.honest_sent = 0  # honest updates applied so far: what her share is measured against
        self.last_honest_blob: str | None = None
        self.seen_version = 0
        self.stopping = threading.Event()

    def _follow_history(self) -> None:
        for record in self.store.versions.history(self.seen_version + 1):
            self.seen_version = record.version
            for update in record.updates:
                if update.worker_id != MALLORY:
                    self.honest_sent += 1
                    self.last_honest_blob = update.blob_key

    def run(self) -> None:
        if self.attack is None:
            return
        connection = connect(AMQP_URL)
        channel = connection.channel()
        topology = Topology(self.job)
        channel.confirm_delivery()
        try:
            while not self.stopping.is_set():
                self._follow_history()
                due = self.sent < self.share / (1 - self.share) * self.honest_sent
                if not due or self.last_honest_blob is None:
                    time.sleep(0.05)
                    continue
                method, _, body = channel.basic_get(topology.tasks, auto_ack=False)
                if method is None:
                    time.sleep(0.02)
                    continue
                try:
                    task = parse_task(body)
                except MessageError:
                    channel.basic_nack(method.delivery_tag, requeue=True)
                    continue
                honest = self.store.blobs.get(self.last_honest_blob)
                if honest is None:
                    channel.basic_nack(method.delivery_tag, requeue=True)
                    continue
                poisoned = self.attack(codec.decode(honest), self.rng)
                update = ModelUpdate(
                    job=self.job,
                    task_id=task.task_id,
                    worker_id=MALLORY,
                    base_version=task.model_version,
                    num_examples=600,
                    delta=InlineDelta(codec.encode(poisoned)),
                )
                publish(channel, topology.updates, update.to_bytes(), message_id=task.task_id)
                channel.basic_ack(method.delivery_tag)
                self.sent += 1
        finally:
            connection.close()


def largest_honest_ratio(norms: list[tuple[str, float]], window: int = 100, warmup: int = 20) -> float | None:
    """The largest ratio of an honest update's norm to the median of the accepted norms before it
    (the last ``window``, once ``warmup`` were accepted): how close honest work comes to the bound."""
    largest = None
    for index, (worker, norm) in enumerate(norms):
        before = [value for _, value in norms[max(0, index - window) : index]]
        if worker != MALLORY and len(before) >= warmup:
            ratio = norm / max(float(np.median(before)), 1e-12)
            largest = ratio if largest is None else max(largest, ratio)
    return largest


def run_arm(attack: str, defence: str, seconds: float, share: float, logs: Path) -> dict:
    job = f"bench-poison-{uuid.uuid4().hex[:8]}"
    store = ModelStore.open(REDIS_URL, job)
    connection_flags = ["--job", job, "--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]
    slug = f"{attack}-{defence.replace(' ', '').replace('+', '-')}"
    try:
        coordinator = start(
            fedq_command(
                "coordinator", *connection_flags, *TRAINING, *DEFENCES[defence], "--max-seconds", str(seconds)
            ),
            logs / f"{slug}-coordinator.log",
        )
        for index in range(HONEST_WORKERS):
            start(
                fedq_command("worker", *connection_flags, "--worker-id", f"honest-{index}", "--partition", str(index)),
                logs / f"{slug}-worker-{index}.log",
            )
        mallory = Mallory(job, store, ATTACKS[attack], share)
        mallory.start()
        # --max-seconds counts from version 0; the workers' start-up is inside it for every arm alike.
        if coordinator.wait(timeout=seconds + 600) != 0:
            raise RuntimeError(f"the coordinator failed: see {logs / f'{slug}-coordinator.log'}")
        mallory.stopping.set()
        mallory.join(timeout=30)
        head = store.versions.head()
        task = load_task("digits", TASK_PARAMS)
        accuracy = task.evaluate(load_weights_into(task.build_model(), store.versions.load_weights(head)))["accuracy"]
        history = whole_history(store)  # both tiers: the archiver moves older versions out of Redis
        applied = [update.worker_id for record in history for update in record.updates]
        hostile_applied = applied.count(MALLORY)
        norms = [
            (update.worker_id, update.norm)
            for record in history
            for update in record.updates
            if update.norm is not None
        ]
        honest_applied = len(applied) - hostile_applied
        return {
            "attack": attack,
            "defence": defence,
            "accuracy": accuracy,
            "versions": head,
            "mallory_sent": mallory.sent,
            "mallory_applied": hostile_applied,
            "honest_applied": honest_applied,
            "share": mallory.sent / max(mallory.sent + honest_applied, 1),
            "rejected": store.counters.get("rejected"),
            "honest_norm_ratio": largest_honest_ratio(norms),
        }
    finally:
        stop_all()
        cleanup(job, AMQP_URL, REDIS_URL)


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so that the services this run started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="training time of each arm (default: 40)")
    parser.add_argument("--share", type=float, default=0.10, help="Mallory's share of the updates sent (default: 0.1)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list from {', '.join(ATTACKS)}")
    parser.add_argument("--defences", default=",".join(DEFENCES), help=f"comma list from {', '.join(DEFENCES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object per arm as well")
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    defences = args.defences.split(",")
    unknown = [name for name in attacks if name not in ATTACKS] + [name for name in defences if name not in DEFENCES]
    if unknown:
        parser.error(f"unknown attack or defence {unknown[0]!r}")
    if not 0 < args.share < 1:
        parser.error("--share is a fraction between 0 and 1")
    logs = Path(tempfile.mkdtemp(prefix="fedq-poisoning-"))
    print(f"{len(attacks) * len(defences)} arms of {args.seconds:.0f} s; logs in {logs}", file=sys.stderr)
    results = []
    for attack in attacks:
        for defence in defences:
            result = run_arm(attack, defence, args.seconds, args.share, logs)
            results.append(result)
            ratio = result["honest_norm_ratio"]
            print(
                f"  {attack:>7} / {defence:<15} accuracy {result['accuracy']:.3f}  "
                f"mallory applied {result['mallory_applied']}/{result['mallory_sent']}  largest honest norm "
                f"{'-' if ratio is None else f'{ratio:.1f}x'} the running median",
                file=sys.stderr,
            )
            if args.json:
                print(json.dumps(result))
    print(f"\n{'attack':<8} " + " ".join(f"{defence:>28}" for defence in defences))
    for attack in attacks:
        cells = []
        for defence in defences:
            result = next(r for r in results if r["attack"] == attack and r["defence"] == defence)
            applied = (
                ""
                if attack == "none"
                else f" ({result['mallory_applied']}/{result['mallory_sent']} applied, {result['share']:.1%})"
            )
            cells.append(f"{result['accuracy']:.3f}{applied}")
        print(f"{attack:<8} " + " ".join(f"{cell:>28}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
