"""Heterogeneous workers on real servers: leased partitions, a slow device's updates applied
under adaptive staleness, and each worker's contribution in `fedq status`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.support import ROOT, connection_flags, wait_until


def test_workers_without_partitions_get_distinct_ones_and_status_shows_what_each_contributed(processes, job, store):
    for index, extra in enumerate(([], [], ["--step-delay", "0.05"])):  # w2 is a slow device
        processes.start(f"worker-{index}", "worker", *connection_flags(job), "--worker-id", f"w{index}", *extra)
    for index in range(3):  # all three serve before the first task: none joins after the run is over
        processes.wait_for_log(f"worker-{index}", "event=worker_ready", timeout=180)
    coordinator = processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        "--task",
        "digits",
        "--task-params",
        json.dumps({"num_partitions": 3}),
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "2",
        "--concurrency",
        "3",
        "--staleness-bound",
        "adaptive",
        "--task-seconds",
        "auto",
        "--eval-every",
        "5",
        "--archive",
        "none",
    )

    def slow_device_applied() -> bool:
        head = store.versions.head() or 0
        return head >= 60 and any(
            update.worker_id == "w2" for entry in store.versions.history(1, head) for update in entry.updates
        )

    # However fast the machine runs the two fast workers, the run lasts until the slow one counted.
    wait_until(slow_device_applied, 600, "no update of the slow device was applied")
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=120) == 0, processes.log("coordinator")[-3000:]
    head = store.versions.head()
    leases = store.partitions.table()
    assert set(leases) == {"w0", "w1", "w2"} and sorted(leases.values()) == [0, 1, 2], leases

    def status() -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "fedq.common.cli", "status", *connection_flags(job), "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def every_lease_shown() -> dict | None:
        report = status()
        rows = report["contribution"]
        return report if len(rows) == 3 and all("(leased)" in row["data"] for row in rows) else None

    # Liveness is refreshed every few seconds: wait until all three show the partition they hold.
    report = wait_until(every_lease_shown, 120, "status did not show three workers with leased partitions")
    rows = {row["worker_id"]: row for row in report["contribution"]}
    assert {row["data"] for row in rows.values()} == {f"partition {index} (leased)" for index in range(3)}
    assert all(row["applied"] > 0 for row in rows.values()), rows  # the slow device's updates count too
    assert sum(row["applied"] for row in rows.values()) == sum(
        len(entry.updates) for entry in store.versions.history(1, head)
    )
    assert rows["w2"]["steps_per_second"] < rows["w0"]["steps_per_second"]
    assert report["rejected"].get("too_stale", 0) == 0
    text = subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", "status", *connection_flags(job)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "of examples" in text and "partition 2 (leased)" in text
