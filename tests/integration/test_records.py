"""The history as the record: replay, show, export, rollback, and both tiers (real Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedq.common.records import AppliedUpdate
from fedq.common.tasks import load_task
from fedq.common.wire import codec
from fedq.coordinator.algorithms.aggregation import BufferedUpdate
from fedq.coordinator.algorithms.step import build_aggregator, build_optimizer, config_digest, server_step
from fedq.coordinator.ops.replay import replay
from fedq.coordinator.service.settings import CoordinatorSettings
from tests.support import REDIS_URL, ROOT, fedq_side_by_side, publish_job

TASK = "linear"


def build_history(store, versions: int, algorithm: str = "fedbuff", optimizer: str = "adam", seed: int = 0):
    """Commit ``versions`` versions the way the coordinator does, from random updates."""
    rng = np.random.default_rng(seed)
    settings = CoordinatorSettings(
        job=store.job,
        amqp_url="",
        redis_url="",
        algorithm=algorithm,
        buffer_size=2,
        server_optimizer=optimizer,
        server_lr=0.01,
    )
    config = settings.aggregation_config()
    aggregator, server_optimizer = build_aggregator(config), build_optimizer(config)
    publish_job(store, TASK, commit=False)
    weights = load_task(TASK).initial_weights(0)
    head = store.versions.commit(None, weights, metrics={}, config=config)
    state: codec.Weights = {}
    for _ in range(versions):
        updates, blobs, applied = [], {}, []
        for _ in range(aggregator.buffer_size):
            task_id = f"task-{rng.integers(1 << 62):x}"
            base = int(max(0, head - rng.integers(0, 3)))
            delta = {name: rng.normal(0, 0.1, array.shape).astype(np.float32) for name, array in weights.items()}
            payload = codec.encode(delta)
            update = BufferedUpdate(task_id, "w", base, head - base, int(rng.integers(10, 100)), delta)
            updates.append(update)
            blobs[store.blobs.key(task_id, "w")] = payload
        weights, state, update_weights = server_step(
            aggregator, server_optimizer, weights, state, updates, store.versions.load_weights
        )
        for update, weight in zip(updates, update_weights):
            applied.append(
                AppliedUpdate(
                    task_id=update.task_id,
                    worker_id="w",
                    base_version=update.base_version,
                    staleness=update.staleness,
                    weight=weight,
                    num_examples=update.num_examples,
                    digest=codec.digest(blobs[store.blobs.key(update.task_id, "w")]),
                    blob_key=store.blobs.key(update.task_id, "w"),
                )
            )
        head = store.versions.commit(
            head,
            weights,
            applied,
            update_blobs=blobs,
            optimizer_state=state,
            metrics={"r2": 0.5},
            config=config,
            config_digest=config_digest(config),
        )
    return head


def fedq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("algorithm, optimizer", [("fedbuff", "adam"), ("fedasync", "sgd"), ("fedbuff", "yogi")])
def test_replay_verifies_every_version_bit_for_bit(store, algorithm, optimizer):
    head = build_history(store, 12, algorithm, optimizer)
    result = replay(store, 0, head)
    assert result.ok and result.verified == list(range(1, head + 1))
    assert replay(store, 5, 9).verified == [6, 7, 8, 9]


def test_replay_reports_the_first_divergence(store):
    from fedq.coordinator.ops.replay import ReplayError

    head = build_history(store, 8)
    blob_key = store.versions.history(5, 5)[0].updates[0].blob_key
    original = store.blobs.get(blob_key)
    tampered = codec.decode(original)
    first = next(iter(tampered))
    tampered[first].flat[0] += 1.0
    store.redis.set(blob_key, codec.encode(tampered))
    with pytest.raises(ReplayError, match="version 5: the blob of update .* does not match its recorded digest"):
        replay(store, 0, head)
    store.redis.set(blob_key, original)
    assert replay(store, 0, head).ok

    # A recorded config that no longer matches what produced version 6: a divergence,
    # reported at version 6 with the tensors that differ.
    meta = store.versions.load_meta(6)
    store.redis.set(store.keys.meta(6), replace(meta, config=dict(meta.config, server_lr=0.02)).meta_json())
    result = replay(store, 0, head)
    assert not result.ok
    assert result.verified == [1, 2, 3, 4, 5]
    assert result.divergence.version == 6
    assert set(result.divergence.differences) == set(store.versions.load_weights(6))
    assert all(0 < difference < 1 for difference in result.divergence.differences.values())
    assert "version 6 diverges" in result.divergence.describe()


def test_show_history_and_export_commands(store, job, tmp_path):
    head = build_history(store, 4)
    output = tmp_path / "model.safetensors"
    flags = ["--job", job, "--redis-url", REDIS_URL]
    listing, as_json, shown, exported, missing = fedq_side_by_side(  # none of them writes to the job
        ["history", *flags],
        ["history", *flags, "--json"],
        ["show", *flags, "3"],
        ["export", *flags, "3", "-o", str(output)],
        ["show", *flags, "99"],
    )
    assert listing.returncode == 0, listing.stderr
    assert f"Redis memory of job '{job}'" in listing.stdout
    assert len([line for line in listing.stdout.splitlines() if line.strip()[:1].isdigit()]) == head + 1
    lines = as_json.stdout.splitlines()
    assert [json.loads(line)["version"] for line in lines] == list(range(head + 1))
    assert shown.returncode == 0 and "2 update(s) applied, in order" in shown.stdout
    for update in store.versions.history(3, 3)[0].updates:
        assert update.task_id in shown.stdout
    assert exported.returncode == 0, exported.stderr
    model = load_task(TASK).build_model()
    model.load_state_dict(load_file(str(output)))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, torch.from_numpy(store.versions.load_weights(3)[name].copy()))
    assert missing.returncode == 1 and "has no version 99 (its head is" in missing.stderr


def test_rollback_is_a_new_version_and_replays(store, job):
    head = build_history(store, 6)
    result = fedq("rollback", "--job", job, "--redis-url", REDIS_URL, "2")
    assert result.returncode == 0, result.stderr
    assert store.versions.head() == head + 1
    assert codec.weights_digest(store.versions.load_weights(head + 1)) == store.versions.load_meta(2).digest
    assert store.versions.abandoned() == set(range(3, head + 1))
    assert len(store.versions.history()) == head + 2, "history is appended to, never rewritten"
    assert replay(store, 0, head + 1).ok
    assert fedq("replay", "--job", job, "--redis-url", REDIS_URL).returncode == 0


def test_history_commands_read_both_tiers_after_fedq_archive(store, job, tmp_path):
    head = build_history(store, 14)
    archive = str(tmp_path / "archive")
    moved = fedq(
        "archive",
        "--job",
        job,
        "--redis-url",
        REDIS_URL,
        "--archive",
        archive,
        "--hot-versions",
        "3",
        "--checkpoint-every",
        "5",
    )
    assert moved.returncode == 0, moved.stderr
    assert f"archive holds versions 0..{head}; {head + 1 - 3} version(s) left Redis" in moved.stdout
    for version in range(head + 1):
        in_redis = version > head - 3
        assert bool(store.redis.exists(store.keys.model(version))) == in_redis, version
        assert bool(store.redis.exists(store.keys.meta(version))) == in_redis, version
    assert store.redis.xlen(store.keys.history) == 3
    # Every reader finds the archive by itself (no --archive): the URL was recorded in Redis.
    store.status.record_archive(archive, 3, 5)
    flags = ["--job", job, "--redis-url", REDIS_URL]
    replayed, shown, listed, exported = fedq_side_by_side(  # none of them writes to the job
        ["replay", *flags],
        ["show", *flags, "--json", "3"],
        ["history", *flags, "--json"],
        ["export", *flags, "7", "-o", str(tmp_path / "v7.safetensors")],
    )
    assert replayed.returncode == 0 and f"all {head} verified bit for bit" in replayed.stdout, replayed.stderr
    assert shown.returncode == 0 and len(json.loads(shown.stdout)["updates"]) == 2
    assert [json.loads(line)["version"] for line in listed.stdout.splitlines()] == list(range(head + 1))
    assert exported.returncode == 0, exported.stderr  # 7 is no checkpoint: recomputed from 5
    digest = codec.weights_digest(
        {name: tensor.numpy() for name, tensor in load_file(str(tmp_path / "v7.safetensors")).items()}
    )
    from fedq.common.store.tiers import TieredHistory, open_job_archive

    assert digest == TieredHistory(store, open_job_archive(store)).meta(7).digest
    rolled = fedq("rollback", "--job", job, "--redis-url", REDIS_URL, "6")
    assert rolled.returncode == 0, rolled.stderr
    replayed, report = fedq_side_by_side(["replay", *flags], ["report", *flags, "-o", str(tmp_path / "report.html")])
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert report.returncode == 0 and f"({head + 2} versions" in report.stdout, report.stderr


def test_a_writer_that_loses_the_compare_and_set_changes_nothing(store):
    from fedq.common.store import HeadMovedError

    head = build_history(store, 3)
    winner_digest = store.versions.load_meta(head).digest
    keys_before = set(store.redis.scan_iter(match=store.keys.all()))
    loser = {name: array + 1.0 for name, array in store.versions.load_weights(head).items()}
    with pytest.raises(HeadMovedError):
        store.versions.commit(head - 1, loser, optimizer_state={"m.x": np.ones(2, np.float32)})
    assert store.versions.head() == head
    assert codec.digest(store.redis.get(store.keys.model(head))) == winner_digest
    staged = set(store.redis.scan_iter(match=store.keys.staging_pattern()))
    assert all(0 < store.redis.ttl(key) <= 3600 for key in staged), "a loser's staged blobs must expire"
    assert set(store.redis.scan_iter(match=store.keys.all())) - keys_before == staged
