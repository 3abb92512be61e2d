"""The example plugin of docs/tasks.md trains as the document says: a job of its own, two sites
reading their own folders with the plugin's own loader, real RabbitMQ and Redis."""

from __future__ import annotations

import os
import sys

from tests.support import ROOT, connection_flags, wait_until

EXAMPLES = ROOT / "docs" / "examples"
PLUGIN = ["--task", "shapes_task:ShapesTask"]


def test_the_example_plugin_learns_from_each_sites_own_folder(job, store, processes, tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import shapes_task
    finally:
        sys.path.remove(str(EXAMPLES))
    for site in (0, 1):
        assert shapes_task.main(["make-data", str(tmp_path / f"site-{site}"), "--partition", str(site)]) == 0
    # Every process imports the plugin: the folder that holds it is on each one's path (docs/tasks.md).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")])))
    coordinator = processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        *PLUGIN,
        "--task-params",
        '{"noise": 0.3}',
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "2",
        "--concurrency",
        "2",
        "--learning-rate",
        "0.1",
        "--local-epochs",
        "2",
        "--batch-size",
        "16",
        "--target",
        "0.8",
        "--max-seconds",
        "600",
        "--archive",
        "none",
    )
    for site in (0, 1):
        processes.start(
            f"site-{site}",
            "worker",
            *connection_flags(job),
            *PLUGIN,
            "--worker-id",
            f"site-{site}",
            "--data",
            str(tmp_path / f"site-{site}"),
        )
    wait_until(
        lambda: coordinator.poll() is not None,
        600,
        "the coordinator did not stop: " + processes.log("coordinator")[-3000:],
    )
    assert coordinator.returncode == 0, processes.log("coordinator")[-3000:]
    head = store.versions.head()
    accuracy = store.versions.load_meta(head).metrics["accuracy"]
    assert accuracy >= 0.8, f"stopped at version {head} with accuracy {accuracy}"
    applied = [update for record in store.versions.history() for update in record.updates]
    assert {update.worker_id for update in applied} == {"site-0", "site-1"}, applied
    # The sites trained on their folders (200 images each, the plugin's own loader), not on a
    # generated partition (also 200, but then the liveness record would not name the folder).
    assert {update.num_examples for update in applied} == {200}
    assert {record.get("data") for record in store.workers.live()} >= {str(tmp_path / "site-0")}
