"""The seam between the service loops and RabbitMQ: a small transport protocol.

The coordinator's and the worker's loops talk to a :class:`Channel` only:
consume deliveries with manual ack, ack / nack / reject them, publish with a
broker confirm (or without waiting for it, learning of refusals later), purge a
queue, and service the connection while long work runs.
:mod:`fedq.broker.pika_transport` implements it on RabbitMQ,
:mod:`fedq.broker.memory` in memory for the loops' unit tests.

A :class:`Transport` runs a session function on a fresh channel and starts it
again after a lost connection; delivery tags of a lost channel mean nothing
afterwards (unacked messages come back from the broker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedq.broker.topology import Topology

# Headers on dead-lettered messages, for whoever inspects fedq.<job>.dead.
REASON_HEADER = "x-fedq-reason"
DETAIL_HEADER = "x-fedq-detail"
# Which queue a dead letter was taken off: "updates" or "tasks" (``ORIGINS``); `fedq dead
# --requeue` sends it back there.
ORIGIN_HEADER = "x-fedq-origin"
ORIGINS = ("updates", "tasks")
# Quorum queues put on a redelivered message how often it was delivered before.
DELIVERY_COUNT_HEADER = "x-delivery-count"


class AccessRefused(Exception):
    """The broker refused an operation this user has no permission for (AMQP 403)."""


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer, unacked until the consumer says otherwise."""

    tag: int
    body: bytes
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    # The publisher's user as the broker validated it (RabbitMQ refuses a publish whose
    # user_id is not the connection's user); None when the publisher set none.
    user_id: str | None = None


class Channel(Protocol):
    def declare(self, topology: Topology) -> None:
        """Idempotently declare a job's exchanges and queues; raises :class:`AccessRefused` for a
        user without configure permission (a worker enrolled with `fedq admin`)."""

    def wait_for_queue(self, queue: str, should_stop: Callable[[], bool]) -> bool:
        """Wait until ``queue`` exists (someone else declares it); False if ``should_stop()`` first."""

    def remove_stray_bindings(self, topology: Topology) -> None:
        """Undo bindings a worker may add (see ``Topology.remove_stray_bindings``)."""

    def consume(self, queue: str, *, prefetch: int, inactivity_timeout: float) -> Iterator[Delivery | None]:
        """Deliveries from ``queue``, at most ``prefetch`` unacked; None after each quiet ``inactivity_timeout``."""

    def waiting(self) -> int:
        """How many deliveries ``consume``'s iterator holds already: that many come without waiting."""

    def cancel(self) -> None:
        """Stop consuming; prefetched deliveries not yet handled return to the queue."""

    def publish(
        self,
        exchange: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
        user_id: str | None = None,
    ) -> None:
        """Publish a persistent message; returns once the broker confirmed it, raises if it refused.

        ``user_id`` (the connection's user) lets the consumer know who sent it: the broker checks it."""

    def publish_unconfirmed(self, exchange: str, body: bytes, *, message_id: str) -> None:
        """Publish a persistent message and return without waiting for the broker's confirm
        (which costs a round trip per message); :meth:`refused` names it later if the broker
        refused it. For messages whose loss the publisher notices anyway (a task that never comes
        back ends with its lease)."""

    def refused(self) -> list[str]:
        """Message ids from :meth:`publish_unconfirmed` the broker refused (nacked, or no queue took
        them) since the last call; a lost connection's unconfirmed messages are not named."""

    def ack(self, tag: int) -> None: ...

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        """Give a delivery back (``requeue``) or drop it to the dead letters."""

    def reject(self, tag: int) -> None:
        """Refuse a delivery for good: the queue dead-letters it."""

    def purge(self, queue: str) -> None: ...

    def poll(self) -> None:
        """Service the connection (heartbeats) without blocking; call it while long work runs."""


class Transport(Protocol):
    # The user the broker authenticates this transport's connections as (None: not known,
    # e.g. certificate login); a publish's ``user_id``.
    user: str | None

    def run(
        self,
        session: Callable[[Channel], None],
        *,
        name: str,
        should_stop: Callable[[], bool] = ...,
        on_connection_lost: Callable[[], None] = ...,
        also_transient: tuple[type[BaseException], ...] = (),
    ) -> None:
        """Call ``session(channel)`` until it returns or ``should_stop()``; reconnect after a lost connection.

        ``name`` labels the connection (operators find a job's connections by it);
        ``also_transient`` adds errors (e.g. Redis connection errors) that mean
        "wait and start the session again".
        """


def dead_letter_headers(headers: dict[str, Any], reason: str, detail: str, *, origin: str) -> dict[str, Any]:
    """A rejected message's headers plus why it was rejected (the detail cut to 500 characters)
    and which queue it came off (one of ``ORIGINS``)."""
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}, not {origin!r}")
    return {**headers, REASON_HEADER: reason, DETAIL_HEADER: detail[:500], ORIGIN_HEADER: origin}


def delivery_count(delivery: Delivery) -> int:
    """How often the queue delivered this message before (0 on the first delivery).

    Read defensively: the header is the broker's on a quorum queue, but a sender
    may have set anything there on a first delivery.
    """
    count = delivery.headers.get(DELIVERY_COUNT_HEADER, 0)
    return count if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**31 else 0
