"""``compression.py``'s in-process microbenchmark: the CPU cost of the uplink encodings and the
downlink diffs, against one local training step of the same model.

- *Training step*: one minibatch (the run's batch size, 16) forward, backward and SGD step of the
  task's model on one thread (workers call ``torch.set_num_threads(1)``), median of ``repeats``.
- *Deltas*: real ones. Partitions 0, 1 and 2 each train one task (the run's 2 epochs, batch 16,
  learning rate) from the initial model; the uplink codecs encode partition 0's delta.
- *Uplink*: ``Compression.encode`` (what a worker sends), ``compression.decode`` (what the
  coordinator and replay run on every update) and ``Compression.roundtrip`` (encode and decode:
  what a worker with error feedback runs), medians of ``repeats``; the payload's size and its
  relative L2 error ``|decoded - delta| / |delta|``.
- *Downlink*: one FedBuff K=3 step, the mean of the three deltas as each arm's workers would send
  them (none and int8: dense; topk 1 % and 10 %: sparse, each delta's own top-k), and
  ``make_diff`` (the coordinator, once per version) / ``apply_diff`` (a worker one version behind)
  between the two versions; the diff's size against the full weights'.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from bench.async_vs_sync_config import TaskSpec
from fedq.common.wire import codec
from fedq.common.wire.compression import Compression, decode
from fedq.common.wire.downlink import apply_diff, make_diff

METHODS = ("none", "fp16", "bf16", "int8", "topk:fraction=0.01", "topk:fraction=0.1", "prune:fraction=0.1")
STEP_METHODS = ("none", "int8", "topk:fraction=0.01", "topk:fraction=0.1")
BUFFER_SIZE = 3


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _settings(spec: TaskSpec):
    from fedq.common.wire.messages import TrainSettings

    flags = dict(zip(spec.training[::2], spec.training[1::2]))
    return TrainSettings(
        epochs=int(flags["--local-epochs"]),
        batch_size=int(flags["--batch-size"]),
        learning_rate=float(flags["--learning-rate"]),
    )


def training_step_seconds(task, spec: TaskSpec, repeats: int) -> float:
    import torch

    settings = _settings(spec)
    model = task.build_model()
    model.train()
    data = task.local_data(0)
    features, targets = data.features[: settings.batch_size], data.targets[: settings.batch_size]
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)

    def step() -> None:
        optimizer.zero_grad()
        task.loss(model(features), targets).backward()
        optimizer.step()

    return median_seconds(step, repeats)


def trained_deltas(task, spec: TaskSpec, count: int) -> tuple[codec.Weights, list[codec.Weights]]:
    from fedq.common.tasks import load_weights_into, weights_of

    settings = _settings(spec)
    initial = task.initial_weights(0)
    deltas = []
    for partition in range(count):
        model = task.build_model()
        load_weights_into(model, initial)
        task.train(model, task.local_data(partition), settings)
        trained = weights_of(model)
        deltas.append({name: (trained[name] - initial[name]).astype(np.float32) for name in initial})
    return initial, deltas


def _norm(weights: codec.Weights) -> float:
    return float(np.sqrt(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel())) for a in weights.values())))


def measure(name: str, spec: TaskSpec, repeats: int) -> list[dict]:
    """The rows of compression_cost.csv for one model."""
    import torch

    from fedq.common.tasks import load_task

    torch.set_num_threads(1)
    task = load_task(spec.task, spec.params)
    step = training_step_seconds(task, spec, repeats * 2)
    initial, deltas = trained_deltas(task, spec, BUFFER_SIZE)
    params = codec.num_parameters(initial)
    specs = {key: (tuple(array.shape), "float32") for key, array in initial.items()}
    common = {"model": name, "params": params, "batch": _settings(spec).batch_size, "step_ms": step * 1e3}
    rows = []
    delta = deltas[0]
    none_bytes = len(Compression.parse("none").encode(delta))
    for method in METHODS:
        compression = Compression.parse(method)
        payload = compression.encode(delta)
        decoded = decode(payload, specs)[1]
        error = _norm({key: decoded[key] - delta[key] for key in delta}) / _norm(delta)
        encode_s = median_seconds(lambda c=compression: c.encode(delta), repeats)
        decode_s = median_seconds(lambda p=payload: decode(p, specs), repeats)
        roundtrip_s = median_seconds(lambda c=compression: c.roundtrip(delta), repeats)
        rows.append(
            common
            | {
                "what": "uplink",
                "method": compression.spec,
                "bytes": len(payload),
                "reference_bytes": none_bytes,
                "encode_ms": encode_s * 1e3,
                "decode_ms": decode_s * 1e3,
                "roundtrip_ms": roundtrip_s * 1e3,
                "rel_error": error,
            }
        )
    full = len(codec.encode(initial))
    for method in STEP_METHODS:
        compression = Compression.parse(method)
        sent = [compression.roundtrip(one)[1] for one in deltas]
        newer = {key: (initial[key] + sum(one[key] for one in sent) / np.float32(BUFFER_SIZE)) for key in initial}
        newer = {key: array.astype(np.float32) for key, array in newer.items()}
        diff = make_diff(initial, newer)
        assert all(np.array_equal(apply_diff(initial, diff)[key], newer[key]) for key in newer)
        rows.append(
            common
            | {
                "what": "downlink",
                "method": compression.spec,
                "bytes": len(diff),
                "reference_bytes": full,
                "make_diff_ms": median_seconds(lambda n=newer: make_diff(initial, n), repeats) * 1e3,
                "apply_diff_ms": median_seconds(lambda d=diff: apply_diff(initial, d), repeats) * 1e3,
                "changed": float(np.mean(np.concatenate([(newer[k] != initial[k]).ravel() for k in initial]))),
            }
        )
    return rows
