"""The two tiers of the history: the archiver moves old versions out of Redis without losing any,
and replay, reconstruction and rollback read across the boundary bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from fedq.common.records import AppliedUpdate
from fedq.common.store.archive import Archive, ArchiveError, model_blob, optimizer_blob
from fedq.common.store.tiers import TieredHistory
from fedq.common.wire import codec
from fedq.coordinator.algorithms.aggregation import BufferedUpdate
from fedq.coordinator.algorithms.step import build_aggregator, build_optimizer, server_step
from fedq.coordinator.ops.replay import ReplayError, reconstruct, replay, rollback
from fedq.coordinator.service import archiver as archiver_module
from fedq.coordinator.service.archiver import Archiver
from tests.support import memory_store

# FedAsync mixes against each update's base version and Adam keeps state: replay needs both
# recomputed correctly across the boundary between the tiers.
CONFIG = {
    "algorithm": "fedasync",
    "concurrency": 2,
    "buffer_size": 1,
    "staleness": "polynomial:a=0.5",
    "mixing_rate": 0.6,
    "max_staleness": 3,
    "example_weighted": False,
    "clip_norm": 0.0,
    "robust": "mean",
    "trim_fraction": 0.1,
    "server_optimizer": "adam",
    "server_lr": 0.1,
    "server_beta1": 0.9,
    "server_beta2": 0.99,
    "server_epsilon": 1e-3,
}


def build_job(count: int, job: str = "archive", rollback_at: int | None = None):
    """A job with versions 0..count-1 made by real server steps on random stale updates."""
    store = memory_store(job)
    rng = np.random.default_rng(7)
    aggregator, optimizer = build_aggregator(CONFIG), build_optimizer(CONFIG)
    weights = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    versions = {0: weights}
    state: codec.Weights = {}
    store.versions.commit(None, weights, config=CONFIG)
    for version in range(1, count):
        if version == rollback_at:
            rollback(store, version - 3)
            weights = versions[version - 3]
            state = store.versions.load_optimizer_state(version)
            versions[version] = weights
            continue
        base = int(rng.integers(max(0, version - 1 - CONFIG["max_staleness"]), version))
        while base in store.versions.abandoned():
            base += 1
        delta = {name: rng.normal(scale=0.1, size=array.shape).astype(np.float32) for name, array in weights.items()}
        task_id = f"t{version}"
        update = BufferedUpdate(
            task_id=task_id,
            worker_id="site-a",
            base_version=base,
            staleness=version - 1 - base,
            num_examples=10,
            delta=delta,
        )
        weights, state, (weight,) = server_step(aggregator, optimizer, weights, state, [update], versions.get)
        payload = codec.encode(delta)
        applied = AppliedUpdate(
            task_id=task_id,
            worker_id="site-a",
            base_version=base,
            staleness=update.staleness,
            weight=weight,
            num_examples=10,
            digest=codec.digest(payload),
            blob_key=store.blobs.key(task_id, "site-a"),
        )
        store.versions.commit(
            version - 1,
            weights,
            [applied],
            update_blobs={applied.blob_key: payload},
            optimizer_state=state,
            config=CONFIG,
        )
        versions[version] = weights
    return store


def archive_of(store, tmp_path):
    return Archive(str(tmp_path / "archive")).job(store.job)


def test_archived_history_leaves_redis_and_replays_bit_for_bit_across_the_boundary(tmp_path):
    store = build_job(40)
    archive = archive_of(store, tmp_path)
    done = Archiver(store, archive, hot_versions=5, checkpoint_every=10).run_once()
    assert done.archived_through == 39 and done.trimmed == 35  # versions 0..34 left Redis
    assert store.redis.get(store.keys.model(20)) is None and store.redis.get(store.keys.meta(20)) is None
    assert store.blobs.get(store.blobs.key("t20", "site-a")) is None
    assert store.ledger.applied_version("t20") is None and store.ledger.applied_version("t36") == 36
    assert store.blobs.get(store.blobs.key("t36", "site-a")) is None  # archived: applied blobs leave at once
    assert store.redis.xlen(store.keys.history) == 5 and store.versions.load_weights(35) is not None
    assert archive.checkpoints() == [0, 10, 20, 30]
    history = TieredHistory(store, archive)
    assert [record.version for record in history.records()] == list(range(40))
    result = replay(history, 0, 39)
    assert result.ok and result.verified == list(range(1, 40))
    # A bare store finds the archive its coordinator recorded.
    store.status.record_archive(archive.archive.url, 5, 10)
    assert replay(store, 17, 39).ok  # starts between checkpoints: recomputed from 10


def test_a_version_between_checkpoints_is_recomputed_to_its_recorded_digest(tmp_path):
    store = build_job(30)
    archive = archive_of(store, tmp_path)
    Archiver(store, archive, hot_versions=4, checkpoint_every=10).run_once()
    history = TieredHistory(store, archive)
    for version in (7, 10, 19, 25):
        assert codec.weights_digest(reconstruct(history, version)) == history.meta(version).digest


def test_rollback_to_an_archived_version_and_replay_through_it(tmp_path):
    store = build_job(30, rollback_at=12)
    archive = archive_of(store, tmp_path)
    Archiver(store, archive, hot_versions=4, checkpoint_every=10).run_once()
    history = TieredHistory(store, archive)
    assert history.meta(12).rollback_of == 9
    new_head = rollback(history, 17)  # archived, between checkpoints 10 and 20
    assert np.array_equal(store.versions.load_weights(new_head)["w"], reconstruct(history, 17)["w"])
    assert replay(history, 0, new_head).ok


def test_a_crash_at_any_step_leaves_duplicates_never_gaps(tmp_path, monkeypatch):
    """Every crash point of a pass, hit at its first and a later passing: the next pass
    completes the move and the whole history still replays."""
    points = ["archive.segment_written", "archive.cursor_moved", "archive.version_trimmed"]
    for point in points:
        for nth in (1, 3):
            store = build_job(25, job=f"crash-{point}-{nth}")
            archive = archive_of(store, tmp_path / f"{point}-{nth}")
            calls = {"n": 0}

            def crash(name, point=point, nth=nth, calls=calls):
                if name == point:
                    calls["n"] += 1
                    if calls["n"] == nth:
                        raise SystemExit(f"killed at {name}")

            monkeypatch.setattr(archiver_module, "crash_point", crash)
            mover = Archiver(store, archive, hot_versions=3, checkpoint_every=5, segment_bytes=2000)
            with pytest.raises(SystemExit):
                mover.run_once()
            assert replay(TieredHistory(store, archive), 0, 24).ok  # between the two passes too
            monkeypatch.setattr(archiver_module, "crash_point", lambda name: None)
            store.redis.delete(store.keys.archiver_lock)  # the dead holder's lock would expire by itself
            mover.run_once()
            assert store.redis.get(store.keys.pruned_through) == b"21"
            assert replay(TieredHistory(store, archive), 0, 24).ok, (point, nth)


def test_segments_are_small_when_asked_and_overlapping_ones_read_alike(tmp_path):
    store = build_job(20)
    archive = archive_of(store, tmp_path)
    mover = Archiver(store, archive, hot_versions=20, checkpoint_every=5, segment_bytes=1500)
    done = mover.run_once()
    assert len(done.archived) > 3 and done.trimmed == 0
    # A copy of a range that overlaps two segments (as when an archiver died before Redis heard
    # of its segment, and the next pass cut segments elsewhere) changes nothing.
    first, last = done.archived[-1][0] - 1, done.archived[-1][1]
    records = [archive.record(version) for version in range(first, last + 1)]
    archive.write_segment(
        records,
        [
            (name, archive.blob(record.version, name))
            for record in records
            for name in [update.blob_key for update in record.updates]
            + (
                [model_blob(record.version), optimizer_blob(record.version)]
                if mover.is_checkpoint(record.version)
                else []
            )
        ],
    )
    assert len(archive.segments(refresh=True)) == len(done.archived) + 1
    assert Archiver(store, archive, hot_versions=3, checkpoint_every=5).run_once().trimmed == 17
    assert replay(TieredHistory(store, archive), 0, 19).ok


def test_a_pass_across_history_chunks_read_batches_and_lock_renewals_moves_every_version(tmp_path, monkeypatch):
    # A pass reads the history HISTORY_CHUNK records and the blobs READ_BATCH_BYTES at a time,
    # and renews its lock by the clock: made tiny here, every boundary falls mid-segment.
    monkeypatch.setattr(archiver_module, "HISTORY_CHUNK", 7)
    monkeypatch.setattr(archiver_module, "READ_BATCH_BYTES", 700)
    monkeypatch.setattr(archiver_module, "RENEW_SECONDS", 0.0)
    store = build_job(45)
    archive = archive_of(store, tmp_path)
    reads = []
    monkeypatch.setattr(store.redis, "pipeline", _counting(store.redis.pipeline, reads))
    done = Archiver(store, archive, hot_versions=4, checkpoint_every=10, segment_bytes=3000).run_once()
    assert done.archived_through == 44 and done.trimmed == 41 and len(done.archived) > 3
    assert archive.checkpoints() == [0, 10, 20, 30, 40]
    assert [record.version for record in TieredHistory(store, archive).records()] == list(range(45))
    assert replay(TieredHistory(store, archive), 0, 44).ok
    delta_reads = [[key for name, key in batch if name == "GET" and ":update:" in key] for batch in reads]
    assert max(len(batch) for batch in delta_reads) > 1, "deltas were not read in batches"
    assert sorted(key for batch in delta_reads for key in batch) == sorted(
        store.blobs.key(f"t{version}", "site-a") for version in range(1, 45)
    ), "a delta was read twice or not at all"


def _counting(pipeline_factory, reads):
    """``client.pipeline`` whose pipelines record the (command, first argument) they execute."""

    def make(*args, **kwargs):
        pipe = pipeline_factory(*args, **kwargs)
        execute = pipe.execute

        def counted(*execute_args, **execute_kwargs):
            reads.append([(str(command[0][0]), str(command[0][1])) for command in pipe.command_stack])
            return execute(*execute_args, **execute_kwargs)

        pipe.execute = counted
        return pipe

    return make


def test_a_corrupted_segment_is_named_not_trusted(tmp_path):
    store = build_job(15)
    archive = archive_of(store, tmp_path)
    Archiver(store, archive, hot_versions=3, checkpoint_every=5).run_once()
    (segment,) = archive.segments(refresh=True)
    ref = archive.index(segment).blobs[model_blob(5)]
    with open(segment.path, "r+b") as handle:
        handle.seek(ref.offset + ref.length - 1)
        last = handle.read(1)
        handle.seek(ref.offset + ref.length - 1)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ArchiveError, match="model:5 .* does not match its digest"):
        archive.blob(5, model_blob(5))
    with pytest.raises((ReplayError, ArchiveError), match="digest"):
        replay(TieredHistory(store, archive), 5, 14)


def test_a_history_whose_archive_went_missing_says_so(tmp_path):
    store = build_job(15)
    archive = archive_of(store, tmp_path)
    Archiver(store, archive, hot_versions=3, checkpoint_every=5).run_once()
    archive.delete()
    with pytest.raises(ReplayError, match="incomplete: version 0|no weights at or before"):
        replay(TieredHistory(store, archive), 0, 14)
    with pytest.raises(RuntimeError, match="neither in the archive .* nor in Redis"):
        Archiver(store, archive, hot_versions=3, checkpoint_every=5).run_once()


def test_only_one_archiver_moves_a_job_at_a_time(tmp_path):
    store = build_job(10)
    archive = archive_of(store, tmp_path)
    held = store.redis.lock(store.keys.archiver_lock, timeout=60)
    assert held.acquire(blocking=False)
    assert Archiver(store, archive, hot_versions=3, checkpoint_every=5).run_once().skipped
    held.release()
    assert Archiver(store, archive, hot_versions=3, checkpoint_every=5).run_once().archived_through == 9


def test_the_archiver_catches_up_at_once_only_when_behind_and_over_half_its_budget(tmp_path):
    store = build_job(3)
    thread = archiver_module.ArchiveThread(
        store,
        Archive(str(tmp_path)).job(store.job),
        hot_versions=2,
        checkpoint_every=4,
        every_seconds=10,
        budget_bytes=1000,
    )
    moved = archiver_module.ArchivePass(archived=[(0, 4)])
    assert thread.pause_after(moved, used_bytes=600) == 0.0  # a large model's backlog: go again now
    assert thread.pause_after(moved, used_bytes=400) == 10  # a small job: let a segment's worth gather
    assert thread.pause_after(archiver_module.ArchivePass(), used_bytes=900) == 10  # nothing to move


def test_dispatch_is_held_only_while_over_budget_with_history_still_to_move(tmp_path, monkeypatch):
    store = build_job(5)  # head 4, nothing archived yet
    thread = archiver_module.ArchiveThread(
        store,
        Archive(str(tmp_path)).job(store.job),
        hot_versions=2,
        checkpoint_every=4,
        every_seconds=10,
        budget_bytes=1000,
    )
    thread.measure_seconds = 0
    used = {"update": 950}
    monkeypatch.setattr(store, "memory_usage", lambda: dict(used))
    assert thread.holding_dispatch()
    used["update"] = 850  # below 90 % of the budget again
    assert not thread.holding_dispatch()
    used["update"] = 950
    store.redis.set(store.keys.archived_through, 4)  # the archive caught up: the hot window alone is over
    assert not thread.holding_dispatch()
    store.redis.set(store.keys.archived_through, 3)
    assert thread.holding_dispatch()
    thread.measure_seconds = 3600  # measured at most once a second: the answer stands until then
    used["update"] = 0
    assert thread.holding_dispatch()
    # What tasks in flight will still bring is held back for: a large model is held earlier.
    large = archiver_module.ArchiveThread(
        store,
        Archive(str(tmp_path)).job(store.job),
        hot_versions=2,
        checkpoint_every=4,
        every_seconds=10,
        budget_bytes=1000,
        reserve_bytes=300,
    )
    assert large.hold_above == 700 and thread.hold_above == 900


def test_tasks_in_flight_that_reserve_more_than_the_budget_hold_dispatch_from_half_of_it(tmp_path):
    # 1,000 tasks of a 4 MB model reserve 4 GB: a threshold under zero would hold dispatch always.
    store = build_job(5)

    def thread(reserve_bytes: int) -> archiver_module.ArchiveThread:
        archive = Archive(str(tmp_path)).job(store.job)
        return archiver_module.ArchiveThread(store, archive, 2, 4, 10, budget_bytes=1000, reserve_bytes=reserve_bytes)

    crowded, roomy = thread(reserve_bytes=4000), thread(reserve_bytes=300)
    assert crowded.hold_above == 500 and crowded.reserve_too_large
    assert roomy.hold_above == 700 and not roomy.reserve_too_large
