"""The README's first command ends in `fedq demo`: it must train to its target and say so, in a job
of its own, never touching another user's job on the same servers."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import numpy as np

from fedq.common.store import ModelStore, connect_redis
from fedq.coordinator.ops.demo import QUIET_SECONDS
from tests.support import AMQP_URL, REDIS_URL, ROOT, cleanup_job


def fedq(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def test_the_demo_reaches_its_target_in_a_fresh_job_and_says_how_to_remove_it(tmp_path):
    result = fedq(
        "demo",
        "--amqp-url",
        AMQP_URL,
        "--redis-url",
        REDIS_URL,
        "--workers",
        "2",
        "--target",
        "0.85",
        "--log-dir",
        str(tmp_path),
    )
    named = re.match(r"fedq demo: job '(demo-\d{8}-\d{6}-[0-9a-f]{4})'", result.stdout)
    job = named and named[1]
    try:
        assert job, "the demo did not name its job at start:\n" + result.stdout[:2000]
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        # Progress without a terminal: a line per new version (or one every 10 s), and while no
        # update has come yet, a word that it is awaited (workers load torch and their data first).
        progress = [(float(at), text) for at, text in re.findall(r"^\[ *([0-9.]+)s\] (.*)$", result.stdout, re.M)]
        assert progress and all(
            "waiting for the first update" in text for _, text in progress if re.search(r"updates applied +0 ", text)
        ), progress[:5]
        # The same line again only after QUIET_SECONDS without news, however slowly the run went
        # (the last line, printed at exit, aside).
        repeats = [(line, after) for line, after in zip(progress[:-2], progress[1:-1]) if line[1] == after[1]]
        assert all(after[0] - line[0] >= QUIET_SECONDS - 0.2 for line, after in repeats), repeats
        summary = result.stdout.split("\nsummary\n", 1)[1]
        assert "stopped because      target_reached" in summary
        accuracy = float(summary.split("final accuracy", 1)[1].split()[0])
        assert accuracy >= 0.85
        assert f"fedq history --job {job}\n" in summary
        # The printed command removes the job (the test's URLs are the defaults, so it names none).
        remove = re.search(r"remove it +(fedq delete .*)", summary)[1]
        assert remove == f"fedq delete --job {job} --archive"
        store = ModelStore(connect_redis(REDIS_URL), job)
        assert store.versions.last_committed() is not None
        removed = fedq(*shlex.split(remove)[1:], "--yes", timeout=120)
        assert removed.returncode == 0, removed.stderr
        assert not list(store.redis.scan_iter(match=store.keys.all()))
    finally:
        if job:
            cleanup_job(job)


def test_the_demo_refuses_a_job_that_already_exists_and_leaves_it_alone(store, job):
    # Another user's job on the same servers: the demo must neither train on it nor delete it.
    head = store.versions.commit(None, {"layer.weight": np.ones((4, 4), np.float32)})
    keys = set(store.redis.scan_iter(match=store.keys.all()))
    result = fedq("demo", "--job", job, "--amqp-url", AMQP_URL, "--redis-url", REDIS_URL, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"fedq demo: error: job {job!r} already exists on these servers; continue it with --resume, or leave out "
        "--job to train a new one"
    )
    assert set(store.redis.scan_iter(match=store.keys.all())) == keys
    assert store.versions.last_committed() == head
