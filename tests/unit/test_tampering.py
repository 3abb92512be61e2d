"""Weights and heads rewritten in Redis behind the coordinator's back are noticed, named and repairable."""

from __future__ import annotations

import numpy as np
import pytest

from fedq.common.records import AppliedUpdate
from fedq.common.store import TamperedVersionError
from fedq.common.wire import codec
from fedq.coordinator.ops.replay import replay, rollback
from tests.support import memory_store

MODEL = {"w": np.zeros(4, np.float32)}


def job_with_versions(count: int):
    """A job with versions 0..count-1, each applying one update of +1 (FedBuff, constant staleness)."""
    store = memory_store("unit")
    config = {
        "algorithm": "fedbuff",
        "concurrency": 1,
        "buffer_size": 1,
        "staleness": "constant",
        "mixing_rate": 0.6,
        "max_staleness": 5,
        "example_weighted": False,
        "clip_norm": 0.0,
        "robust": "mean",
        "trim_fraction": 0.1,
        "server_optimizer": "sgd",
        "server_lr": 1.0,
        "server_beta1": 0.9,
        "server_beta2": 0.99,
        "server_epsilon": 1e-3,
    }
    weights = MODEL
    store.versions.commit(None, weights, config=config)
    for version in range(1, count):
        delta = {"w": np.ones(4, np.float32)}
        payload = codec.encode(delta)
        task_id = f"t{version}"
        applied = AppliedUpdate(
            task_id=task_id,
            worker_id="w",
            base_version=version - 1,
            staleness=0,
            weight=1.0,
            num_examples=1,
            digest=codec.digest(payload),
            blob_key=store.blobs.key(task_id, "w"),
        )
        weights = {"w": weights["w"] + 1}
        store.versions.commit(version - 1, weights, [applied], update_blobs={applied.blob_key: payload}, config=config)
    return store


def tamper(store, version: int) -> None:
    store.redis.set(store.keys.model(version), codec.encode({"w": np.full(4, 99.0, np.float32)}))
    store.versions._weights_cache.clear()  # another process, which never saw the genuine weights


def test_overwritten_weights_are_refused_when_loaded():
    store = job_with_versions(3)
    tamper(store, 1)
    with pytest.raises(TamperedVersionError, match="version 1 .* do not match"):
        store.versions.load_weights(1)
    assert store.versions.verify(1) is False and store.versions.verify(2) is True
    assert store.versions.last_good_version() == 2


def test_replay_names_the_first_version_whose_stored_weights_differ():
    store = job_with_versions(5)
    tamper(store, 3)
    result = replay(store, 0, 4)
    assert not result.ok and result.verified == [1, 2]
    assert result.divergence.version == 3
    assert "stored weights of version 3 do not match its recorded digest" in result.divergence.describe()


def test_a_head_that_names_no_committed_version_is_reported_with_the_repair_and_rollback_repairs_it():
    store = job_with_versions(4)
    store.redis.set(store.keys.head, 1000)
    with pytest.raises(TamperedVersionError) as error:
        store.versions.head()
    assert "fedq rollback --job unit 3" in str(error.value)
    repaired = rollback(store, 3)
    assert repaired == 4 and store.versions.head() == 4
    assert np.array_equal(store.versions.load_weights(4)["w"], store.versions.load_weights(3)["w"])
    assert replay(store, 0, 4).ok


def test_a_tampered_head_version_points_the_repair_at_the_newest_good_one():
    store = job_with_versions(4)
    tamper(store, 3)
    with pytest.raises(TamperedVersionError):
        store.versions.load_weights(3)
    assert "fedq rollback --job unit 2" in store.versions.repair_advice()
    assert rollback(store, 2) == 4 and store.versions.verify(4)
