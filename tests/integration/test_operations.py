"""What operators see: status/monitor follow workers joining and leaving, SIGTERM drains,
/metrics agrees with the history, and the HTML report draws from it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedq.broker.connection import connect
from fedq.broker.publisher import publish
from fedq.broker.topology import Topology
from fedq.common.store.tiers import whole_history
from fedq.coordinator.ops.status import collect
from tests.support import AMQP_URL, REDIS_URL, ROOT, connection_flags, wait_until

TRAINING = [
    "--task",
    "digits",
    "--task-params",
    json.dumps({"num_partitions": 3}),
    "--local-epochs",
    "2",
    "--learning-rate",
    "0.1",
    "--batch-size",
    "16",
]


def start_worker(processes, job, index: int, *extra: str):
    return processes.start(
        f"worker-{index}",
        "worker",
        *connection_flags(job),
        "--worker-id",
        f"w{index}",
        "--partition",
        str(index),
        *extra,
    )


def task_consumers(report: dict) -> int:
    return next(queue["consumers"] for queue in report["queues"] if queue["name"].endswith(".tasks"))


def live_worker_ids(report: dict) -> set[str]:
    return {worker["worker_id"] for worker in report["workers"]}


def test_status_and_monitor_follow_workers_joining_and_leaving(processes, job, store, tmp_path):
    coordinator = processes.start(
        "coordinator", "coordinator", *connection_flags(job), *TRAINING, "--concurrency", "2", "--max-versions", "60"
    )
    report = lambda: collect(AMQP_URL, REDIS_URL, job, store)  # noqa: E731
    wait_until(lambda: task_consumers(report()) is not None, 60, "the coordinator did not declare its queues")
    assert task_consumers(report()) == 0 and live_worker_ids(report()) == set()

    first = start_worker(processes, job, 0)
    wait_until(
        lambda: live_worker_ids(report()) == {"w0"} and task_consumers(report()) == 1,
        60,
        "status did not show the first worker",
    )
    start_worker(processes, job, 1)
    wait_until(
        lambda: live_worker_ids(report()) == {"w0", "w1"} and task_consumers(report()) == 2,
        60,
        "status did not show the second worker",
    )
    frame = subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", "monitor", *connection_flags(job), "--once"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert frame.returncode == 0, frame.stderr
    assert "w0" in frame.stdout and "w1" in frame.stdout and f"fedq.{job}.tasks" in frame.stdout
    assert re.search(r"workers seen in the last 30 s \(2\)", frame.stdout)

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    wait_until(
        lambda: live_worker_ids(report()) == {"w1"} and task_consumers(report()) == 1,
        30,
        "status still showed the stopped worker",
    )
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator")[-3000:]
    assert store.status.load()["reason"] == "max_versions"

    output = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", "report", *connection_flags(job), "-o", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    page = output.read_text()
    assert page.count("data:image/png;base64,") == 4
    section = page[page.find("contribution per worker") :].split("</table>")[0]
    applied = sum(1 for entry in whole_history(store) for update in entry.updates if update.worker_id == "w0")
    assert f"<td>w0</td><td>{applied}</td>" in section, section


@pytest.mark.parametrize("drain_seconds, outcome", [("60", "finished"), ("0.5", "requeued")])
def test_sigterm_mid_task_finishes_or_requeues_and_loses_nothing(processes, job, store, drain_seconds, outcome):
    coordinator = processes.start(
        "coordinator", "coordinator", *connection_flags(job), *TRAINING, "--concurrency", "1", "--max-versions", "4"
    )
    draining = start_worker(processes, job, 0, "--slowdown", "5", "--drain-seconds", drain_seconds)
    log = processes.wait_for_log("worker-0", "event=task_started", timeout=90)
    task_id = re.search(r"event=task_started worker=\S+ task=(\w+)", log).group(1)
    # The worker that carries on starts now, so that its start-up overlaps the drain. It cannot take
    # the task: with --concurrency 1 no other task is issued while w0 holds that one.
    start_worker(processes, job, 1)
    draining.send_signal(signal.SIGTERM)
    assert draining.wait(timeout=60) == 0
    log = processes.log("worker-0")
    if outcome == "finished":
        assert re.search(rf"event=task_done worker=w0 task={task_id}", log), log[-2000:]
    else:
        assert f"event=task_requeued worker=w0 task={task_id}" in log, log[-2000:]
    assert coordinator.wait(timeout=120) == 0, processes.log("coordinator")[-3000:]
    assert store.ledger.applied_version(task_id) is not None, "the task in progress at SIGTERM was lost"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_coordinator_metrics_match_the_history(processes, job, store):
    port = _free_port()
    processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        *TRAINING,
        "--concurrency",
        "2",
        "--metrics-port",
        str(port),
    )
    workers = [start_worker(processes, job, index) for index in range(2)]
    wait_until(lambda: (store.versions.head() or 0) >= 8, 90, "no progress")
    connection = connect(AMQP_URL)
    channel = connection.channel()
    channel.confirm_delivery()
    publish(channel, Topology(job).updates, b"garbage", message_id="garbage")
    connection.close()
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=60)
    wait_until(lambda: store.counters.get("rejected").get("not_json") == 1, 30, "the garbage was not rejected")
    label = (("job", job),)

    def issued() -> int:
        """Tasks the ledger says went out (not the ones the last commit reserved ahead)."""
        return sum(not task.reserved for task in store.ledger.open_tasks().values())

    def settled():
        """The metrics of the last commit, once they have caught up with the history."""
        head = store.versions.head()
        samples = scrape(port)
        caught_up = (
            samples.get(("fedq_versions_committed_total", label)) == head
            and samples.get(("fedq_head_version", label)) == head
            # The ledger says which reserved tasks went out once the coordinator is idle.
            and samples.get(("fedq_tasks_in_flight", label)) == issued()
        )
        return (samples, head) if caught_up and store.versions.head() == head else None

    samples, head = wait_until(settled, 60, "the coordinator's metrics never caught up with its history")
    history = store.versions.history(1)
    applied = sum(len(entry.updates) for entry in history)
    assert samples[("fedq_head_version", label)] == head
    assert samples[("fedq_updates_applied_total", label)] == applied
    assert samples[("fedq_versions_committed_total", label)] == head
    assert samples[("fedq_updates_rejected_total", (("job", job), ("reason", "not_json")))] == 1
    assert samples[("fedq_staleness_count", label)] == applied
    assert samples[("fedq_staleness_sum", label)] == sum(u.staleness for e in history for u in e.updates)
    assert samples[("fedq_aggregation_seconds_count", label)] == head
    assert samples[("fedq_commit_seconds_count", label)] == head
    assert samples[("fedq_tasks_in_flight", label)] == issued()
    assert samples[("fedq_tasks_dispatched_total", label)] >= applied
    accuracy = next(entry.metrics["accuracy"] for entry in reversed(history) if entry.metrics)
    assert samples[("fedq_model_score", (("job", job), ("metric", "accuracy")))] == pytest.approx(accuracy)
