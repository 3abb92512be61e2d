"""Compressed updates and differential privacy on the real servers, with real processes: the flags,
what the workers keep, what status, history and replay say."""

from __future__ import annotations

import json
import subprocess
import sys

from fedq.common import privacy
from fedq.common.store.tiers import TieredHistory, open_job_archive
from fedq.common.wire import codec, compression
from tests.support import ROOT, connection_flags

TRAINING = ["--task", "digits", "--local-epochs", "1", "--learning-rate", "0.1", "--batch-size", "16"]


def fedq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_top_k_with_error_feedback_and_central_dp_train_report_epsilon_and_replay(processes, job, store, tmp_path):
    for index in range(2):
        processes.start(
            f"worker-{index}",
            "worker",
            *connection_flags(job),
            "--worker-id",
            f"site-{index}",
            "--partition",
            str(index),
            "--state-dir",
            str(tmp_path / "state"),
        )
    coordinator = processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        *TRAINING,
        "--task-params",
        json.dumps({"num_partitions": 2}),
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "2",
        "--concurrency",
        "2",
        "--staleness-bound",
        "fixed",
        "--compression",
        "topk:fraction=0.05",
        "--dp",
        "central",
        "--dp-clip",
        "2.0",
        "--dp-noise",
        "0.3",
        "--max-versions",
        "15",
    )
    assert coordinator.wait(timeout=300) == 0, processes.log("coordinator")[-3000:]
    head = store.versions.head()
    assert head == 15
    # Every applied update travelled, and stays in Redis, as about a tenth of the dense delta.
    specs = codec.tensor_specs(store.versions.load_weights(0))
    dense = len(codec.encode(store.versions.load_weights(0)))
    history = TieredHistory(store, open_job_archive(store))  # Redis, or the archive for versions moved there
    blobs = [history.update_blob(entry.version, update) for entry in history.records() for update in entry.updates]
    assert len(blobs) == 30
    assert all(compression.decode(blob, specs)[0] == "topk:fraction=0.05" for blob in blobs)
    assert max(len(blob) for blob in blobs) * 7 < dense
    # Both workers keep a residual under their state directory.
    assert len(list((tmp_path / "state" / job).glob("*.residual"))) == 2
    expected_epsilon = privacy.epsilon(0.3, 1.0, 15, 1e-5)
    assert store.versions.load_meta(head).epsilon == expected_epsilon

    status = fedq("status", *connection_flags(job))
    assert status.returncode == 0, status.stderr
    assert "updates sent as topk:fraction=0.05 with error feedback" in status.stdout
    assert f"privacy: central DP, epsilon {expected_epsilon:.3g} (delta 1e-05) after 15 noised steps" in status.stdout
    as_json = json.loads(fedq("status", *connection_flags(job), "--json").stdout)
    assert as_json["privacy"]["epsilon"] == expected_epsilon and as_json["privacy"]["steps"] == 15
    monitor = fedq("monitor", *connection_flags(job), "--once")
    assert f"privacy: central DP, epsilon {expected_epsilon:.3g}" in monitor.stdout, monitor.stdout + monitor.stderr
    history = fedq("history", *connection_flags(job))
    assert "epsilon" in history.stdout.splitlines()[0]
    assert f"{expected_epsilon:.3g}" in history.stdout.splitlines()[16]
    replayed = fedq("replay", *connection_flags(job), "--from", "0")
    assert replayed.returncode == 0 and "all 15 verified bit for bit" in replayed.stdout, (
        replayed.stdout + replayed.stderr
    )


def test_privacy_flags_that_promise_nothing_are_refused_in_one_sentence(job):
    for flags, sentence in [
        (["--dp", "central", "--dp-clip", "1"], "--dp central needs --algorithm fedbuff"),
        (["--dp", "local"], "--dp local needs --dp-clip"),
        (["--dp-clip", "1"], "--dp-clip has no effect without --dp local or central"),
        (["--compression", "topk:fraction=2"], "fraction must be in (0, 1]"),
        (["--error-feedback", "false"], "--error-feedback has no effect without a lossy --compression"),
    ]:
        result = fedq("coordinator", *connection_flags(job), *flags)
        assert result.returncode != 0
        assert sentence in result.stderr and "Traceback" not in result.stderr, (flags, result.stderr)
