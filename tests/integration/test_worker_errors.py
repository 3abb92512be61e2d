"""A worker survives its task's errors on the real broker: bounded retries, then a dead letter with the error."""

from __future__ import annotations

from fedq.common.wire.limits import TRAINING_ATTEMPTS
from tests.support import connection_flags, take_dead_letters, wait_until


def test_a_task_whose_training_raises_is_dead_lettered_and_the_worker_keeps_serving(processes, job, store):
    processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        "--task",
        "tests.support:exploding_task",
        "--concurrency",
        "1",
        "--max-seconds",
        "600",
    )
    processes.wait_for_log("coordinator", "event=initialised", timeout=180)
    worker = processes.start(
        "worker", "worker", *connection_flags(job), "--worker-id", "w0", "--task", "tests.support:exploding_task"
    )
    letters: list = []
    # The quorum queue's x-delivery-count is what bounds the attempts; wait for the verdict.
    wait_until(lambda: letters.extend(take_dead_letters(job)) or letters, 180, "no task was dead-lettered")
    headers, body = letters[0]
    assert headers["x-fedq-reason"] == "training_failed"
    assert "RuntimeError: the plugin's training step blew up" in headers["x-fedq-detail"]
    log = processes.log("worker")
    assert log.count("event=task_failed") >= TRAINING_ATTEMPTS
    assert f"attempt={TRAINING_ATTEMPTS} retry=False" in log
    assert worker.poll() is None, "the worker must keep serving after its task failed:\n" + log[-3000:]
    assert "Traceback" not in log
