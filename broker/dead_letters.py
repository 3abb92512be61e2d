"""What a dead letter says about itself: why it died, where it came from, and how to send it back.

Three kinds of letter reach ``fedq.<job>.dead``:

* the coordinator's and the workers' rejections, with fedq's reason, detail and
  origin headers (:func:`fedq.broker.transport.dead_letter_headers`);
* the broker's own, past a quorum queue's delivery limit: no fedq headers, but
  RabbitMQ's ``x-first-death-reason`` / ``x-first-death-queue`` and ``x-death``;
* anything anyone published to the dead exchange, possibly with headers pika's
  stock decoder cannot decode (see :mod:`fedq.broker.header_decoding`).

Pure functions of the decoded headers, so ``fedq dead`` and its tests share them.
"""

from __future__ import annotations

import base64
import math
from datetime import datetime
from decimal import Decimal
from typing import Any

from fedq.broker.pika_transport import encodable
from fedq.broker.topology import Topology
from fedq.broker.transport import DELIVERY_COUNT_HEADER, DETAIL_HEADER, ORIGIN_HEADER, ORIGINS, REASON_HEADER

# What RabbitMQ puts on a message it dead-letters itself.
BROKER_DEATH_REASON_HEADER = "x-first-death-reason"
BROKER_DEATH_QUEUE_HEADER = "x-first-death-queue"
BROKER_DEATHS_HEADER = "x-death"
# A letter that says nothing about why it died.
UNKNOWN_REASON = "unknown"
# A letter that says nothing, but carries a header pika's stock decoder would have failed on.
UNDECODABLE_REASON = "undecodable"

# Values past this can only come from a 'T' timestamp (unsigned 64-bit): every AMQP
# integer type pika decodes to an int is signed 64-bit or narrower.
_SIGNED_64_BIT_LIMIT = 2**63


def _text(value: Any) -> str | None:
    """A header value as text, if it is one (pika leaves strings that aren't UTF-8 as bytes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return None


def _latest_broker_death(headers: dict[str, Any]) -> dict[str, Any]:
    """The most recent entry of RabbitMQ's ``x-death`` list (most recent first), or {}."""
    deaths = headers.get(BROKER_DEATHS_HEADER)
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def had_undecodable_header(headers: dict[str, Any]) -> bool:
    """Whether a header held a value pika's stock decoder fails on, decoded by our tolerant one.

    Stock pika turns every AMQP float into an int, so any float here is a non-finite one
    the tolerant decoder let through; an int of 2^63 or more is a 'T' timestamp past
    year 9999. (A timestamp between year 10000 and 2^63 seconds decodes to an int that
    cannot be told from an ordinary one: those letters stay "unknown".)
    """

    def undecodable(value: Any) -> bool:
        if isinstance(value, float):
            return True
        if isinstance(value, int) and not isinstance(value, bool):
            return value >= _SIGNED_64_BIT_LIMIT
        if isinstance(value, dict):
            return any(undecodable(item) for item in value.values())
        if isinstance(value, list):
            return any(undecodable(item) for item in value)
        return False

    return undecodable(headers)


def letter_reason(headers: dict[str, Any]) -> str:
    """fedq's reason, else the broker's (e.g. ``delivery_limit``), else "undecodable" or "unknown"."""
    for reason in (
        headers.get(REASON_HEADER),
        headers.get(BROKER_DEATH_REASON_HEADER),
        _latest_broker_death(headers).get("reason"),
    ):
        if text := _text(reason):
            return text
    return UNDECODABLE_REASON if had_undecodable_header(headers) else UNKNOWN_REASON


def letter_origin(headers: dict[str, Any], topology: Topology) -> str | None:
    """The queue a letter came off, as one of ``ORIGINS``; None when nothing says.

    fedq's origin header first; for a letter the broker dead-lettered, the queue it
    names, if it is this job's update or task queue.
    """
    origin = _text(headers.get(ORIGIN_HEADER))
    if origin in ORIGINS:
        return origin
    queues = {topology.updates: "updates", topology.tasks: "tasks"}
    for queue in (headers.get(BROKER_DEATH_QUEUE_HEADER), _latest_broker_death(headers).get("queue")):
        if (text := _text(queue)) is not None and text in queues:
            return queues[text]
    return None


def letter_detail(headers: dict[str, Any]) -> str:
    return _text(headers.get(DETAIL_HEADER)) or ""


def origin_exchange(origin: str, topology: Topology) -> str:
    """Where a letter from ``origin`` goes back to."""
    return {"updates": topology.updates, "tasks": topology.tasks}[origin]


def _is_death_bookkeeping(name: str) -> bool:
    return name in (
        REASON_HEADER,
        DETAIL_HEADER,
        ORIGIN_HEADER,
        DELIVERY_COUNT_HEADER,
        BROKER_DEATHS_HEADER,
    ) or name.startswith(("x-first-death-", "x-last-death-"))


def requeue_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers a requeued letter is published with: the sender's own, as pika can encode them.

    Dropped besides fedq's reason, detail and origin: the broker's death records (they would
    name this death as the next one's origin) and the delivery count (a worker would count
    the old deliveries as failed training attempts), so that a requeued letter starts afresh.
    """
    kept = {
        name: value for name, value in headers.items() if not (isinstance(name, str) and _is_death_bookkeeping(name))
    }
    return encodable(kept)


def json_safe(value: Any) -> Any:
    """A decoded header value as JSON: timestamps as ISO 8601, bytes as text (or base64),
    decimals and non-finite floats as strings."""
    if isinstance(value, dict):
        return {_text(key) if isinstance(key, bytes) else str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no inf or nan
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Decimal):
        return str(value)
    return repr(value)
