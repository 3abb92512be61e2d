"""User errors end in one clear sentence, not a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


def fedq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


USER_ERRORS = [
    (["status", "--job", "x", "--redis-url", "redis://127.0.0.1:1/0"], "cannot reach Redis at redis://127.0.0.1:1/0"),
    (["status"], "name the federation with --job NAME"),
    (["status", "--job", "bad name!"], "--job='bad name!' is not valid"),
    (["worker", "--job", "x", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"], "cannot reach RabbitMQ"),
    (["worker", "--job", "x", "--amqp-url", "amqp://guest:wrong@127.0.0.1:5672/"], "refused the user name or password"),
    (["coordinator", "--job", "x", "--staleness", "sideways"], "unknown staleness function 'sideways'"),
    (["coordinator", "--job", "x", "--task", "no.such.module:Task"], "cannot import task module 'no.such.module'"),
    (["coordinator", "--job", "x", "--concurrency", "0"], "--concurrency='0' is not valid: must be at least 1"),
    (["dead", "--job", "x", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"], "cannot reach RabbitMQ"),
    (["coordinator", "--job", "x", "--archive", "nosuch://bucket/x"], "cannot open the archive 'nosuch://bucket/x'"),
    (["coordinator", "--job", "x", "--max-staleness", "5", "--hot-versions", "3"], "--hot-versions 3 must exceed"),
    (["archive", "--job", "no-such-job-in-redis"], "job 'no-such-job-in-redis' has no versions in Redis"),
    # A UserError raised in a subcommand, under `python -m fedq.common.cli` (the module is then also `__main__`).
    (["history", "--job", "no-such-job-in-redis"], "job 'no-such-job-in-redis' has no versions in Redis"),
]


@pytest.fixture(scope="module")
def user_error_runs() -> dict[int, subprocess.CompletedProcess]:
    """Every case's command, run at once: those that cannot reach a server retry with back-off
    for about 8 s each, which one after another cost half a minute."""
    running = {index: subprocess.Popen([sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for index, (args, _) in enumerate(USER_ERRORS)}
    results = {}
    for index, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        results[index] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("index", range(len(USER_ERRORS)), ids=[case[1][:40] for case in USER_ERRORS])
def test_user_errors_are_one_sentence(user_error_runs, index):
    args, sentence = USER_ERRORS[index]
    result = user_error_runs[index]
    assert result.returncode == 1, result.stderr
    # Retry warnings may come first; the error itself is the last line, one sentence.
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"fedq {args[0]}: error: ") and sentence in last_line, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_lists_the_commands():
    result = fedq("train")
    assert result.returncode == 2
    assert "unknown command 'train'" in result.stderr and "coordinator" in result.stderr
