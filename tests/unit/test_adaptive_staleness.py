"""Adaptive staleness: slow workers count as much as their data, very stale steps are damped,
and an update is judged against its own worker's measured speed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedq.broker.memory import MemoryBroker
from fedq.broker.topology import Topology
from fedq.broker.transport import REASON_HEADER
from fedq.common.records import AppliedUpdate, VersionRecord
from fedq.common.store.fleet import WorkerRecord
from fedq.common.wire.messages import MessageError, ModelUpdate
from fedq.coordinator.algorithms.aggregation import AdaptiveStaleness, BufferedUpdate, FedAsync, FedBuff
from fedq.coordinator.algorithms.staleness import Constant, Polynomial
from fedq.coordinator.algorithms.step import build_aggregator
from fedq.coordinator.service.fleet import Fleet, contribution, contribution_warnings
from fedq.coordinator.service.settings import CoordinatorSettings
from fedq.coordinator.service.validation import check_staleness
from tests.support import memory_store, wait_until
from tests.unit.test_coordinator_loop import DEADLINE, answer, delta_like, start, take_task, wait_for_head

TOPOLOGY = Topology("unit")


def update(
    worker: str, staleness: int, expected: float | None, share: float | None = 0.25, examples: int = 100
) -> BufferedUpdate:
    # One task at a time per worker: the versions between its updates are those its task spans.
    return BufferedUpdate(
        task_id=f"{worker}-{staleness}",
        worker_id=worker,
        base_version=0,
        staleness=staleness,
        num_examples=examples,
        delta={},
        expected_staleness=expected,
        data_share=share,
        update_interval=expected,
    )


def influence(aggregator, round_trips: dict[str, float], examples: dict[str, int], seconds: float = 4000.0):
    """Each worker's share of the summed update weights over a simulated run: worker i sends an
    update every round_trips[i] seconds, a version commits every buffer_size arrivals."""
    arrivals = sorted((time, worker) for worker, trip in round_trips.items() for time in np.arange(trip, seconds, trip))
    rate = sum(1 / trip for trip in round_trips.values()) / aggregator.buffer_size  # versions per second
    total_examples = sum(examples.values())
    totals = dict.fromkeys(round_trips, 0.0)
    for start_index in range(0, len(arrivals) - aggregator.buffer_size + 1, aggregator.buffer_size):
        batch = [
            update(
                worker,
                staleness=round(rate * round_trips[worker]),
                expected=rate * round_trips[worker],
                share=examples[worker] / total_examples,
                examples=examples[worker],
            )
            for _, worker in arrivals[start_index : start_index + aggregator.buffer_size]
        ]
        for item, weight in zip(batch, aggregator.weights(batch)):
            totals[item.worker_id] += weight
    total = sum(totals.values())
    return {worker: value / total for worker, value in totals.items()}


def test_fair_weights_give_each_worker_influence_in_proportion_to_its_data_not_its_speed():
    trips = {f"fast-{index}": 1.0 for index in range(6)} | {"slow": 3.0}
    examples = dict.fromkeys(trips, 100)  # the slow worker holds 1/7 of the data
    fair = influence(FedBuff(3, adaptive=AdaptiveStaleness()), trips, examples)
    assert fair["slow"] == pytest.approx(1 / 7, abs=0.015)
    # The fixed rule with FedBuff's 1/sqrt(1 + tau): speed decides, the slow worker's data counts far less.
    fixed = influence(FedBuff(3, Polynomial(0.5), example_weighted=True), trips, examples)
    assert fixed["slow"] < 0.07


def test_in_a_fleet_of_equal_workers_the_fair_weight_is_fedbuffs_one_over_k():
    trips, examples = dict.fromkeys(("a", "b", "c", "d", "e", "f"), 1.0), dict.fromkeys("abcdef", 100)
    rate = 6 / 3  # versions per second: tau_hat = 2 = N / K
    buffer = [update(worker, 2, rate * trips[worker], share=1 / 6) for worker in "abc"]
    assert FedBuff(3, adaptive=AdaptiveStaleness(staleness=Constant())).weights(buffer) == [pytest.approx(1 / 3)] * 3
    assert influence(FedBuff(3, adaptive=AdaptiveStaleness()), trips, examples)["a"] == pytest.approx(1 / 6, abs=0.01)


def test_the_staleness_function_at_the_buffers_median_sets_the_step_size_alike_for_all():
    buffer = [update("slow", 40, 38.0, share=0.02), update("fast", 3, 2.5), update("fast", 3, 2.5)]
    plain = FedBuff(3, adaptive=AdaptiveStaleness(staleness=Constant())).weights(buffer)
    sized = FedBuff(3, adaptive=AdaptiveStaleness(staleness=Polynomial(0.5))).weights(buffer)
    assert sized == pytest.approx([weight / 2 for weight in plain])  # 1 / sqrt(1 + 3), the slow update's too


def test_no_update_weighs_more_than_the_cap_however_much_data_it_claims():
    liar = update("liar", 20, 20.0, share=0.99, examples=10**9)
    assert FedBuff(3, adaptive=AdaptiveStaleness(max_weight=1.0, staleness=Constant())).weights([liar]) == [1.0]


def test_an_update_as_stale_as_its_worker_usually_is_is_not_damped():
    adaptive = AdaptiveStaleness(damp_above=2.0, staleness=Constant())
    buffer = [update("slow", 40, 38.0, share=0.02), update("fast", 2, 2.5), update("fast", 3, 2.5)]
    assert adaptive.damping(buffer) == 1.0
    assert FedBuff(3, adaptive=adaptive).weights(buffer) == pytest.approx([0.02 * 38, 0.25 * 2.5, 0.25 * 2.5])


def test_an_update_far_staler_than_its_workers_norm_damps_the_whole_step():
    adaptive = AdaptiveStaleness(damp_above=2.0, staleness=Constant())
    buffer = [update("stalled", 11, 1.0), update("fast", 2, 2.5)]  # (1 + 11) / (1 + 1) = 6 times the norm
    undamped = [0.25 * 1.0, 0.25 * 2.5]  # data share x expected staleness
    assert FedBuff(2, adaptive=adaptive).weights(buffer) == pytest.approx([weight * 2 / 6 for weight in undamped])
    assert FedAsync(0.6, adaptive=adaptive).weights([update("stalled", 11, 1.0)]) == [pytest.approx(0.6 * 0.25 * 2 / 6)]
    # A worker's first update (nothing measured yet) counts as exactly as stale as expected.
    assert adaptive.damping([update("new", 30, None)]) == 1.0


def test_the_weights_follow_from_the_recorded_config_and_updates_alone():
    config = CoordinatorSettings(
        job="j", amqp_url="", redis_url="", algorithm="fedbuff", staleness_bound="adaptive"
    ).aggregation_config()
    buffer = [update("slow", 9, 8.0, 0.1), update("fast", 1, 1.2, 0.3), update("fast", 3, 1.2, 0.3)]
    weights = build_aggregator(config).weights(buffer)
    record = AppliedUpdate(
        task_id="t",
        worker_id="slow",
        base_version=0,
        staleness=9,
        weight=weights[0],
        num_examples=50,
        digest="d",
        blob_key="k",
        expected_staleness=8.0,
        data_share=0.1,
    )
    stored = VersionRecord.from_json(
        VersionRecord(version=1, parent=0, digest="x", created=0.0, updates=(record,)).entry_json()
    )
    assert (stored.updates[0].expected_staleness, stored.updates[0].data_share) == (8.0, 0.1)  # replay reads them
    assert build_aggregator(config).weights(buffer) == weights
    fixed = CoordinatorSettings(
        job="j", amqp_url="", redis_url="", algorithm="fedbuff", staleness_bound="fixed"
    ).aggregation_config()
    assert build_aggregator(fixed).weights(buffer) != weights


def slow(staleness: int, base: int = 0) -> ModelUpdate:
    return ModelUpdate(job="j", task_id="t", worker_id="slow-1", base_version=base, num_examples=1, delta=None)


def test_a_slow_worker_is_judged_by_its_own_speed():
    # 50 versions stale is this worker's norm (it is slow): accepted even past the fixed default of 20.
    assert check_staleness(slow(0), head=50, max_staleness=None, expected=45.0, tolerance=8.0) == 50
    # A fast worker's update as stale is not its norm: refused, with the reason in one sentence.
    with pytest.raises(MessageError, match=r"more than 8 times what worker slow-1's measured speed predicts \(2.0\)"):
        check_staleness(slow(0), head=50, max_staleness=None, expected=2.0, tolerance=8.0)
    # A hard bound the user set still holds.
    with pytest.raises(MessageError, match="exceeds max_staleness 30"):
        check_staleness(slow(0), head=50, max_staleness=30, expected=45.0, tolerance=8.0)


def test_the_fleet_predicts_staleness_from_the_version_rate_and_each_workers_round_trip():
    store = memory_store("fleet")
    fleet = Fleet(store.fleet, "fleet")
    clock = itertools.count(start=1000.0, step=0.5)  # a commit every 0.5 s: 2 versions a second
    for _ in range(5):
        fleet.committed([], now=next(clock))
    fleet.arrived("fast", issued_at=1000.0, examples=100, now=1001.0)
    fleet.arrived("slow", issued_at=1000.0, examples=300, now=1010.0)
    assert fleet.data_share("new", 100, now=1010.0) == 0.2
    assert fleet.expectations() == {"fast": pytest.approx(2.0), "slow": pytest.approx(20.0)}
    assert fleet.update_interval("fast") is None  # one arrival: no interval yet
    fleet.arrived("fast", issued_at=1000.0, examples=100, now=1001.5)  # a second task, queued behind the first
    assert fleet.update_interval("fast") == pytest.approx(2.0 * 0.5)  # 0.5 s apart: one version, not its round trip
    applied = [
        AppliedUpdate("t1", "fast", 0, 2, 0.25, 100, "d", "k"),
        AppliedUpdate("t2", "slow", 0, 20, 0.75, 300, "d", "k"),
    ]
    fleet.committed(applied, now=1011.0)
    fleet.rejected("fast", "too_stale", now=1011.0)
    shares = {row["worker_id"]: row for row in contribution(store.fleet.load())}
    assert shares["slow"]["data_share"] == 0.75 and shares["slow"]["weight_share"] == 0.75
    assert shares["fast"]["applied_share"] == 0.5 and shares["fast"]["rejected"] == {"too_stale": 1}
    assert Fleet(store.fleet, "fleet").workers["slow"].applied == 1  # a restarted coordinator keeps counting


def test_warnings_name_a_worker_whose_updates_keep_being_refused_or_that_contributed_nothing():
    records = {
        "refused": WorkerRecord("refused", rejected={"too_stale": 4}, rejected_streak=4, first_seen=0.0),
        "quiet": WorkerRecord("quiet", first_seen=0.0, applied=3, last_applied=10.0),
        "fine": WorkerRecord("fine", first_seen=0.0, applied=9, last_applied=990.0),
        "left": WorkerRecord("left", rejected_streak=9, first_seen=0.0),
    }
    warnings = contribution_warnings(records, live=["refused", "quiet", "fine"], now=1000.0)
    assert warnings == [
        "worker quiet: none of its updates was applied in the last 990 s",
        "worker refused: its last 4 updates were rejected (too_stale 4); it contributes nothing",
    ]


@pytest.mark.parametrize("bound, applied", [("fixed", False), ("adaptive", True)])
def test_a_slow_workers_first_update_past_the_fixed_cut_is_applied_only_when_adaptive(bound, applied):
    broker, store = MemoryBroker(), memory_store("unit")
    _, running = start(broker, store, algorithm="fedasync", concurrency=2, staleness_bound=bound, archive="none")
    slow_task = take_task(broker)
    for _ in range(22):  # a fast worker moves the head past the fixed default of 20
        answer(broker, take_task(broker), delta_like(store, 0.01), worker_id="fast")  # each commit sends the next
    wait_for_head(store, 22)
    answer(broker, slow_task, delta_like(store, 0.01), worker_id="slow")
    if applied:
        wait_for_head(store, 23)
    else:
        wait_until(lambda: broker.ready(TOPOLOGY.dead), DEADLINE, "the stale update was not refused")
        assert broker.ready(TOPOLOGY.dead)[0].headers[REASON_HEADER] == "too_stale"
    running.stop()
    records = store.fleet.load()
    assert records["fast"].applied == 22 and records["fast"].round_trip_s is not None
    assert records["slow"].applied == int(applied)
    assert records["slow"].rejected == ({} if applied else {"too_stale": 1})


def test_the_report_sets_each_workers_share_of_updates_and_weight_against_its_data():
    from fedq.coordinator.ops.report import _contribution_html, contribution_rows

    applied = [
        AppliedUpdate("t1", "fast", 0, 1, 0.2, 100, "d", "k"),
        AppliedUpdate("t2", "fast", 0, 1, 0.2, 100, "d", "k"),
        AppliedUpdate("t3", "slow", 0, 9, 0.6, 300, "d", "k"),
    ]
    history = [VersionRecord(version=1, parent=0, digest="x", created=0.0, updates=tuple(applied))]
    fleet = {"slow": WorkerRecord("slow", rejected={"too_stale": 2}, round_trip_s=4.0), "gone": WorkerRecord("gone")}
    rows = {row["worker"]: row for row in contribution_rows(history, fleet)}
    assert rows["slow"]["of updates"] == pytest.approx(1 / 3) and rows["slow"]["of weight"] == pytest.approx(0.6)
    assert rows["slow"]["of examples"] == pytest.approx(0.75) and rows["slow"]["rejected"] == {"too_stale": 2}
    assert rows["gone"]["applied"] == 0 and rows["fast"]["s/task"] is None
    assert "too_stale 2" in _contribution_html(list(rows.values()))
