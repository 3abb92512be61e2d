"""The history's two tiers for real: an archiver SIGKILLed at each step of moving a record, and
federations whose coordinator archives to a local folder or to an S3 server on loopback (moto),
killed mid-archive, that still replay bit for bit across both tiers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from fedq.common.store.archive import Archive
from fedq.common.store.tiers import TieredHistory
from fedq.coordinator.ops.replay import replay
from tests.integration.test_records import build_history
from tests.s3_server import s3_archive_server  # noqa: F401 - a fixture
from tests.support import AMQP_URL, REDIS_URL, ROOT

HOT_VERSIONS = 4
CHECKPOINT_EVERY = 5


def fedq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def assert_whole_history_replays(store, archive, head: int) -> None:
    history = TieredHistory(store, archive)
    records = list(history.records())
    assert [record.version for record in records] == list(range(head + 1)), "a version is in neither tier"
    task_ids = [update.task_id for record in records for update in record.updates]
    assert len(task_ids) == len(set(task_ids)), "an update was applied twice"
    result = replay(history, 0, head)
    assert result.ok, result.divergence.describe()


@pytest.mark.parametrize(
    "point, passing",
    [
        ("archive.segment_written", 1),
        ("archive.cursor_moved", 1),
        ("archive.version_trimmed", 1),
        ("archive.version_trimmed", 6),
    ],
)
def test_an_archiver_killed_at_each_step_of_a_move_loses_nothing(store, job, tmp_path, point, passing):
    head = build_history(store, 16)
    url = str(tmp_path / "archive")
    archive = Archive(url).job(job)
    flags = [
        "archive",
        "--job",
        job,
        "--redis-url",
        REDIS_URL,
        "--archive",
        url,
        "--hot-versions",
        str(HOT_VERSIONS),
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
    ]
    killed = fedq(*flags, env={**os.environ, "FEDQ_CRASH_AT": f"{point}:{passing}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Between the crash and the next pass, every version is in one tier or both.
    assert_whole_history_replays(store, archive, head)
    # The dead archiver still holds the job's lock; the next one, on the same host, sees its
    # process is gone and frees it rather than waiting for its expiry.
    assert store.redis.exists(store.keys.archiver_lock)
    finished = fedq(*flags)
    assert finished.returncode == 0, finished.stderr
    assert int(store.redis.get(store.keys.pruned_through)) == head - HOT_VERSIONS
    assert not store.redis.exists(store.keys.model(head - HOT_VERSIONS))
    assert archive.last_archived() == head
    assert_whole_history_replays(store, archive, head)


TRAINING = [
    "--task",
    "digits",
    "--task-params",
    json.dumps({"num_partitions": 3}),
    "--local-epochs",
    "1",
    "--learning-rate",
    "0.1",
    "--batch-size",
    "16",
]


def run_federation_killed_while_archiving(processes, job, url: str, environment: dict[str, str]) -> None:
    """A FedBuff job whose coordinator is SIGKILLed in its archiver thread, then restarted to the end."""
    coordinator = [
        "coordinator",
        "--job",
        job,
        "--amqp-url",
        AMQP_URL,
        "--redis-url",
        REDIS_URL,
        *TRAINING,
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "2",
        "--concurrency",
        "3",
        "--max-staleness",
        "2",
        "--max-versions",
        "30",
        "--archive",
        url,
        "--archive-seconds",
        "0.3",
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
    ]
    saved = dict(os.environ)
    os.environ.update(environment)
    try:
        os.environ["FEDQ_CRASH_AT"] = "archive.cursor_moved:3"
        crashing = processes.start("coordinator-1", *coordinator)
        del os.environ["FEDQ_CRASH_AT"]
        for index in range(3):
            processes.start(
                f"worker-{index}",
                "worker",
                "--job",
                job,
                "--amqp-url",
                AMQP_URL,
                "--redis-url",
                REDIS_URL,
                "--worker-id",
                f"w{index}",
                "--partition",
                str(index),
            )
        assert crashing.wait(timeout=300) == -signal.SIGKILL, processes.log("coordinator-1")[-3000:]
        restarted = processes.start("coordinator-2", *coordinator)
        assert restarted.wait(timeout=300) == 0, processes.log("coordinator-2")[-3000:]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "event=resumed" in processes.log("coordinator-2")


def test_a_federation_archiving_to_a_local_folder_survives_a_kill_mid_archive(processes, job, store, tmp_path):
    url = str(tmp_path / "archive")
    run_federation_killed_while_archiving(processes, job, url, {})
    archive = Archive(url).job(job)
    head = store.versions.head()
    assert head == 30 and archive.last_archived() == head  # the last pass ran when the job finished
    hot_window = 2 + 2  # max_staleness + 2
    assert int(store.redis.get(store.keys.pruned_through)) == head - hot_window
    assert_whole_history_replays(store, archive, head)
    replayed = subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", "replay", "--job", job, "--redis-url", REDIS_URL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replayed.returncode == 0 and f"all {head} verified bit for bit" in replayed.stdout, replayed.stderr


def test_a_federation_archiving_to_s3_survives_a_kill_mid_archive(processes, job, store, s3_archive_server):
    url = s3_archive_server.url(f"fedq/{job}")
    run_federation_killed_while_archiving(processes, job, url, s3_archive_server.env)
    archive = Archive(url, s3_archive_server.storage_options).job(job)
    head = store.versions.head()
    assert archive.last_archived() == head and archive.size() > 0
    assert all(segment.path.startswith(f"{s3_archive_server.bucket}/") for segment in archive.segments())
    assert_whole_history_replays(store, archive, head)
    # The command line reaches the same bucket from the environment alone.
    replayed = fedq("replay", "--job", job, "--redis-url", REDIS_URL, env=s3_archive_server.child_environment())
    assert replayed.returncode == 0 and f"all {head} verified bit for bit" in replayed.stdout, replayed.stderr
