"""Downlink diffs in Redis: a worker that holds an older version reads the diffs to a newer one
when they are stored and smaller, and the full weights whenever they are missing, larger, damaged
or not permitted; whatever it read, it gets exactly the committed weights."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from fedq.common.store import ModelStore, TamperedVersionError, connect_redis
from fedq.common.store.archive import Archive
from fedq.common.wire import codec
from fedq.common.wire.downlink import make_diff
from fedq.coordinator.ops.roles import grant
from fedq.coordinator.service.archiver import Archiver
from fedq.worker.model_cache import HeldVersions
from tests.private_servers import PrivateRedis
from tests.support import REDIS_URL

SHAPES = {"hidden.weight": (256, 300), "hidden.bias": (256,), "out.weight": (10, 256), "out.bias": (10,)}


def initial(seed: int = 0) -> codec.Weights:
    rng = np.random.default_rng(seed)
    return {name: (rng.uniform(-1, 1, shape) / np.sqrt(shape[-1])).astype(np.float32) for name, shape in SHAPES.items()}


def step(weights: codec.Weights, seed: int, fraction: float) -> codec.Weights:
    """0.6 of a relative step of ~1e-3 on ``fraction`` of the entries (FedAsync; top-k when sparse)."""
    rng = np.random.default_rng(seed)
    stepped = {}
    for name, array in weights.items():
        delta = (rng.standard_normal(array.shape) * 1e-3 * np.abs(array)).astype(np.float32)
        delta *= rng.random(array.shape) < fraction
        stepped[name] = (array + np.float32(0.6) * delta).astype(np.float32)
    return stepped


def commit_versions(store: ModelStore, count: int, fraction: float, publish: bool = True) -> list[codec.Weights]:
    """Versions 0..count-1, each a step from the last, with the diff to each published after its commit."""
    versions = [initial()]
    head = store.versions.commit(None, versions[0])
    for index in range(1, count):
        versions.append(step(versions[-1], index, fraction))
        head = store.versions.commit(head, versions[-1])
        assert head == index
        if publish:
            assert store.versions.publish_diff(versions[-2], versions[-1], head) > 0
    return versions


def worker_side(store: ModelStore) -> ModelStore:
    """The job as a worker process sees it: its own connection, nothing cached."""
    return ModelStore(connect_redis(REDIS_URL), store.job)


def assert_exact(got: codec.Weights, want: codec.Weights) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32
        assert np.array_equal(got[name].reshape(-1).view(np.uint32), want[name].reshape(-1).view(np.uint32)), name


def full_size(store: ModelStore, version: int) -> int:
    return int(store.redis.strlen(store.keys.model(version)))


def diff_size(store: ModelStore, version: int) -> int:
    return int(store.redis.strlen(store.keys.model_diff(version)))


def test_a_worker_holding_an_older_version_reads_only_the_diffs(store):
    versions = commit_versions(store, 6, fraction=0.05)
    held = HeldVersions(worker_side(store).versions)
    first = held.load_counted(1, store.versions.digest_of(1))
    assert first.source == "full" and first.bytes_read == full_size(store, 1)
    assert_exact(first.weights, versions[1])

    loaded = held.load_counted(3, store.versions.digest_of(3))
    assert (loaded.source, loaded.diffs, loaded.fallback) == ("diffs", 2, None)
    assert loaded.bytes_read == diff_size(store, 2) + diff_size(store, 3)
    assert loaded.bytes_read < 0.2 * full_size(store, 3)  # two 5 %-sparse steps: ~5 % each
    assert_exact(loaded.weights, versions[3])
    assert held.held() == [1, 3]

    assert_exact(held.load(5, store.versions.digest_of(5)), versions[5])  # from 3: two more diffs
    assert held.held() == [3, 5]  # the newest two
    again = held.load_counted(5, store.versions.digest_of(5))
    assert again.source == "held" and again.bytes_read == 0
    stats = held.stats
    assert (stats.full_loads, stats.diff_loads, stats.loads["held"]) == (1, 2, 1)
    assert stats.bytes_read == full_size(store, 1) + sum(diff_size(store, version) for version in (2, 3, 4, 5))
    assert not stats.fallbacks

    # An older version than any held is read in full.
    older = held.load_counted(2, store.versions.digest_of(2))
    assert older.source == "full" and older.fallback is None
    assert_exact(older.weights, versions[2])


def test_a_missing_diff_means_a_full_read(store):
    versions = commit_versions(store, 4, fraction=0.05)
    store.redis.delete(store.keys.model_diff(2))  # a coordinator that died between commit and publish
    held = HeldVersions(worker_side(store).versions)
    held.load(1, store.versions.digest_of(1))
    loaded = held.load_counted(3, store.versions.digest_of(3))
    assert (loaded.source, loaded.fallback) == ("full", "missing")
    assert loaded.bytes_read == full_size(store, 3)  # the diffs' sizes were checked, not read
    assert_exact(loaded.weights, versions[3])
    assert held.stats.fallbacks == {"missing": 1}


def test_a_chain_larger_than_the_model_means_a_full_read(store):
    versions = commit_versions(store, 6, fraction=1.0)  # dense steps: each diff ~half the model
    assert all(0.3 < diff_size(store, version) / full_size(store, version) < 0.7 for version in range(1, 6))
    worker = worker_side(store)
    loaded = worker.versions.load_weights_from(1, versions[1], 4, store.versions.digest_of(4))
    assert (loaded.source, loaded.fallback) == ("full", "larger")
    assert loaded.bytes_read == full_size(store, 4)
    assert_exact(loaded.weights, versions[4])
    # One version behind, the dense diff still pays.
    one = worker_side(store).versions.load_weights_from(4, versions[4], 5, store.versions.digest_of(5))
    assert (one.source, one.diffs) == ("diffs", 1) and one.bytes_read == diff_size(store, 5)
    assert_exact(one.weights, versions[5])


def test_a_tampered_diff_is_never_trained_on(store):
    versions = commit_versions(store, 4, fraction=0.05)
    # A well-formed diff to other weights: it applies, and the result's digest gives it away.
    forged = step(versions[2], 99, fraction=0.05)
    store.redis.set(store.keys.model_diff(3), make_diff(versions[2], forged))
    held = HeldVersions(worker_side(store).versions)
    held.load(1, store.versions.digest_of(1))
    loaded = held.load_counted(3, store.versions.digest_of(3))
    assert (loaded.source, loaded.fallback) == ("full", "mismatch")
    assert loaded.bytes_read == diff_size(store, 2) + diff_size(store, 3) + full_size(store, 3)
    assert_exact(loaded.weights, versions[3])

    # Damaged bytes are refused before anything is computed from them.
    garbage = bytearray(store.redis.get(store.keys.model_diff(2)))
    garbage[len(garbage) // 2] ^= 0xFF
    store.redis.set(store.keys.model_diff(2), bytes(garbage))
    worker = worker_side(store)
    corrupt = worker.versions.load_weights_from(1, versions[1], 2, store.versions.digest_of(2))
    assert (corrupt.source, corrupt.fallback) == ("full", "corrupt")
    assert_exact(corrupt.weights, versions[2])

    # A digest the chain does not give (a task for other weights): neither tier meets it.
    with pytest.raises(TamperedVersionError):
        worker_side(store).versions.load_weights_from(2, versions[2], 3, "0" * 64)


def test_a_diff_no_smaller_than_the_model_is_not_stored(store):
    head = store.versions.commit(None, initial(0))
    rng = np.random.default_rng(1)
    # Random bit patterns: nothing to compress, the diff is a little larger than the weights.
    unrelated = {
        name: rng.integers(0, 2**32, array.shape, np.uint32).view(np.float32) for name, array in initial(0).items()
    }
    head = store.versions.commit(head, unrelated)
    assert store.versions.publish_diff(initial(0), unrelated, head) == 0
    assert not store.redis.exists(store.keys.model_diff(head))


def test_diffs_leave_redis_with_their_versions(store, tmp_path):
    commit_versions(store, 8, fraction=0.05)
    Archiver(store, Archive(str(tmp_path / "archive")).job(store.job), hot_versions=3, checkpoint_every=4).run_once()
    pruned = int(store.redis.get(store.keys.pruned_through))
    assert pruned == 4
    for version in range(1, 8):
        in_redis = version > pruned
        assert bool(store.redis.exists(store.keys.model(version))) == in_redis, version
        assert bool(store.redis.exists(store.keys.model_diff(version))) == in_redis, version
    assert "modeldiff" in store.memory_usage()


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    """A Redis of this module's own, whose ACL users the tests may create."""
    with PrivateRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.mark.parametrize("old_grant", [False, True])
def test_a_worker_reads_diffs_through_its_acl_and_a_grant_from_before_diffs_reads_in_full(private_redis, old_grant):
    job = "downlink-" + uuid.uuid4().hex[:8]
    admin = ModelStore(private_redis.client(), job)
    versions = commit_versions(admin, 4, fraction=0.05)
    rules = grant("worker", job, "alice").redis_rules
    if old_grant:  # enrolled before this change: no STRLEN, no modeldiff:* pattern
        rules = tuple(rule for rule in rules if "modeldiff" not in rule and rule != "+strlen")
    user = private_redis.add_user(f"alice-{job}", rules=rules)
    worker = ModelStore(private_redis.client(user.user, user.password), job)
    held = HeldVersions(worker.versions)
    held.load(1, admin.versions.digest_of(1))
    loaded = held.load_counted(3, admin.versions.digest_of(3))
    assert_exact(loaded.weights, versions[3])
    if old_grant:
        assert (loaded.source, loaded.fallback) == ("full", "denied")
        assert not held.use_diffs  # no second refusal per task
        assert held.load_counted(3, admin.versions.digest_of(3)).source == "held"
    else:
        assert (loaded.source, loaded.diffs) == ("diffs", 2)
