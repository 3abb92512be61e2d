"""Does fedq's synchronous FedAvg need as many rounds as FedAvg in one process, on the same data?

The setting of the Flower digits baseline: digits, Dirichlet(0.5) over 10 partitions, 10
workers (each its own partition), 1 local epoch, batch 32, learning rate 0.05, an MLP
64-128-10, every client in every round, target 0.90 test accuracy.

- *single process*: plain FedAvg with the task plugin's own training: each round, every
  partition trains from the global model, and the example-weighted mean is the next model.
- *fedq*: a real federation (``fedq coordinator --algorithm fedavg --concurrency 10`` and ten
  ``fedq worker --partition i`` processes, through RabbitMQ and Redis), whose rounds are now
  fair: each worker trains at most once per round, so every partition is in every round.

Both draw fresh local-training seeds each round, so each is repeated (``--repeats``) and the
medians are compared.

    .venv/bin/python bench/fedavg_rounds.py --repeats 5      # ~90 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.async_vs_sync_config import TaskSpec  # noqa: E402
from bench.async_vs_sync_run import run_one  # noqa: E402
from bench.harness import stop_all  # noqa: E402

PARAMS = {"num_partitions": 10, "alpha": 0.5, "hidden": 128}
TRAINING = ("--local-epochs", "1", "--batch-size", "32", "--learning-rate", "0.05")
TARGET = 0.90
MAX_ROUNDS = 300


def single_process_rounds(seed: int) -> int | None:
    import numpy as np
    import torch

    from fedq.common.tasks import load_task, load_weights_into, weights_of
    from fedq.common.wire.messages import TrainSettings

    torch.set_num_threads(1)
    task = load_task("digits", PARAMS)
    weights = task.initial_weights(0)
    model = task.build_model()
    rng = np.random.default_rng(seed)
    data = [task.local_data(index) for index in range(PARAMS["num_partitions"])]
    for round_number in range(1, MAX_ROUNDS + 1):
        total = sum(len(part) for part in data)
        mean = {name: np.zeros_like(array) for name, array in weights.items()}
        for part in data:
            load_weights_into(model, weights)
            task.train(
                model, part, TrainSettings(epochs=1, batch_size=32, learning_rate=0.05, seed=int(rng.integers(2**31)))
            )
            for name, array in weights_of(model).items():
                mean[name] += array * (len(part) / total)
        weights = mean
        if task.evaluate(load_weights_into(model, weights))["accuracy"] >= TARGET:
            return round_number
    return None


def fedq_rounds(args: argparse.Namespace, log_root: Path) -> int | None:
    spec = TaskSpec(
        "digits-flower",
        "digits",
        PARAMS,
        workers=10,
        target=TARGET,
        training=TRAINING,
        preload=("fedq.common.tasks.digits", "sklearn.datasets"),
    )
    result = run_one(
        spec,
        "fair",
        "sync",
        budget=240.0,
        concurrency=10,
        seed=0,
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        log_root=log_root,
        arm_flags=["--algorithm", "fedavg", "--target", str(TARGET)],
        worker_flags=[[] for _ in range(10)],
    )
    _, _, version = result.time_to_target()
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    log_root = Path(tempfile.mkdtemp(prefix="fedq-fedavg-rounds-"))
    single, federated = [], []
    try:
        for repeat in range(args.repeats):
            single.append(single_process_rounds(seed=repeat))
            federated.append(fedq_rounds(args, log_root))
            print(f"repeat {repeat}: single process {single[-1]} rounds, fedq {federated[-1]} rounds", flush=True)
    finally:
        stop_all()

    def median(values: list[int | None]) -> str:
        reached = [value for value in values if value is not None]
        return f"{statistics.median(reached):g}" if len(reached) == len(values) else f"{len(reached)} of {len(values)}"

    print(
        json.dumps(
            {
                "single_process_rounds": single,
                "fedq_rounds": federated,
                "median_single": median(single),
                "median_fedq": median(federated),
                "logs": str(log_root),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
