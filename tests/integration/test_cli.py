"""User errors end in one clear sentence, not a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, wait_until


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


def backs_off(index: int) -> bool:
    """Whether the case's command retries a server it cannot reach, with back-off (~8 s in all)."""
    return USER_ERRORS[index][1].startswith("cannot reach")


@pytest.fixture(scope="module")
def user_error_runs(tmp_path_factory) -> dict[int, subprocess.CompletedProcess]:
    """Every case's command, run at once: those that cannot reach a server retry with back-off
    for about 8 s each, which one after another cost half a minute. They start first, and the
    others once they are backing off (or done), so that those waits overlap the others' start-up
    (a second or two of CPU each) instead of coming after it: all at once, they queue for the CPU
    with the others before their first attempt."""
    folder = tmp_path_factory.mktemp("user-errors")
    running: dict[int, subprocess.Popen] = {}

    def start(index: int) -> None:
        with open(folder / f"{index}.out", "w") as out, open(folder / f"{index}.err", "w") as err:
            running[index] = subprocess.Popen([sys.executable, "-m", "fedq.common.cli", *USER_ERRORS[index][0]],
                                              cwd=ROOT, text=True, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def backing_off_or_done(index: int) -> bool:
        return running[index].poll() is not None or "retry" in (folder / f"{index}.err").read_text()

    slow = [index for index in range(len(USER_ERRORS)) if backs_off(index)]
    for index in slow:
        start(index)
    # Bounded by the commands themselves (they give up after ~8 s); the deadline only guards a hang.
    wait_until(lambda: all(backing_off_or_done(index) for index in slow), 120, "a command neither retried nor ended")
    for index in range(len(USER_ERRORS)):
        if index not in running:
            start(index)
    results = {}
    for index, process in running.items():
        process.wait(timeout=120)
        results[index] = subprocess.CompletedProcess(process.args, process.returncode,
                                                     (folder / f"{index}.out").read_text(),
                                                     (folder / f"{index}.err").read_text())
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
