"""A small run of the hostile-message fuzzer (``bench/fuzz.py``) on the real RabbitMQ and Redis: more than a
hundred messages, of every kind but one or two, at a running job with two honest workers. None is applied,
every one gets the outcome it should (a dead letter with the expected reason, a skipped duplicate, an accepted
refusal), no service dies, and training goes on afterwards.
"""

from __future__ import annotations

import io
import sys

from bench import fuzz_messages
from bench.fuzz import print_report, run
from tests.support import AMQP_URL, REDIS_URL

# Enough for 46 of the 47 kinds with seed 7 (fuzz_messages.plan covers the kinds first); the
# bench runs thousands. Each task-family message costs a worker a refusal: fewer keep the suite short.
MESSAGES = 120


def test_hostile_messages_of_every_kind_are_refused_and_accounted_for_and_training_goes_on(job, tmp_path):
    # Every wait inside is for a condition, bounded generously: the machine is shared and may be slow.
    report = run(
        MESSAGES,
        seed=7,
        job=job,
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        log_dir=tmp_path,
        timeout=240,
        settle_quiet=60,
        progress=sys.stderr,
        cleanup=False,
    )  # the job fixture deletes the job
    table = io.StringIO()
    print_report(report, table)
    table = table.getvalue()

    assert report.hostile_applied == [], table
    assert report.all_alive, table
    assert report.exit_codes["coordinator"] == 0, table
    assert report.tracebacks == {name: 0 for name in report.tracebacks}, table
    # No message cost a connection: headers nested thousands deep and headers that fill the frame
    # once made the coordinator and workers reconnect until the broker gave up on the message.
    assert report.reconnects == {name: 0 for name in report.reconnects}, table
    # Sent: all of them, of every family, and each one accounted for with the outcome it should have.
    assert len(report.sent) == MESSAGES and not report.not_sent and not report.not_delivered, table
    families = {fuzz_messages.KINDS[message.kind].family for message in report.sent}
    assert families == {"updates", "task", "tasks"}, table
    assert len({message.kind for message in report.sent}) >= 30, table
    assert {"deep_header", "frame_filling_header", "forged_deep_header", "forged_frame_filling_header"} <= {
        message.kind for message in report.sent
    }, table
    assert report.unaccounted == 0, table
    assert report.mismatches == [], table
    assert sum(report.rejected.values()) >= len(report.sent) - report.skipped - sum(report.refused.values()) - sum(
        report.worker_refusals.values()
    ), table
    # Training went on: honest updates were applied, and versions were committed after the fuzzing.
    assert report.head_final >= report.head_after_fuzz + 2, table
    assert report.honest_applied > 0, table
