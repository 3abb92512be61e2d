"""A job's lifecycle on shared servers: `fedq jobs` lists every job, `fedq delete` removes one whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pika.exceptions
import pytest

from fedq.broker.connection import connect
from fedq.broker.topology import Topology
from fedq.common.store import ModelStore
from tests.support import AMQP_URL, REDIS_URL, ROOT, cleanup_job, fedq_side_by_side

pytestmark = pytest.mark.integration


def fedq(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # stdin is not a terminal here (as in CI), which `fedq delete` must notice.
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def commit_versions(store: ModelStore, count: int, committed_at: float | None = None) -> int:
    """Versions 0..count-1 of a small model, committed as a coordinator would (no updates: enough for a
    listing), at ``committed_at`` (default: now)."""
    rng = np.random.default_rng(0)
    when = {} if committed_at is None else {"created": committed_at}
    head = None
    for _ in range(count):
        weights = {"layer.weight": rng.normal(size=(16, 8)).astype(np.float32)}
        head = store.versions.commit(head, weights, metrics={"accuracy": 0.5}, **when)
    return head


def declare_queues(job: str) -> None:
    connection = connect(AMQP_URL)
    try:
        Topology(job).declare(connection.channel())
    finally:
        connection.close()


def existing_queues(job: str) -> list[str]:
    connection = connect(AMQP_URL)
    found = []
    try:
        for queue in Topology(job).queues:
            try:
                connection.channel().queue_declare(queue, passive=True)
                found.append(queue)
            except pika.exceptions.ChannelClosedByBroker:
                pass
    finally:
        connection.close()
    return found


def job_keys(store: ModelStore) -> set[bytes]:
    return set(store.redis.scan_iter(match=store.keys.all(), count=1000))


def last_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def other_job():
    name = "t-jobs-other-" + uuid.uuid4().hex[:6]
    yield name
    cleanup_job(name)


@pytest.fixture
def archived_job(store, job, tmp_path) -> Path:
    """``job`` with 8 versions, its older history moved to an archive in tmp_path; returns the archive root."""
    commit_versions(store, 8)
    archive = tmp_path / "archive"
    store.status.record_archive(str(archive), 3, 5, 2048)
    moved = fedq(
        "archive",
        "--job",
        job,
        "--redis-url",
        REDIS_URL,
        "--archive",
        str(archive),
        "--hot-versions",
        "3",
        "--checkpoint-every",
        "5",
    )
    assert moved.returncode == 0, moved.stderr
    assert list((archive / job).glob("segment-*.fqseg")), "fedq archive wrote no segment"
    return archive


def test_jobs_lists_every_job_with_its_head_memory_and_archive(store, job, other_job, archived_job):
    other = ModelStore(store.redis, other_job)
    commit_versions(other, 2)
    listed, table, only = fedq_side_by_side(  # listing changes nothing
        ["jobs", "--redis-url", REDIS_URL, "--json"],
        ["jobs", "--redis-url", REDIS_URL],
        ["jobs", "--redis-url", REDIS_URL, "--job", other_job, "--json"],
        stdin=subprocess.DEVNULL,
    )
    assert listed.returncode == 0, listed.stderr
    by_name = {entry["job"]: entry for entry in json.loads(listed.stdout)}  # other users' jobs may be listed too
    mine = by_name[job]
    assert mine["head"] == 7 and mine["redis_bytes"] > 0 and mine["workers"] == 0
    assert mine["archive_bytes"] > 0 and mine["archive_url"] == str(archived_job / job)
    theirs = by_name[other_job]
    assert theirs["head"] == 1 and theirs["redis_bytes"] > 0
    assert theirs["archive_url"] is None and theirs["archive_bytes"] is None

    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows[job][2] == "7" and rows[job][-1] == str(archived_job / job)
    assert rows[other_job][2] == "1" and rows[other_job][-1] == "-"
    assert [entry["job"] for entry in json.loads(only.stdout)] == [other_job]


def test_a_job_whose_coordinator_only_started_is_listed_without_a_head(store, job):
    store.redis.set(store.keys.spec, b"{}")  # what a coordinator writes before its first commit
    store.status.set(status="running")
    listed = json.loads(fedq("jobs", "--redis-url", REDIS_URL, "--job", job, "--json").stdout)
    assert listed == [
        {
            "job": job,
            "status": "running",
            "head": None,
            "workers": 0,
            "redis_bytes": listed[0]["redis_bytes"],
            "archive_url": None,
            "archive_bytes": None,
            "archive_problem": None,
        }
    ]


def test_an_archive_that_cannot_be_read_is_a_question_mark_and_a_sentence(store, job):
    commit_versions(store, 1)
    store.status.record_archive("nosuchprotocol://bucket/archive", 3, 5)
    table = fedq("jobs", "--redis-url", REDIS_URL, "--job", job)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].split()[-2:] == ["?", f"nosuchprotocol://bucket/archive/{job}"]
    assert last_error_line(table).startswith(f"job {job!r}: cannot open the archive")
    refused = fedq("delete", job, "--yes", "--archive", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert refused.returncode == 1 and "nothing deleted" in last_error_line(refused)
    assert job_keys(store)


def test_listing_jobs_does_not_import_torch():
    probe = "import sys, fedq.coordinator.ops.jobs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_delete_without_yes_refuses_when_input_is_not_a_terminal(store, job):
    commit_versions(store, 1)
    before = job_keys(store)
    result = fedq("delete", "--job", job, "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert result.returncode == 1
    line = last_error_line(result)
    assert line.startswith("fedq delete: error: ") and "without confirmation" in line and "--yes" in line
    assert job_keys(store) == before


@pytest.mark.parametrize("typed, deleted", [("not-the-name", False), (None, True)])
def test_delete_asks_to_type_the_job_name_on_a_terminal(store, job, typed, deleted):
    commit_versions(store, 1)
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedq.common.cli", "delete", job, "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL],
            cwd=ROOT,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(controller, f"{typed or job}\n".encode())
        stdout, stderr = process.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert f"This deletes job {job!r}: " in stdout and "Type the job name to confirm" in stdout
    assert (process.returncode == 0) == deleted, stderr
    assert bool(job_keys(store)) != deleted
    if not deleted:
        assert stderr.strip().splitlines()[-1] == f"fedq delete: error: not confirmed; job {job!r} was not deleted"


def test_delete_removes_the_keys_queues_and_archive(store, job, archived_job):
    declare_queues(job)
    assert len(existing_queues(job)) == 3
    keys = len(job_keys(store))
    result = fedq("delete", "--job", job, "--yes", "--archive", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert result.returncode == 0, result.stderr
    assert f"deleted job {job!r}: {keys} Redis key(s)" in result.stdout
    assert all(queue in result.stdout for queue in Topology(job).queues)
    assert "of archive segments in " + str(archived_job / job) in result.stdout
    assert job_keys(store) == set()
    assert existing_queues(job) == []
    assert not (archived_job / job).exists()


def test_delete_without_archive_keeps_it_and_says_where(store, job, archived_job):
    result = fedq("delete", job, "--yes", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert result.returncode == 0, result.stderr
    assert f"kept its archive in {archived_job / job}" in result.stdout
    assert job_keys(store) == set() and list((archived_job / job).glob("segment-*.fqseg"))


def test_a_running_job_is_deleted_only_with_force(store, job):
    commit_versions(store, 2)
    store.status.set(status="running")  # updated now: its coordinator just started
    before = job_keys(store)
    refused = fedq("delete", job, "--yes", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert refused.returncode == 1
    line = last_error_line(refused)
    assert f"job {job!r} is running" in line and "--force" in line
    assert job_keys(store) == before
    forced = fedq("delete", job, "--yes", "--force", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert forced.returncode == 0, forced.stderr
    assert job_keys(store) == set()


def test_a_job_left_running_by_a_killed_coordinator_is_deleted_without_force(store, job):
    # Killed without a chance to record it: its state still says running, but nothing moved for an hour.
    an_hour_ago = time.time() - 3600
    commit_versions(store, 2, committed_at=an_hour_ago)
    store.redis.set(store.keys.state, json.dumps({"status": "running", "updated": an_hour_ago}))
    result = fedq("delete", job, "--yes", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert result.returncode == 0, result.stderr
    assert job_keys(store) == set()


def test_a_running_job_with_a_consumer_on_its_update_queue_is_refused(store, job):
    an_hour_ago = time.time() - 3600
    commit_versions(store, 1, committed_at=an_hour_ago)
    store.redis.set(store.keys.state, json.dumps({"status": "running", "updated": an_hour_ago}))
    declare_queues(job)
    connection = connect(AMQP_URL)  # a coordinator that has been idle for an hour, but is there
    try:
        channel = connection.channel()
        channel.basic_consume(Topology(job).updates, lambda *delivery: None)
        refused = fedq("delete", job, "--yes", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    finally:
        connection.close()
    assert refused.returncode == 1
    assert "1 consumer(s) read its update queue" in last_error_line(refused)


def test_deleting_a_job_that_does_not_exist_says_so(job):
    result = fedq("delete", job, "--yes", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL)
    assert result.returncode == 1
    assert f"job {job!r} has no keys in Redis" in last_error_line(result)


def test_the_job_to_delete_is_named_on_the_command_line_not_by_the_environment(store, job):
    commit_versions(store, 1)
    result = subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", "delete", "--yes", "--redis-url", REDIS_URL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        env={**os.environ, "FEDQ_JOB": job},
    )
    assert result.returncode == 1 and "name the job to delete on the command line" in last_error_line(result)
    assert job_keys(store)
