"""``fedq dead``: a job's dead letters with their reasons; drain them, or requeue them where they came from.

How letters are read without losing or reordering any: one channel takes them with
``basic_get`` and no ack, so each stays unacknowledged on that channel; a letter
the command keeps is simply never acked, and closing the channel gives all of
them back. ``fedq.<job>.dead`` is a *classic* queue (see ``broker/topology.py``):
a classic queue puts returned messages back at their original position, marks
them ``redelivered`` and counts nothing, and it has no dead-letter exchange of
its own, so nothing there is ever dropped for being returned too often. (On a
quorum queue, as checked on RabbitMQ 3.10, every return counts towards the
delivery limit, a closed channel's included, and a nack with requeue also moves
the message to the back: listing would wear letters out and reorder them.)

Only the letters already waiting when the command starts are examined (at most
``--limit``): a requeued letter that its consumer dead-letters again joins the
back of the queue and is not taken a second time.

A requeued letter is acked only after RabbitMQ confirmed its republication: a
crash in between leaves it both requeued and still dead (at least once, never lost).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from fedq.broker.connection import BrokerError, connect
from fedq.broker.dead_letters import (
    json_safe,
    letter_detail,
    letter_origin,
    letter_reason,
    origin_exchange,
    requeue_headers,
)
from fedq.broker.publisher import publish
from fedq.broker.topology import Topology
from fedq.common.cli import UserError
from fedq.common.settings import CONNECTION_OPTIONS, add_options, positive_int, resolve

HELP = (
    "List a job's dead letters with their reasons, without removing them; --drain removes them, "
    "--requeue sends them back to the queue they came from."
)

DEFAULT_LIMIT = 1000
DETAIL_WIDTH = 60
PROGRESS_INTERVAL_SECONDS = 0.5


@dataclass(frozen=True)
class Letter:
    """One dead letter, taken but not yet acked (``tag`` on the command's channel)."""

    tag: int
    message_id: str | None
    reason: str
    origin: str | None
    detail: str
    body: bytes
    headers: dict[str, Any]

    def to_json(self, action: str | None = None) -> dict[str, Any]:
        document = {
            "message_id": self.message_id,
            "reason": self.reason,
            "origin": self.origin,
            "detail": self.detail,
            "size": len(self.body),
            "headers": json_safe(self.headers),
        }
        return document if action is None else {**document, "action": action}


@dataclass
class Tally:
    """What one run saw and did."""

    waiting: int  # letters in the queue when the command started
    examined: int = 0
    not_matching: int = 0  # kept: their reason is not one of --reason
    done: Counter = field(default_factory=Counter)  # listed / drained / requeued, by reason
    destinations: Counter = field(default_factory=Counter)  # requeued, by exchange
    without_origin: list[str] = field(default_factory=list)  # message ids --requeue could not place
    rows: list[str] = field(default_factory=list)  # the listing's table (text, not the letters' bodies)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CONNECTION_OPTIONS)
    parser.add_argument(
        "--reason",
        action="append",
        default=None,
        metavar="REASON",
        help="only letters with this reason; repeat it or give a comma-separated list",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"examine at most the first N letters (default {DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per letter (with --drain/--requeue: what was done to it)",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--drain", action="store_true", help="remove the (matching) letters for good")
    action.add_argument(
        "--requeue",
        action="store_true",
        help="publish the (matching) letters again to the update or task queue they came from",
    )


def wanted_reasons(given: list[str] | None) -> set[str] | None:
    """--reason a --reason b,c -> {a, b, c}; None (every reason) when not given."""
    if not given:
        return None
    reasons = {reason.strip() for value in given for reason in value.split(",") if reason.strip()}
    if not reasons:
        raise UserError("--reason needs at least one reason name")
    return reasons


def main(args: argparse.Namespace) -> int:
    values = resolve(args, CONNECTION_OPTIONS)
    topology = Topology(values["job"])
    reasons = wanted_reasons(args.reason)
    connection = connect(values["amqp_url"], name="fedq-dead", attempts=2)
    try:
        tally = _run(connection.channel(), topology, args, reasons)
    except pika.exceptions.AMQPError as error:
        cause = error.reply_text if isinstance(error, pika.exceptions.ChannelClosedByBroker) else repr(error)
        raise BrokerError(
            f"RabbitMQ failed while working on {topology.dead} ({cause}); "
            f"the letters not yet drained or requeued stay in the queue"
        ) from None
    finally:
        try:
            connection.close()  # gives back every letter taken and not acked
        except pika.exceptions.AMQPError:
            pass
    _report(tally, topology, args, reasons)
    return 0


def _run(channel: BlockingChannel, topology: Topology, args: argparse.Namespace, reasons: set[str] | None) -> Tally:
    try:
        waiting = channel.queue_declare(topology.dead, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 404:
            raise
        raise UserError(
            f"job {topology.job!r} has no dead-letter queue {topology.dead} "
            f"(wrong --job or --amqp-url, or no service of the job has run yet)"
        ) from None
    if args.requeue:
        channel.confirm_delivery()
    tally = Tally(waiting)
    # Progress only where it cannot garble the output: text output is printed at the end.
    show_progress = sys.stderr.isatty() and not args.json
    for letter in _take(channel, topology, min(waiting, args.limit), tally, show_progress):
        if reasons is not None and letter.reason not in reasons:
            tally.not_matching += 1
            continue
        action = "listed"
        if args.drain:
            channel.basic_ack(letter.tag)
            action = "drained"
        elif args.requeue:
            action = _requeue(channel, topology, letter, tally)
        if action != "left_in_place":
            tally.done[letter.reason] += 1
        if args.json:
            print(json.dumps(letter.to_json(None if action == "listed" else action)), flush=True)
        elif action == "listed":
            tally.rows.append(_row(letter))
    channel.close()  # the letters kept, listed or left in place go back, in their order
    return tally


def _take(
    channel: BlockingChannel, topology: Topology, count: int, tally: Tally, show_progress: bool
) -> Iterator[Letter]:
    """The first ``count`` letters of the queue, each unacked until the caller acks it."""
    last_progress = time.monotonic()
    for _ in range(count):
        method, properties, body = channel.basic_get(topology.dead, auto_ack=False)
        if method is None:
            break  # someone else took the rest
        # A message basic_get returns carries its tag, properties and body (pika's stubs leave each optional).
        assert method.delivery_tag is not None and properties is not None and body is not None
        tally.examined += 1
        headers = dict(properties.headers or {})
        yield Letter(
            tag=method.delivery_tag,
            message_id=properties.message_id,
            reason=letter_reason(headers),
            origin=letter_origin(headers, topology),
            detail=letter_detail(headers),
            body=body,
            headers=headers,
        )
        if show_progress and time.monotonic() - last_progress > PROGRESS_INTERVAL_SECONDS:
            last_progress = time.monotonic()
            print(f"\rexamined {tally.examined}/{count} dead letters", end="", file=sys.stderr, flush=True)
    if show_progress and tally.examined:
        print("\r\033[K", end="", file=sys.stderr, flush=True)  # erase the progress line


def _requeue(channel: BlockingChannel, topology: Topology, letter: Letter, tally: Tally) -> str:
    if letter.origin is None:
        tally.without_origin.append(letter.message_id or "-")
        return "left_in_place"
    exchange = origin_exchange(letter.origin, topology)
    already = sum(tally.done.values())
    try:
        publish(
            channel,
            exchange,
            letter.body,
            message_id=letter.message_id or uuid.uuid4().hex,
            headers=requeue_headers(letter.headers),
        )
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
        raise UserError(
            f"RabbitMQ did not take letter {letter.message_id} back to {exchange} (no queue bound, "
            f"or refused); it and the letters after it stay dead, {already} were requeued"
        ) from None
    except pika.exceptions.ChannelClosedByBroker as error:
        raise UserError(
            f"cannot publish to {exchange} ({error.reply_text}); letter {letter.message_id} and "
            f"the letters after it stay dead, {already} were requeued"
        ) from None
    channel.basic_ack(letter.tag)  # only now: RabbitMQ confirmed the copy
    tally.destinations[exchange] += 1
    return "requeued"


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())  # details may hold newlines (tracebacks)
    return text if len(text) <= width else text[: width - 3] + "..."


TABLE_HEADER = f"  {'message id':<34} {'reason':<22} {'origin':<8} {'size':>9}  detail"


def _row(letter: Letter) -> str:
    return (
        f"  {_cut(letter.message_id or '-', 34):<34} {_cut(letter.reason, 22):<22} {letter.origin or '-':<8} "
        f"{len(letter.body):>9}  {_cut(letter.detail, DETAIL_WIDTH)}"
    )


def _by_reason(counts: Counter) -> str:
    """ "unknown_task 3, not_json 1": the most frequent first, then by name."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason} {count}" for reason, count in ordered)


def _report(tally: Tally, topology: Topology, args: argparse.Namespace, reasons: set[str] | None) -> None:
    """The summary: on stdout, or on stderr when stdout carries JSON for a script."""
    out = sys.stderr if args.json else sys.stdout
    if args.json and not (args.drain or args.requeue):
        return  # a listing in JSON is the letters alone
    done = sum(tally.done.values())
    matching = f" with reason {', '.join(sorted(reasons))}" if reasons else ""
    if args.drain:
        print(
            f"drained {done} dead letter(s){matching} of job {topology.job!r}"
            + (f": {_by_reason(tally.done)}" if done else ""),
            file=out,
        )
    elif args.requeue:
        where = ", ".join(f"{count} to {exchange}" for exchange, count in sorted(tally.destinations.items()))
        print(
            f"requeued {done} dead letter(s){matching} of job {topology.job!r}"
            + (f": {_by_reason(tally.done)} ({where})" if done else ""),
            file=out,
        )
        if tally.without_origin:
            print(
                f"left {len(tally.without_origin)} in place: nothing says which queue they came from "
                f"(message ids: {', '.join(tally.without_origin)})",
                file=out,
            )
    else:
        if tally.rows:
            print("\n".join([TABLE_HEADER, *tally.rows]), file=out)
        print(
            f"job {topology.job!r}: {tally.waiting} dead letter(s) in {topology.dead}"
            + (f", {done}{matching}" if reasons else ""),
            file=out,
        )
        if done:
            of_listed = f" (of the first {tally.examined})" if tally.waiting > args.limit else ""
            print(f"  by reason{of_listed}: {_by_reason(tally.done)}", file=out)
    if tally.not_matching and (args.drain or args.requeue):
        print(f"{tally.not_matching} letter(s) with other reasons left in place", file=out)
    not_examined = tally.waiting - args.limit
    if not_examined > 0:
        print(f"{not_examined} letter(s) after the first {args.limit} not examined (raise --limit)", file=out)
