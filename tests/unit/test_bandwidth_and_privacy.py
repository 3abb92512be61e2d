"""Compressed updates, error feedback and differential privacy through the real loops (the
in-memory transport and fakeredis): what travels, what is recorded, and that replay still
recomputes every version bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from fedq.broker.memory import MemoryBroker, MemoryTransport, Message
from fedq.broker.topology import Topology
from fedq.common import privacy
from fedq.common.store import ModelStore
from fedq.common.store.tiers import whole_history
from fedq.common.wire import codec, compression
from fedq.common.wire.messages import parse_task
from fedq.coordinator.ops.replay import replay
from fedq.coordinator.service.loop import Coordinator
from fedq.coordinator.service.settings import CoordinatorSettings
from fedq.worker.encoding import UpdateEncoder
from fedq.worker.service import Worker, WorkerSettings
from tests.support import FAST_POLLING, InBackground, memory_store, update_body, wait_until

JOB = "bandwidth"
TOPOLOGY = Topology(JOB)
DEADLINE = 90
# Central DP's requirements (FedBuff, the fixed staleness weights) with a small buffer.
CENTRAL_DP = dict(algorithm="fedbuff", buffer_size=2, staleness_bound="fixed", dp="central")


def run_job(tmp_path, versions: int, workers: int = 2, task: str = "linear", **settings):
    """A coordinator and ``workers`` workers of ``task`` until ``versions`` versions exist."""
    broker, store = MemoryBroker(), memory_store(JOB)
    values = dict(job=JOB, amqp_url="memory://", redis_url="memory://", task=task, eval_every=1)
    values |= dict(concurrency=workers, max_versions=versions, archive="none", **FAST_POLLING)
    coordinator = Coordinator(CoordinatorSettings(**(values | settings)), store, MemoryTransport(broker))
    running = [InBackground(coordinator)]
    run_job.workers = []
    for index in range(workers):
        # Its own store, as a worker process has: no weights cached by the coordinator or the others.
        worker = memory_worker(
            broker, ModelStore(store.redis, JOB), tmp_path / "state", worker_id=f"w{index}", partition=index
        )
        running.append(InBackground(worker))
        run_job.workers.append(worker)
    wait_until(lambda: store.status.load().get("status") == "finished", DEADLINE, "the job did not finish")
    for background in running:
        background.stop()
    return store


def memory_worker(broker, store, tmp_path, **settings) -> Worker:
    """Worker w0 of partition 0 on the in-memory transport, its state under ``tmp_path``."""
    values = dict(worker_id="w0", partition=0, idle_seconds=0.05, state_dir=str(tmp_path)) | settings
    return Worker(
        WorkerSettings(job=JOB, amqp_url="memory://", redis_url="memory://", **values), store, MemoryTransport(broker)
    )


def sent_payloads(store) -> list[bytes]:
    return [store.redis.get(update.blob_key) for entry in whole_history(store) for update in entry.updates]


@pytest.mark.parametrize(("spec", "smaller"), [("int8:block=64", 3.2), ("topk:fraction=0.1", 4.0), ("bf16", 1.9)])
def test_compressed_updates_train_are_recorded_and_replay_bit_for_bit(tmp_path, spec, smaller):
    store = run_job(
        tmp_path,
        versions=12,
        task="digits",
        task_params={"num_partitions": 2},
        learning_rate=0.1,
        algorithm="fedbuff",
        buffer_size=2,
        compression=spec,
    )
    head = store.versions.head()
    assert head >= 12
    meta = store.versions.load_meta(head)
    assert meta.config["compression"] == spec and meta.config["error_feedback"] is True
    dense = len(codec.encode(store.versions.load_weights(0)))
    payloads = sent_payloads(store)
    assert payloads and all(
        compression.decode(payload, codec.tensor_specs(store.versions.load_weights(0)))[0] == spec
        for payload in payloads
    )
    assert max(len(payload) for payload in payloads) * smaller < dense  # what Redis keeps shrank too
    # The model learns: the last version scores better than the first.
    assert meta.metrics["accuracy"] > store.versions.load_meta(0).metrics["accuracy"] + 0.3
    result = replay(store, 0, head)
    assert result.divergence is None and result.verified == list(range(1, head + 1))
    # Sparse updates make sparse steps: the coordinator stores the diff between versions (auto), and
    # workers that held the previous version read that instead of the model, bit-exact (checked
    # against the task's digest). Dense encodings do not pay for diffs.
    diffs = [key for key in store.redis.scan_iter(store.keys.prefix + "modeldiff:*")]
    loads = sum(worker.trainer.held.stats.diff_loads for worker in run_job.workers)
    if spec.startswith("topk"):
        assert diffs and loads > 0, [worker.trainer.held.stats for worker in run_job.workers]
    else:
        assert not diffs and loads == 0
    # Each worker kept what its encoding dropped, under its own name, for its next update.
    residuals = sorted(path.name for path in (tmp_path / "state" / JOB).iterdir())
    assert len(residuals) == 2 and all(name.endswith(".residual") for name in residuals)


def test_an_update_in_another_encoding_is_refused_with_a_sentence(tmp_path):
    broker, store = MemoryBroker(), memory_store(JOB)
    values = dict(job=JOB, amqp_url="memory://", redis_url="memory://", task="linear", eval_every=0, **FAST_POLLING)
    coordinator = Coordinator(
        CoordinatorSettings(**values, algorithm="fedasync", concurrency=1, compression="int8"),
        store,
        MemoryTransport(broker),
    )
    running = InBackground(coordinator)
    message = broker.get(TOPOLOGY.tasks, timeout=DEADLINE)
    task = parse_task(message.body)
    assert task.compression == "int8:block=256" and task.error_feedback
    zero = {name: np.zeros_like(array) for name, array in store.versions.load_weights(0).items()}
    broker.publish(TOPOLOGY.updates, Message(update_body(task, zero), task.task_id))  # float32, as an old worker
    wait_until(lambda: store.counters.get("rejected") == {"wrong_encoding": 1}, DEADLINE, "not refused")
    dead = broker.get(TOPOLOGY.dead, timeout=DEADLINE)
    assert b"this job takes 'int8:block=256'" in dead.headers["x-fedq-detail"].encode()
    running.stop()


def test_central_dp_noises_each_step_records_epsilon_and_replays(tmp_path):
    store = run_job(
        tmp_path,
        versions=8,
        **CENTRAL_DP,
        dp_clip=0.5,
        dp_noise=1.1,
    )
    head = store.versions.head()
    records = [store.versions.load_meta(version) for version in range(1, head + 1)]
    assert all(record.dp_seed is not None for record in records)
    assert [record.dp_steps for record in records] == list(range(1, head + 1))
    # epsilon grows with every step, and is what the accountant says for that many steps
    epsilons = [record.epsilon for record in records]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == pytest.approx(privacy.epsilon(1.1, 1.0, head, 1e-5))
    assert records[-1].config["dp"] == "central" and records[-1].config["clip_norm"] == 0.5
    result = replay(store, 0, head)
    assert result.divergence is None, result.divergence


def test_the_privacy_budget_stops_the_run_before_it_is_exceeded(tmp_path):
    budget = privacy.epsilon(1.0, 1.0, 3, 1e-5) + 1e-9  # exactly three steps' worth
    store = run_job(
        tmp_path,
        versions=50,
        **CENTRAL_DP,
        dp_clip=0.5,
        dp_noise=1.0,
        dp_epsilon=budget,
    )
    assert store.status.load()["reason"] == "privacy_budget"
    head = store.versions.head()
    assert head == 3 and store.versions.load_meta(head).epsilon <= budget


def test_local_dp_tasks_ask_workers_for_noise_and_epsilon_counts_their_updates(tmp_path):
    store = run_job(tmp_path, versions=6, algorithm="fedasync", dp="local", dp_clip=0.5, dp_noise=2.0)
    head = store.versions.head()
    record = store.versions.load_meta(head)
    assert record.dp_seed is None  # no central noise
    applied = {}
    for entry in whole_history(store):
        for update in entry.updates:
            applied[update.worker_id] = applied.get(update.worker_id, 0) + 1
    assert record.dp_steps == max(applied.values())
    assert record.epsilon == pytest.approx(privacy.epsilon(2.0, 1.0, record.dp_steps, 1e-5))
    assert replay(store, 0, head).divergence is None


def test_local_dp_clips_and_noises_what_leaves_the_worker(tmp_path):
    from fedq.common.wire.messages import RoundTask, TrainSettings

    task = RoundTask(JOB, "t", 0, TrainSettings(), 0.0, dp_clip=1.0, dp_noise=0.5)
    encoder = UpdateEncoder(JOB, "w", tmp_path)
    delta = {"w": np.full(10_000, 1.0, np.float32)}  # norm 100, clipped to 1: 0.01 each
    payload, encoding = encoder.encode(task, delta)
    sent = codec.decode(payload)["w"]
    assert encoding == "none"
    # clipped to 0.01 a value, plus noise of standard deviation 0.5 (0.5 * the clip)
    assert abs(sent.mean() - 0.01) < 0.02 and sent.std() == pytest.approx(0.5, rel=0.05)


def test_error_feedback_carries_what_was_dropped_and_survives_a_restart(tmp_path):
    from fedq.common.wire.messages import RoundTask, TrainSettings

    def task(task_id):
        return RoundTask(JOB, task_id, 0, TrainSettings(), 0.0, compression="topk:fraction=0.5", error_feedback=True)

    specs = {"w": ((4,), "float32")}
    delta = {"w": np.array([4.0, 3.0, 2.0, 1.0], np.float32)}
    encoder = UpdateEncoder(JOB, "site/a", tmp_path)
    first = compression.decode(encoder.encode(task("1"), delta)[0], specs)[1]["w"]
    assert first.tolist() == [4, 3, 0, 0]
    encoder.sent("1")
    # A new process of the same worker id finds the residual [0, 0, 2, 1] on disk.
    restarted = UpdateEncoder(JOB, "site/a", tmp_path)
    second = compression.decode(restarted.encode(task("2"), delta)[0], specs)[1]["w"]
    assert second.tolist() == [4, 0, 4, 0]  # of 4, 3, 4, 2 the largest two (ties: the first)
    restarted.sent("2")
    third = compression.decode(restarted.encode(task("3"), delta)[0], specs)[1]["w"]
    assert third.tolist() == [4, 6, 0, 0]  # of 4, 6, 2, 3
    restarted.sent("3")
    # Nothing is lost, only late: what was sent plus what is kept is three whole deltas.
    kept = codec.decode((tmp_path / JOB).joinpath(restarted.residual_path.name).read_bytes())["w"]
    assert (first + second + third + kept).tolist() == (3 * delta["w"]).tolist()
    # An update that was never confirmed leaves the residual as it was.
    restarted.encode(task("4"), delta)
    again = UpdateEncoder(JOB, "site/a", tmp_path)
    # (had it been kept, the residual would be [0, 3, 0, 4], and this [0, 6, 0, 5])
    assert compression.decode(again.encode(task("5"), delta)[0], specs)[1]["w"].tolist() == [4, 0, 4, 0]


def test_a_worker_refuses_a_job_with_less_local_noise_than_it_requires(tmp_path):
    from fedq.worker.job import JobMismatchError
    from tests.support import publish_job, signed_task

    broker, store = MemoryBroker(), memory_store(JOB)
    key = publish_job(store, "linear")
    worker = memory_worker(broker, store, tmp_path, min_dp_noise=1.0)
    task = signed_task(key, store, 0)
    broker.declare(TOPOLOGY)
    broker.publish(TOPOLOGY.tasks, Message(task.to_bytes(), task.task_id))
    with pytest.raises(JobMismatchError, match="less than 1 \\(--min-dp-noise\\)"):
        worker.run()
    assert len(broker.ready(TOPOLOGY.tasks)) == 1  # given back for a worker that will serve it


def test_noised_updates_and_steps_are_not_mistaken_for_poison(tmp_path):
    # digits: 4,810 values, a model norm of about 5, so the norm guard's first bound is about 50.
    # Local noise of 2 x clip 1 gives every honest update a norm of about 139; central noise of
    # 3 x clip 1 / K=2 gives each step one of about 104. Neither is an outlier: it is the privacy.
    local = run_job(tmp_path, versions=4, task="digits", algorithm="fedasync", dp="local", dp_clip=1.0, dp_noise=2.0)
    assert local.counters.get("rejected") == {}
    central = run_job(
        tmp_path,
        versions=4,
        task="digits",
        **CENTRAL_DP,
        dp_clip=1.0,
        dp_noise=3.0,
    )
    assert central.counters.get("rejected") == {}
    assert replay(central, 0, central.versions.head()).divergence is None


def test_privacy_once_spent_stays_spent_across_a_rollback_and_a_restart(tmp_path):
    from fedq.coordinator.ops.replay import rollback

    central = dict(CENTRAL_DP, dp_clip=0.5)
    store = run_job(tmp_path, versions=4, **central)
    rolled_back = rollback(store, 2)
    assert store.versions.load_meta(rolled_back).dp_steps == 4  # versions 3 and 4 were released all the same
    # A coordinator restarted on the job goes on counting from there.
    broker = MemoryBroker()
    values = dict(job=JOB, amqp_url="memory://", redis_url="memory://", task="linear", eval_every=1, archive="none")
    coordinator = Coordinator(
        CoordinatorSettings(**values, **central, concurrency=1, max_versions=rolled_back + 1, **FAST_POLLING),
        store,
        MemoryTransport(broker),
    )
    running = InBackground(coordinator)
    task = parse_task(broker.get(TOPOLOGY.tasks, timeout=DEADLINE).body)
    zero = {name: np.zeros_like(array) for name, array in store.versions.load_weights(task.model_version).items()}
    for worker in ("a", "b"):
        broker.publish(TOPOLOGY.updates, Message(update_body(task, zero, worker_id=worker), task.task_id))
        if worker == "a":
            task = parse_task(broker.get(TOPOLOGY.tasks, timeout=DEADLINE).body)
    wait_until(lambda: store.versions.head() == rolled_back + 1, DEADLINE, "no version after the restart")
    running.stop()
    assert store.versions.load_meta(rolled_back + 1).dp_steps == 5


def test_a_budget_a_single_step_would_spend_is_refused_at_start():
    with pytest.raises(ValueError, match=r"--dp-epsilon 0.5 is spent by a single step \(epsilon .* at --dp-noise 1\)"):
        CoordinatorSettings(
            job=JOB,
            amqp_url="memory://",
            redis_url="memory://",
            **CENTRAL_DP,
            dp_clip=1.0,
            dp_epsilon=0.5,
        )


def test_a_job_trained_with_privacy_is_not_resumed_without_it(tmp_path):
    from fedq.common.store import StoreError

    store = run_job(tmp_path, versions=2, **CENTRAL_DP, dp_clip=0.5)
    values = dict(job=JOB, amqp_url="memory://", redis_url="memory://", task="linear", archive="none")
    for changed in (dict(dp="off"), dict(dp_clip=0.5, dp_noise=0.5)):
        settings = CoordinatorSettings(**values, **(CENTRAL_DP | changed))
        with pytest.raises(StoreError, match="would void the epsilon it reports"):
            Coordinator(settings, store, MemoryTransport(MemoryBroker()))


def test_a_local_dp_update_carries_no_training_metrics(tmp_path):
    import dataclasses

    from fedq.common.wire.messages import parse_update
    from tests.support import publish_job, signed_task

    broker, store = MemoryBroker(), memory_store(JOB)
    key = publish_job(store, "linear")
    worker = memory_worker(broker, store, tmp_path, max_tasks=2)
    broker.declare(TOPOLOGY)
    plain = signed_task(key, store, 0)
    private = dataclasses.replace(signed_task(key, store, 0), dp_clip=1.0, dp_noise=1.0)
    private = dataclasses.replace(private, signature=key.sign(private.signed_document()))
    for task in (plain, private):
        broker.publish(TOPOLOGY.tasks, Message(task.to_bytes(), task.task_id))
    assert worker.run() == 0
    sent = {}
    for _ in range(2):
        update = parse_update(broker.get(TOPOLOGY.updates, timeout=DEADLINE).body)
        sent[update.task_id] = update
    assert sent[plain.task_id].metrics  # the loss on this worker's data, as before
    assert sent[private.task_id].metrics == {}  # would leak what the noise protects
