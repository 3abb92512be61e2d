"""Device-sized tasks: a time budget each worker fills with the steps it can, reported, and
weights that respect the work done (FedNova)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fedq.broker.topology import Topology
from fedq.common.tasks import load_task
from fedq.common.wire.messages import MessageError, TrainSettings, parse_update
from fedq.coordinator.algorithms.aggregation import AdaptiveStaleness, BufferedUpdate, FedBuff
from fedq.coordinator.algorithms.staleness import Constant
from tests.unit.test_partition_leases import JOB, job_with_task, run_one_task


def steps_in(seconds: float, delay: float, epochs: int = 50) -> int:
    task = load_task("linear")
    model = task.build_model()
    slower = model.register_forward_pre_hook(lambda *_: time.sleep(delay)) if delay else None
    metrics = task.train(model, task.local_data(0), TrainSettings(epochs=epochs, batch_size=8, seconds=seconds))
    if slower is not None:
        slower.remove()
    return metrics["local_steps"]


def test_a_time_budget_gives_a_slow_device_fewer_steps_and_a_fast_one_more():
    # A slow step of 50 ms: the fast device passes 3x the slow one's steps if its own take under
    # 15 ms (they take well under 1 ms here), on a machine many times slower too.
    fast, slow = steps_in(0.5, 0.0), steps_in(0.5, 0.05)
    assert slow >= 1 and fast > 3 * slow, (fast, slow)
    assert slow <= 0.5 / 0.05 + 1  # the budget holds (one step may start just before it ends)


def test_the_budget_never_trains_more_than_the_epochs_nor_less_than_one_step():
    examples = len(load_task("linear").local_data(0))
    assert steps_in(60.0, 0.0, epochs=2) == 2 * -(-examples // 8)  # finished its epochs long before 60 s
    assert steps_in(1e-9, 0.01) == 1


def test_a_worker_reports_the_steps_it_took():
    store, broker = job_with_task()
    run_one_task(store, broker, partition=0, step_delay_seconds=0.001)
    (message,) = broker.ready(Topology(JOB).updates)
    update = parse_update(message.body)
    assert update.local_steps > 0 and "local_steps" not in update.metrics


@pytest.mark.parametrize("steps", [-1, 10**10, 1.5, True])
def test_an_impossible_step_count_is_refused(steps):
    store, broker = job_with_task()
    run_one_task(store, broker, partition=0)
    document = json.loads(broker.ready(Topology(JOB).updates)[0].body)
    document["local_steps"] = steps
    with pytest.raises(MessageError, match="local_steps"):
        parse_update(json.dumps(document).encode())


def update(worker: str, steps: int, share: float = 0.2) -> BufferedUpdate:
    return BufferedUpdate(
        task_id=worker,
        worker_id=worker,
        base_version=0,
        staleness=2,
        num_examples=100,
        delta={"w": torch.zeros(1).numpy()},
        expected_staleness=2.0,
        data_share=share,
        update_interval=2.0,
        local_steps=steps,
    )


def test_updates_are_normalised_to_the_buffers_mean_work():
    adaptive = AdaptiveStaleness(staleness=Constant())  # the step size aside
    weights = FedBuff(2, adaptive=adaptive).weights([update("fast", 30), update("slow", 10)])
    # Fair weights 0.4 each, mean steps 20: the slow update's delta counts twice, the fast one's 2/3.
    assert weights == pytest.approx([0.4 * 20 / 30, 0.4 * 20 / 10])
    # Without reported steps (whole-epoch tasks, or a plugin that does not count) nothing changes.
    assert FedBuff(2, adaptive=adaptive).weights([update("a", 0), update("b", 10)]) == [0.4, 0.4]


def test_automatic_tasks_last_what_the_median_worker_needs_for_its_epochs():
    from fedq.coordinator.service.fleet import Fleet
    from tests.support import memory_store

    fleet = Fleet(memory_store("auto").fleet, "auto")
    assert fleet.task_seconds(epochs=2, now=100.0) == 0.0  # nothing measured: whole epochs
    # 100 examples in batches of 10 = 10 steps an epoch; 50, 20 and 2 steps a second.
    for worker, speed in (("fast", 50.0), ("median", 20.0), ("slow", 2.0)):
        fleet.arrived(
            worker, issued_at=99.0, examples=100, now=100.0, steps=10, train_seconds=10 / speed, batch_size=10
        )
    assert fleet.task_seconds(epochs=2, now=100.0) == pytest.approx(2 * 10 / 20.0)
