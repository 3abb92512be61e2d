"""Downlink diffs: how many bytes a worker that holds an older version reads to get a newer one.

A 1M-parameter float32 MLP (digits28's 784-1262-10, 1,003,300 parameters, 3.8 MiB safetensors)
goes through consecutive versions, three ways:

- *trained*: real FedAsync steps: a partition of digits28 trains one local epoch from the
  current version (SGD, lr 0.05, batch 32) and the version moves by 0.6 of that delta;
- *dense*: ``x += 0.6 * d`` with ``d ~ N(0, (1e-3 |x|)^2)``, every entry changes;
- *sparse*: the same step on 5 % of the entries only (what a top-k uplink gives).

For each, the table gives the full model's size and what a worker 1, 3 and 10 versions behind
reads through the chain of consecutive diffs that Redis stores (``modeldiff:<v>``, v-1 -> v), for
the XOR and the zigzag integer-difference transforms (byte shuffle chosen by the share changed),
and for reference one direct diff across the whole gap (which the store does not keep). Then zstd
levels, byte shuffle or not, and make/apply times.

    .venv/bin/python bench/downlink.py            # ~45 s on 2 cores
    .venv/bin/python bench/downlink.py --quick    # fewer versions, no training
    .venv/bin/python bench/downlink.py --redis-url redis://localhost:6379/0   # and reads through Redis
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedq.common.wire import codec  # noqa: E402
from fedq.common.wire.downlink import SHUFFLE_FROM, TRANSFORMS, XOR, ZIGZAG, apply_diff, make_diff  # noqa: E402

MIXING_RATE = 0.6
HIDDEN = 1262  # 784 * 1262 + 1262 + 1262 * 10 + 10 = 1,003,300 parameters
BEHIND = (1, 3, 10)


def initial_weights() -> tuple[object, codec.Weights]:
    from fedq.common.tasks import load_task

    task = load_task("digits28", {"hidden": HIDDEN})
    return task, task.initial_weights(0)


def dense_step(weights: codec.Weights, rng: np.random.Generator, fraction: float = 1.0) -> codec.Weights:
    stepped = {}
    for name, array in weights.items():
        delta = (rng.standard_normal(array.shape) * 1e-3 * np.abs(array)).astype(np.float32)
        if fraction < 1.0:
            delta *= rng.random(array.shape) < fraction
        stepped[name] = (array + np.float32(MIXING_RATE) * delta).astype(np.float32)
    return stepped


def trained_versions(task, first: codec.Weights, count: int) -> list[codec.Weights]:
    from fedq.common.tasks import load_weights_into, weights_of
    from fedq.common.wire.messages import TrainSettings

    model = task.build_model()
    versions = [first]
    for index in range(count):
        current = versions[-1]
        load_weights_into(model, current)
        task.train(model, task.local_data(index % task.num_partitions), TrainSettings(seed=index))
        trained = weights_of(model)
        versions.append(
            {name: (current[name] + np.float32(MIXING_RATE) * (trained[name] - current[name])) for name in current}
        )
    return versions


def simulated_versions(first: codec.Weights, count: int, fraction: float, seed: int) -> list[codec.Weights]:
    rng = np.random.default_rng(seed)
    versions = [first]
    for _ in range(count):
        versions.append(dense_step(versions[-1], rng, fraction))
    return versions


def size_table(name: str, versions: list[codec.Weights], full: int) -> None:
    newest = len(versions) - 1
    for transform in (XOR, ZIGZAG):
        chain = [len(make_diff(versions[v - 1], versions[v], transform=transform)) for v in range(1, newest + 1)]
        cells = []
        for behind in BEHIND:
            if behind > newest:
                cells.append(f"{'-':>22}")
                continue
            chained = sum(chain[newest - behind :])
            direct = len(make_diff(versions[newest - behind], versions[newest], transform=transform))
            cells.append(f"{chained / full:>8.1%} {'(' + format(direct / full, '.1%') + ')':>9}    ")
        print(f"{name:<8} {TRANSFORMS[transform]:<7} {full / 2**20:>7.2f} MiB " + "".join(cells))


def level_table(name: str, versions: list[codec.Weights], full: int) -> None:
    """Every consecutive diff of the run at each level: their mean size and the mean time to make one."""
    pairs = list(zip(versions, versions[1:]))
    for level in (1, 3, 6, 9, 19):
        started = time.perf_counter()
        size = sum(len(make_diff(older, newer, level=level)) for older, newer in pairs)
        elapsed = (time.perf_counter() - started) / len(pairs)
        print(f"{name:<8} level {level:>2}  {size / len(pairs) / full:>7.1%}  make {1000 * elapsed:>7.1f} ms")


def shuffle_table(name: str, versions: list[codec.Weights], full: int) -> None:
    """Every consecutive diff of the run, byte-shuffled or not: their mean size."""
    pairs = list(zip(versions, versions[1:]))
    sizes = {
        label: sum(len(make_diff(older, newer, shuffle=shuffle)) for older, newer in pairs) / len(pairs) / full
        for label, shuffle in (("shuffled", True), ("as is", False), ("auto", None))
    }
    print(f"{name:<8} " + "   ".join(f"{label} {size:>6.1%}" for label, size in sizes.items()))


def timing_table(name: str, older: codec.Weights, newer: codec.Weights) -> None:
    for transform in (XOR, ZIGZAG):
        makes, applies = [], []
        for _ in range(5):
            started = time.perf_counter()
            diff = make_diff(older, newer, transform=transform)
            made = time.perf_counter()
            result = apply_diff(older, diff)
            applies.append(time.perf_counter() - made)
            makes.append(made - started)
        assert all(
            np.array_equal(result[k].reshape(-1).view(np.uint32), newer[k].reshape(-1).view(np.uint32)) for k in newer
        )
        started = time.perf_counter()
        codec.weights_digest(result)
        digest = time.perf_counter() - started
        print(
            f"{name:<8} {TRANSFORMS[transform]:<7} make {1000 * statistics.median(makes):>6.1f} ms   "
            f"apply {1000 * statistics.median(applies):>6.1f} ms   (verifying the digest: {1000 * digest:.1f} ms)"
        )


def redis_table(url: str, runs: dict[str, list[codec.Weights]]) -> None:
    """The runs committed to a throwaway job, each diff published after its commit; then what a
    fresh worker process reads, and how long it takes, for the newest version in full and from
    a version 1 and 3 behind (``load_weights_from``: diffs when they pay, else in full)."""
    from fedq.common.store import ModelStore

    for name, versions in runs.items():
        job = f"bench-downlink-{uuid.uuid4().hex[:8]}"
        store = ModelStore.open(url, job)
        try:
            head, publish = store.versions.commit(None, versions[0]), []
            for version in versions[1:]:
                head = store.versions.commit(head, version)
                started = time.perf_counter()
                store.versions.publish_diff(versions[head - 1], version, head)
                publish.append(time.perf_counter() - started)
            digest = store.versions.digest_of(head)
            cells = [f"publish {1000 * statistics.median(publish):>5.1f} ms"]
            for behind in (None, 1, 3):
                worker = ModelStore.open(url, job).versions
                held = None if behind is None else head - behind
                started = time.perf_counter()
                loaded = worker.load_weights_from(held, None if held is None else versions[held], head, digest)
                elapsed = time.perf_counter() - started
                label = "full" if behind is None else f"{behind} behind"
                cells.append(f"{label}: {loaded.source} {loaded.bytes_read / 2**20:.2f} MiB {1000 * elapsed:>5.1f} ms")
            print(f"{name:<8} " + "   ".join(cells))
        finally:
            store.delete_job()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=10, help="consecutive versions after the first")
    parser.add_argument("--quick", action="store_true", help="3 versions, no training")
    parser.add_argument("--redis-url", help="also time a worker's reads through this Redis (a throwaway job)")
    args = parser.parse_args()
    count = 3 if args.quick else args.versions
    task, first = initial_weights()
    full = len(codec.encode(first))
    print(f"model: digits28 MLP 784-{HIDDEN}-10, {codec.num_parameters(first):,} float32 parameters, {full:,} bytes")
    runs = {
        "dense": simulated_versions(first, count, 1.0, seed=1),
        "sparse": simulated_versions(first, count, 0.05, seed=2),
    }
    if not args.quick:
        runs = {"trained": trained_versions(task, first, count), **runs}
    print("\nbytes read for the newest version, as a share of the full model: chain of stored diffs (direct diff)")
    print(f"{'steps':<8} {'diff':<7} {'full':>11} " + "".join(f"{f'{b} behind':>22}" for b in BEHIND))
    for name, versions in runs.items():
        size_table(name, versions, full)
    print("\nzstd level (zigzag, auto shuffle): mean over the run's consecutive diffs")
    for name, versions in runs.items():
        level_table(name, versions, full)
    print(f"\nbyte shuffle (zigzag, level 1), mean over the consecutive diffs; auto: from {SHUFFLE_FROM:.0%} changed")
    for name, versions in runs.items():
        shuffle_table(name, versions, full)
    print("\nmake_diff / apply_diff, one version behind (medians of 5)")
    for name, versions in runs.items():
        timing_table(name, versions[-2], versions[-1])
    if args.redis_url:
        print(f"\na worker's read of the newest version through {args.redis_url} (one measurement each)")
        redis_table(args.redis_url, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
