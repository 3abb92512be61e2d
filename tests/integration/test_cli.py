"""User errors end in one clear sentence, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, wait_until


def fedq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


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
    # Bad RabbitMQ addresses: a host name that does not resolve (retried: a Service may be about to
    # appear), a port that is not a number, no scheme (pika would take both for localhost).
    (
        ["status", "--job", "x", "--amqp-url", "amqp://guest:guest@no-such-host.invalid:5672/"],
        "cannot reach RabbitMQ at amqp://guest:***@no-such-host.invalid:5672/ after 2 attempts: the host name "
        "'no-such-host.invalid' does not resolve",
    ),
    (
        ["worker", "--job", "x", "--amqp-url", "amqp://guest:guest@no-such-host.invalid:5672/"],
        "the host name 'no-such-host.invalid' does not resolve",
    ),
    (
        ["status", "--job", "x", "--amqp-url", "amqp://guest:secret@rabbit:port/"],
        "--amqp-url='amqp://guest:***@rabbit:port/' is not valid: its port is not a number",
    ),
    (["status", "--job", "x", "--amqp-url", "rabbit.example.org"], "an AMQP URL starts with amqp:// or amqps://"),
    # No broker on 5673: the management API guessed on 15672 is the shared broker's (it listens on
    # 5672), whose queues status once reported as this one's, exit 0. Now it asks AMQP, and says.
    (
        ["status", "--job", "x", "--amqp-url", "amqp://guest:guest@127.0.0.1:5673/"],
        "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:5673/",
    ),
    # A cluster's nodes as a list: each is tried, and the error names each one's failure; a list
    # whose nodes log in differently is a copying mistake, refused before anything connects.
    (
        ["worker", "--job", "x", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/,amqp://guest:guest@127.0.0.1:2/"],
        "amqp://guest:***@127.0.0.1:2/: AMQPConnectionError",
    ),
    (
        ["status", "--job", "x", "--amqp-url", "amqp://a:pw@rabbit-1:5672/,amqp://b:pw@rabbit-2:5672/"],
        "the URLs of a list must name the same user, password and virtual host",
    ),
    # Settings that the rest of the configuration would ignore without a word.
    (
        ["coordinator", "--job", "x", "--algorithm", "fedavg", "--example-weighted"],
        "--example-weighted has no effect without --algorithm fedbuff",
    ),
    (
        ["coordinator", "--job", "x", "--algorithm", "fedasync", "--buffer-size", "5"],
        "--buffer-size has no effect without --algorithm fedbuff",
    ),
    (
        ["coordinator", "--job", "x", "--algorithm", "fedbuff", "--trim-fraction", "0.2"],
        "--trim-fraction has no effect without --robust trimmed_mean",
    ),
    (
        ["coordinator", "--job", "x", "--staleness-bound", "fixed", "--damp-above", "3"],
        "--damp-above has no effect without --staleness-bound adaptive",
    ),
    (["coordinator", "--job", "x", "--target", "90"], "--target=90.0 is not a score the tasks reach"),
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
            running[index] = subprocess.Popen(
                [sys.executable, "-m", "fedq.common.cli", *USER_ERRORS[index][0]],
                cwd=ROOT,
                text=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

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
        results[index] = subprocess.CompletedProcess(
            process.args,
            process.returncode,
            (folder / f"{index}.out").read_text(),
            (folder / f"{index}.err").read_text(),
        )
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


def test_version_and_argument_errors_are_one_line():
    version = fedq("--version")
    assert version.returncode == 0 and version.stdout.startswith("fedq 0."), version
    interval = fedq("monitor", "--job", "x", "--interval", "-1")
    assert interval.returncode == 2 and "'-1' is not a refresh interval" in interval.stderr
    assert "Traceback" not in interval.stderr
    show = fedq("show", "--job", "x", "newest")
    assert show.returncode == 2 and "'newest' is not a version: give a number, or head (latest)" in show.stderr


def test_help_names_each_default_once_and_no_default_for_a_required_job():
    text = fedq("worker", "--help").stdout
    assert "(default None)" not in text and "(default )" not in text and "(default: host-pid-random) (" not in text
    assert "required, or FEDQ_JOB" in text
    monitor = fedq("monitor", "--help").stdout
    assert "seconds between refreshes (default: 1)" in " ".join(monitor.split())


@pytest.fixture
def one_version_job(request):
    """A job with version 0 in the real Redis, as a coordinator leaves it."""
    from fedq.common.store import ModelStore, connect_redis
    from tests.support import REDIS_URL, cleanup_job, publish_job

    job = f"t-cli-{request.node.name[:24]}"
    cleanup_job(job)
    publish_job(ModelStore(connect_redis(REDIS_URL), job))
    yield job
    cleanup_job(job)


def test_history_commands_take_head_and_fail_in_one_sentence(one_version_job, tmp_path):
    job = one_version_job
    shown = fedq("show", "--job", job, "head")
    assert shown.returncode == 0 and f"version 0 of job {job!r}" in shown.stdout, shown.stderr
    latest = fedq("export", "--job", job, "latest", "-o", str(tmp_path / "model.safetensors"))
    assert latest.returncode == 0 and "wrote version 0" in latest.stdout, latest.stderr
    missing = fedq("export", "--job", job, "head", "-o", str(tmp_path / "missing-dir" / "model.safetensors"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(f"fedq export: error: cannot write {tmp_path}")


def test_a_reader_that_leaves_early_ends_the_command_quietly(one_version_job):
    # `fedq history | head -1`: the pipe closes after one line; no BrokenPipeError traceback.
    pipeline = subprocess.run(
        f"{sys.executable} -m fedq.common.cli history --job {one_version_job} | head -1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pipeline.stdout.strip() and "Traceback" not in pipeline.stderr and "BrokenPipe" not in pipeline.stderr


def test_a_coordinator_that_cannot_reach_rabbitmq_leaves_no_job_in_redis():
    from fedq.common.store import connect_redis
    from tests.support import REDIS_URL

    job = "t-cli-coordinator-without-rabbitmq"
    result = fedq("coordinator", "--job", job, "--amqp-url", "amqp://guest:guest@127.0.0.1:1/", timeout=120)
    assert result.returncode == 1 and "cannot reach RabbitMQ" in result.stderr.strip().splitlines()[-1]
    assert not list(connect_redis(REDIS_URL).scan_iter(match=f"fedq:{{{job}}}*")), "the job was written to Redis"


def test_one_job_file_serves_every_command(tmp_path):
    job_file = tmp_path / "job.toml"
    job_file.write_text("""
[job]
job = "t-cli-one-file"
buffer_size = 5              # the coordinator's: status and the worker leave it alone

[coordinator]
algorithm = "fedbuff"

[worker]
partition = 1
""")
    status = fedq("status", "--config", str(job_file))
    assert status.returncode == 0 and "t-cli-one-file" in status.stdout, status.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text('[job]\njob = "j"\nbufer_size = 5\n')
    refused = fedq("status", "--config", str(typo))
    assert refused.returncode == 1 and "no fedq command reads bufer_size (did you mean buffer_size?)" in refused.stderr
    dashed = tmp_path / "dashed.toml"
    dashed.write_text('[job]\njob = "j"\nbuffer-size = 5\n')
    assert "write buffer_size for buffer-size" in fedq("status", "--config", str(dashed)).stderr


@pytest.mark.parametrize(
    "command",
    [
        ["status", "--job", "no-such-job-in-redis"],
        ["history", "--job", "no-such-job"],
        ["dead", "--job", "no-such-job"],
        ["jobs"],
    ],
)
def test_commands_that_need_no_model_answer_without_importing_torch(command):
    # torch takes seconds to import (tens on a busy machine): an answer or an error must not wait for it.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedq.common.cli", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "fedq.common.cli" in imported and "torch" not in imported, result.stderr[-2000:]
