"""What `fedq status` and `fedq monitor` say about a job's history in two tiers (real Redis):
its Redis memory against the budget the coordinator recorded, the archive's size and how far it
trails the head, and a WARNING line for each that needs attention."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from fedq.coordinator.ops.status import ArchiveReader
from tests.s3_server import s3_archive_server  # noqa: F401  (fixture)
from tests.support import REDIS_URL, ROOT, connection_flags

# 400 KB of float32 weights per version: the three versions the hot tier keeps pass 80 % of a 1 MiB budget.
PARAMETERS = 100_000
VERSIONS = 12
HOT_VERSIONS, CHECKPOINT_EVERY, BUDGET_MB = 3, 5, 1


def fedq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )


def commit_versions(store, count: int) -> int:
    """Versions 0..count-1 as the coordinator commits them, dated an hour ago: a job that stopped
    committing, so the archive's lag is judged against the hot window alone (no commit rate)."""
    rng = np.random.default_rng(0)
    head, created = None, time.time() - 3600
    for index in range(count):
        weights = {"w": rng.normal(0, 1, PARAMETERS).astype(np.float32)}
        head = store.versions.commit(head, weights, metrics={"loss": 1.0 / (index + 1)}, created=created + index)
    return head


def status_json(job: str, env: dict | None = None) -> dict:
    result = fedq("status", *connection_flags(job), "--json", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def test_status_shows_memory_against_budget_archive_size_and_lag(store, job, tmp_path):
    head = commit_versions(store, VERSIONS)
    archive = tmp_path / "a"
    store.status.record_archive(str(archive), HOT_VERSIONS, CHECKPOINT_EVERY, BUDGET_MB)

    # Nothing archived yet: the archive trails the head by every version, more than two hot windows.
    before = status_json(job)
    assert before["archive"]["url"] == str(archive) and before["archive"]["bytes"] == 0
    assert before["archive"]["archived_through"] is None and before["archive"]["lag_versions"] == head + 1
    assert any(
        "versions behind the head" in warning and "archiver stuck" in warning for warning in before["warnings"]
    ), before["warnings"]

    moved = fedq("archive", "--job", job, "--redis-url", REDIS_URL, "--archive", str(archive))
    assert moved.returncode == 0, moved.stderr
    assert f"archive holds versions 0..{head}; {head + 1 - HOT_VERSIONS} version(s) left Redis" in moved.stdout

    report = status_json(job)
    assert report["redis_budget_bytes"] == BUDGET_MB * 2**20
    assert report["redis_memory_bytes"] == sum(report["redis_memory_by_kind"].values())
    # The hot tier alone: three versions of 400 KB weights.
    assert HOT_VERSIONS * PARAMETERS * 4 <= report["redis_memory_bytes"] < 2 * HOT_VERSIONS * PARAMETERS * 4
    assert report["archive"]["bytes"] > 0
    assert report["archive"]["bytes"] == sum(path.stat().st_size for path in (archive / job).iterdir())
    assert report["archive"]["archived_through"] == head and report["archive"]["lag_versions"] == 0
    assert report["archive"]["pruned_through"] == head - HOT_VERSIONS
    assert (
        len(report["warnings"]) == 1 and "Redis memory" in report["warnings"][0] and "budget" in report["warnings"][0]
    ), report["warnings"]
    # What `status` reported before the archive, still there (`fedq jobs` and scripts read them).
    assert report["head"] == head and report["metrics"] == {"loss": pytest.approx(1.0 / VERSIONS)}
    assert {"queues", "workers", "progress", "in_flight", "state"} <= set(report)

    text = fedq("status", *connection_flags(job))
    assert text.returncode == 0, text.stderr
    used_percent = round(100 * report["redis_memory_bytes"] / 2**20)
    assert (
        f"Redis memory {report['redis_memory_bytes'] / 2**20:.1f} MiB of a 1.0 MiB budget ({used_percent} %)"
        in text.stdout
    ), text.stdout
    assert (
        f"archive {archive}: " in text.stdout
        and f"holds versions 0..{head}, 0 version(s) behind the head" in text.stdout
    ), text.stdout
    warnings = [line.strip() for line in text.stdout.splitlines() if line.strip().startswith("WARNING:")]
    assert len(warnings) == 1 and "above 80%" in warnings[0] and "--redis-budget-mb" in warnings[0], text.stdout

    frame = fedq("monitor", *connection_flags(job), "--once")
    assert frame.returncode == 0, frame.stderr
    assert "Redis memory" in frame.stdout and "1.0 MiB budget" in frame.stdout
    assert "WARNING: Redis memory" in frame.stdout and "0 version(s) behind the head" in frame.stdout


def test_without_an_archive_redis_keeps_everything(store, job):
    commit_versions(store, 2)
    store.status.record_archive(None, HOT_VERSIONS, CHECKPOINT_EVERY, 2048)
    report = status_json(job)
    assert report["archive"]["url"] is None and report["archive"]["lag_versions"] is None
    assert report["warnings"] == [] and 0 < report["redis_memory_bytes"] < report["redis_budget_bytes"]
    text = fedq("status", *connection_flags(job))
    assert "no archive: Redis keeps everything" in text.stdout and "WARNING" not in text.stdout, text.stdout


def test_an_unreadable_archive_is_a_warning_not_a_traceback(store, job):
    commit_versions(store, 2)
    store.status.record_archive("nosuchprotocol://bucket/prefix", HOT_VERSIONS, CHECKPOINT_EVERY, 2048)
    report = status_json(job)
    assert report["archive"]["bytes"] is None
    assert any(
        warning.startswith("cannot read the archive nosuchprotocol://bucket/prefix") for warning in report["warnings"]
    ), report["warnings"]
    text = fedq("status", *connection_flags(job))
    assert text.returncode == 0 and "WARNING: cannot read the archive" in text.stdout, text.stdout + text.stderr


def test_an_archive_that_does_not_answer_is_given_up_on():
    class Hanging:
        def size(self) -> int:
            time.sleep(30)
            return 0

    reader = ArchiveReader(timeout=0.3)
    reader._job_archive = lambda url, job: Hanging()
    started = time.monotonic()
    assert reader.size("s3://slow/archive", "j") == (None, "no answer within 0.3 s")
    assert time.monotonic() - started < 5


def test_status_reads_an_s3_archive_and_warns_when_it_is_down(store, job, s3_archive_server):  # noqa: F811
    server = s3_archive_server
    head = commit_versions(store, 6)
    url = server.url(f"status-{job}")
    store.status.record_archive(url, HOT_VERSIONS, CHECKPOINT_EVERY, 2048)
    environment = server.child_environment()
    moved = fedq("archive", "--job", job, "--redis-url", REDIS_URL, env=environment)
    assert moved.returncode == 0, moved.stderr

    report = status_json(job, env=environment)
    assert report["archive"]["bytes"] > 0 and report["archive"]["lag_versions"] == 0, report
    assert report["archive"]["archived_through"] == head and report["warnings"] == []

    server.kill()
    started = time.monotonic()
    report = status_json(job, env=environment)
    assert time.monotonic() - started < 60
    assert report["archive"]["bytes"] is None
    assert any(warning.startswith(f"cannot read the archive {url}") for warning in report["warnings"]), report
