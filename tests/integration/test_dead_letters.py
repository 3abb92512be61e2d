"""`fedq dead` on the real RabbitMQ: a running coordinator's dead letters are listed with their reasons
without being removed, requeued to the update queue they came from, and drained, and a letter with a
header pika cannot decode is listed and drained like any other.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pika
import pika.exceptions

from fedq.broker.topology import Topology
from fedq.common.wire import codec
from fedq.common.wire.messages import InlineDelta, ModelUpdate
from tests.support import AMQP_URL, ROOT, connection_flags, publish_updates, publish_with_undecodable_header, wait_until

REJECTED = {"unknown_task": 3, "not_json": 1, "unknown_job": 1}
EVERY_LETTER = {"made-up-0", "made-up-1", "made-up-2", "garbage", "elsewhere", "undecodable-letter"}


def fedq(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def dead(job: str, *args: str) -> subprocess.CompletedProcess:
    result = fedq("dead", *connection_flags(job), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def letters_as_json(job: str) -> list[dict]:
    return [json.loads(line) for line in dead(job, "--json").stdout.splitlines()]


def dead_letter_count(job: str) -> int:
    from fedq.broker.connection import connect

    connection = connect(AMQP_URL)
    try:
        return connection.channel().queue_declare(Topology(job).dead, passive=True).method.message_count
    finally:
        connection.close()


def wait_for_dead_letters(job: str, count: int) -> None:
    wait_until(
        lambda: dead_letter_count(job) == count,
        60,
        f"the dead-letter queue did not hold {count} letter(s) (it holds {dead_letter_count(job)})",
    )


def update(job: str, task_id: str) -> bytes:
    return ModelUpdate(
        job=job,
        task_id=task_id,
        worker_id="mallory",
        base_version=0,
        num_examples=10,
        delta=InlineDelta(codec.encode({"w": np.zeros(1, dtype=np.float32)})),
    ).to_bytes()


def test_dead_letters_are_listed_requeued_and_drained(processes, job, store):
    processes.start(
        "coordinator",
        "coordinator",
        *connection_flags(job),
        "--task",
        "linear",
        "--concurrency",
        "1",
        "--max-seconds",
        "300",
    )
    processes.wait_for_log("coordinator", "event=initialised", timeout=180)
    publish_updates(
        job,
        {
            **{f"made-up-{index}": update(job, f"made-up-{index}") for index in range(3)},  # never issued
            "garbage": b"\x80 not json",
            "elsewhere": update("another-job", "made-up-3"),
        },
    )
    wait_until(lambda: store.counters.get("rejected") == REJECTED, 60, "the coordinator did not reject the updates")
    publish_with_undecodable_header(job, Topology(job).dead, b"not even an update", "undecodable-letter")
    wait_for_dead_letters(job, 6)

    # Listed with their reasons and counts; nothing taken away, nothing reordered.
    listing = dead(job).stdout
    assert f"6 dead letter(s) in {Topology(job).dead}" in listing, listing
    assert "by reason: unknown_task 3, not_json 1, undecodable 1, unknown_job 1" in listing, listing
    rows = {line.split()[0]: line.split()[1:3] for line in listing.splitlines()[1:] if line.split()[0] in EVERY_LETTER}
    assert rows == {
        **{f"made-up-{index}": ["unknown_task", "updates"] for index in range(3)},
        "garbage": ["not_json", "updates"],
        "elsewhere": ["unknown_job", "updates"],
        "undecodable-letter": ["undecodable", "-"],
    }, listing
    wait_for_dead_letters(job, 6)
    letters = letters_as_json(job)
    assert [letter["message_id"] for letter in letters] == [line.split()[0] for line in listing.splitlines()[1:7]]
    by_id = {letter["message_id"]: letter for letter in letters}
    assert "made-up-0" in by_id["made-up-0"]["detail"]
    assert by_id["garbage"]["size"] == len(b"\x80 not json")
    assert by_id["undecodable-letter"]["headers"]["sent"] == 2**64 - 1
    assert by_id["undecodable-letter"]["origin"] is None
    wait_for_dead_letters(job, 6)

    # A letter nothing says the origin of stays where it is.
    kept = dead(job, "--reason", "undecodable", "--requeue").stdout
    assert "requeued 0 dead letter(s)" in kept and "left 1 in place" in kept and "undecodable-letter" in kept, kept
    wait_for_dead_letters(job, 6)

    # Back to the update queue: the coordinator refuses them again, for the same reason.
    requeued = dead(job, "--reason", "unknown_task", "--requeue").stdout
    assert (
        f"requeued 3 dead letter(s) with reason unknown_task of job {job!r}: unknown_task 3 "
        f"(3 to {Topology(job).updates})" in requeued
    ), requeued
    assert "3 letter(s) with other reasons left in place" in requeued, requeued
    wait_until(
        lambda: store.counters.get("rejected") == {**REJECTED, "unknown_task": 6},
        60,
        "the requeued updates did not reach the coordinator again",
    )
    wait_for_dead_letters(job, 6)
    again = {letter["message_id"]: letter for letter in letters_as_json(job)}
    assert set(again) == EVERY_LETTER
    assert all(again[f"made-up-{index}"]["reason"] == "unknown_task" for index in range(3))

    # Drained: first one reason, then the rest, the undecodable letter included.
    drained = dead(job, "--drain", "--reason", "not_json").stdout
    assert "drained 1 dead letter(s) with reason not_json" in drained, drained
    wait_for_dead_letters(job, 5)
    drained = dead(job, "--drain").stdout
    assert f"drained 5 dead letter(s) of job {job!r}: unknown_task 3, undecodable 1, unknown_job 1" in drained, drained
    wait_for_dead_letters(job, 0)
    assert "Traceback" not in processes.log("coordinator")


def test_a_job_without_a_dead_letter_queue_is_one_sentence(job):
    result = fedq("dead", *connection_flags(job))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"fedq dead: error: job {job!r} has no dead-letter queue {Topology(job).dead} "
        f"(wrong --job or --amqp-url, or no service of the job has run yet)"
    )


def test_a_job_whose_dead_letter_queue_is_classic_keeps_it_and_others_get_a_quorum_queue(job, caplog):
    from fedq.broker.connection import connect
    from fedq.broker.pika_transport import PikaChannel

    topology = Topology(job)
    connection = connect(AMQP_URL, name=f"fedq-test-{job}")
    try:
        # A job of an earlier fedq: its dead-letter queue is classic, and holds a letter.
        connection.channel().queue_declare(topology.dead, durable=True)
        connection.channel().basic_publish("", topology.dead, b"an old letter")
        channel = PikaChannel(connection)
        channel.declare(topology)
        channel.declare(topology)  # (again, as on every reconnect)
        assert "event=classic_dead_letter_queue" in caplog.text
        waiting = channel.channel.queue_declare(topology.dead, passive=True).method.message_count
        assert waiting == 1, "the old letter was lost"
        channel.publish(topology.tasks, b"{}", message_id="still-works")
    finally:
        connection.close()
    fresh = Topology(job + "-fresh")
    connection = connect(AMQP_URL, name=f"fedq-test-{job}")
    try:
        PikaChannel(connection).declare(fresh)
        # Declaring it as a classic queue now fails: it is a quorum queue.
        probe = connection.channel()
        try:
            probe.queue_declare(fresh.dead, durable=True)
            raise AssertionError("the new job's dead-letter queue is a classic queue")
        except pika.exceptions.ChannelClosedByBroker as error:
            assert error.reply_code == 406 and "quorum" in error.reply_text
    finally:
        channel = connection.channel()
        fresh.delete(channel)
        connection.close()
