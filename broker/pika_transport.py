"""The transport on RabbitMQ through pika: confirmed publishing, manual acks, reconnect."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.channel
import pika.data
import pika.exceptions

from fedq.broker.connection import HEARTBEAT_SECONDS
from fedq.broker.publisher import message_properties, publish
from fedq.broker.session import run_with_reconnect
from fedq.broker.topology import LEGACY_DEAD_QUEUE, QUORUM, ROUTING_KEY, Topology, is_legacy_dead_queue
from fedq.broker.transport import DETAIL_HEADER, ORIGIN_HEADER, REASON_HEADER, AccessRefused, Channel, Delivery
from fedq.common.obs.logs import kv
from fedq.common.settings import amqp_urls

# Room in a content header frame for everything but the headers: frame and property overhead,
# a message id of up to 255 bytes, and the x-delivery-count the broker adds on redelivery.
OTHER_PROPERTIES_ROOM = 2048
DROPPED_HEADER = "x-fedq-dropped-headers"
_OURS = (REASON_HEADER, DETAIL_HEADER, ORIGIN_HEADER)

log = logging.getLogger("fedq.broker")
LEGACY_ADVICE = (
    "it lives on one node of a cluster, and the job cannot connect while that node is down; "
    "delete it while it is empty (after fedq dead) to have it made a quorum queue"
)


def encodable(headers: dict[str, Any], frame_max: int = pika.spec.FRAME_MAX_SIZE) -> dict[str, Any]:
    """The headers pika can encode again, in one frame. A dead-lettered message keeps its sender's
    headers, and a hostile sender's may not survive the trip back: an integer past 2^63, or headers
    that filled the frame before our reason was added (the broker would close the connection).
    The largest of the sender's headers go first; the letter names them in ``x-fedq-dropped-headers``."""
    sizes = {}
    for name, value in headers.items():
        try:
            sizes[name] = pika.data.encode_table([], {name: value})
        except Exception:  # noqa: BLE001 - pika raises struct.error, TypeError, its own errors, ...
            continue
    budget, total = frame_max - OTHER_PROPERTIES_ROOM, sum(sizes.values())
    dropped = []
    for name in sorted((name for name in sizes if name not in _OURS), key=sizes.__getitem__, reverse=True):
        if total <= budget:
            break
        total -= sizes.pop(name)
        dropped.append(name)
    kept = {name: headers[name] for name in sizes}
    if dropped:
        kept[DROPPED_HEADER] = ",".join(dropped)[:500]
    return kept


# How long a new channel may take to enter confirm mode before the connection counts as lost.
CONFIRM_SELECT_SECONDS = 30.0


class ConfirmsLater:
    """A confirm-mode channel whose publishes return at once: the broker's acks and nacks are
    settled as they arrive, while the connection does other work (consuming, acking).

    pika's ``BlockingChannel`` waits for every confirm (one round trip per message); it has no
    mode that collects them later. So confirm mode is turned on with the channel's underlying
    asynchronous ``pika.channel.Channel`` (``_impl``), whose callbacks pika runs whenever the
    blocking connection processes input, and messages are published through the blocking
    channel, which then only flushes them to the socket.
    """

    def __init__(self, connection: pika.BlockingConnection):
        self.channel = connection.channel()
        self._unconfirmed: dict[int, str] = {}  # delivery tag -> message id
        self._next_tag = 1  # the broker numbers a confirm-mode channel's publishes from 1
        self._returned: set[str] = set()  # unroutable: the broker returns them, then acks them
        self._refused: list[str] = []
        selected: list[bool] = []
        implementation: pika.channel.Channel = getattr(self.channel, "_impl")  # noqa: B009 - private, see above
        implementation.add_on_return_callback(self._on_return)
        implementation.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _: selected.append(True))
        deadline = time.monotonic() + CONFIRM_SELECT_SECONDS
        while not selected:
            if time.monotonic() > deadline:
                raise pika.exceptions.AMQPConnectionError("the broker did not turn on publisher confirms")
            connection.process_data_events(time_limit=0.05)

    def publish(self, exchange: str, body: bytes, *, message_id: str) -> None:
        # Counted before it goes out: while basic_publish flushes the message, pika processes
        # input, and the broker's confirm of this very message may arrive then. Counted after,
        # that confirm found no tag and the message stayed unconfirmed for good (seen in CI).
        self._unconfirmed[self._next_tag] = message_id
        self._next_tag += 1
        self.channel.basic_publish(
            exchange=exchange,
            routing_key=ROUTING_KEY,
            body=body,
            mandatory=True,
            properties=message_properties(message_id),
        )

    def refused(self, *, unconfirmed_too: bool = False) -> list[str]:
        """The ids refused since the last call (and, ``unconfirmed_too``, those not yet confirmed)."""
        refused, self._refused = self._refused, []
        if unconfirmed_too:
            refused += self._unconfirmed.values()
            self._unconfirmed.clear()
        return refused

    def _on_return(self, _channel: Any, _method: Any, returned: pika.BasicProperties, _body: bytes) -> None:
        if returned.message_id is not None:
            self._returned.add(returned.message_id)

    def _on_confirm(self, frame: Any) -> None:
        confirm = frame.method
        tags = (
            [tag for tag in self._unconfirmed if tag <= confirm.delivery_tag]
            if confirm.multiple
            else [confirm.delivery_tag]
        )
        for tag in tags:
            message_id = self._unconfirmed.pop(tag, None)
            if message_id is None:
                continue
            if isinstance(confirm, pika.spec.Basic.Nack) or message_id in self._returned:
                self._returned.discard(message_id)
                self._refused.append(message_id)


class PikaChannel:
    """A confirm-mode channel of a blocking connection, and a second one for publishing
    without waiting for each confirm (:class:`ConfirmsLater`)."""

    def __init__(self, connection: pika.BlockingConnection):
        self.connection = connection
        self.channel = connection.channel()
        self.channel.confirm_delivery()
        self._later: ConfirmsLater | None = None  # opened by the first publish_unconfirmed
        self._refused_earlier: list[str] = []  # by a ConfirmsLater channel the broker closed

    def declare(self, topology: Topology) -> None:
        dead_queue = QUORUM
        while True:
            try:
                topology.declare(self.channel, dead_queue=dead_queue)
                return
            except pika.exceptions.ChannelClosedByBroker as error:
                legacy = error.reply_code == 406 and is_legacy_dead_queue(error.reply_text)
                if error.reply_code != 403 and not (legacy and dead_queue is QUORUM):
                    raise
                self._reopen()
                if error.reply_code == 403:
                    raise AccessRefused(error.reply_text) from None
                log.warning(kv("classic_dead_letter_queue", queue=topology.dead, advice=LEGACY_ADVICE))
                dead_queue = LEGACY_DEAD_QUEUE

    def wait_for_queue(self, queue: str, should_stop: Callable[[], bool], poll_seconds: float = 1.0) -> bool:
        while not should_stop():
            try:
                self.channel.queue_declare(queue, passive=True)  # needs no permission
                return True
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code != 404:
                    raise
                self._reopen()
                self.connection.sleep(poll_seconds)  # heartbeats go on
        return False

    def remove_stray_bindings(self, topology: Topology) -> None:
        topology.remove_stray_bindings(self.channel)

    def _reopen(self) -> None:
        """A new channel in place of one the broker closed."""
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def consume(self, queue: str, *, prefetch: int, inactivity_timeout: float) -> Iterator[Delivery | None]:
        self.channel.basic_qos(prefetch_count=prefetch)
        for method, properties, body in self.channel.consume(queue, inactivity_timeout=inactivity_timeout):
            if method is None:
                yield None
            else:
                # A delivery always carries its tag, properties and body (pika's stubs leave each optional).
                assert method.delivery_tag is not None and properties is not None and body is not None
                yield Delivery(
                    method.delivery_tag, body, properties.message_id, dict(properties.headers or {}), properties.user_id
                )

    def waiting(self) -> int:
        return self.channel.get_waiting_message_count()

    def cancel(self) -> None:
        self.channel.cancel()

    def publish(
        self,
        exchange: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
        user_id: str | None = None,
    ) -> None:
        publish(
            self.channel,
            exchange,
            body,
            message_id=message_id,
            headers=encodable(headers or {}, self._frame_max()),
            user_id=user_id,
        )

    def publish_unconfirmed(self, exchange: str, body: bytes, *, message_id: str) -> None:
        if self._later is None or self._later.channel.is_closed:
            # The broker closed the channel (say, the exchange was deleted): what it had not
            # confirmed counts as refused, and a new channel takes over.
            self._refused_earlier = self.refused()
            self._later = ConfirmsLater(self.connection)
        self._later.publish(exchange, body, message_id=message_id)

    def refused(self) -> list[str]:
        refused, self._refused_earlier = self._refused_earlier, []
        if self._later is not None:
            refused += self._later.refused(unconfirmed_too=self._later.channel.is_closed)
        return refused

    def _frame_max(self) -> int:
        """The frame size this connection negotiated with the broker (pika keeps it in its parameters)."""
        implementation = getattr(self.connection, "_impl", None)
        return getattr(getattr(implementation, "params", None), "frame_max", None) or pika.spec.FRAME_MAX_SIZE

    def ack(self, tag: int) -> None:
        self.channel.basic_ack(tag)

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        self.channel.basic_nack(tag, requeue=requeue)

    def reject(self, tag: int) -> None:
        self.channel.basic_reject(tag, requeue=False)

    def purge(self, queue: str) -> None:
        self.channel.queue_purge(queue)

    def poll(self) -> None:
        self.connection.process_data_events(time_limit=0)


class PikaTransport:
    def __init__(self, amqp_url: str, *, heartbeat: int = HEARTBEAT_SECONDS):
        self.amqp_url = amqp_url
        self.heartbeat = heartbeat
        # (every node of a list names the same user: common.settings checks it)
        credentials = pika.URLParameters(amqp_urls(amqp_url)[0]).credentials
        # The user the broker will authenticate: what a publish's user_id must be (None: certificate login).
        self.user: str | None = getattr(credentials, "username", None)

    def run(
        self,
        session: Callable[[Channel], None],
        *,
        name: str,
        should_stop: Callable[[], bool] = lambda: False,
        on_connection_lost: Callable[[], None] = lambda: None,
        also_transient: tuple[type[BaseException], ...] = (),
    ) -> None:
        run_with_reconnect(
            self.amqp_url,
            lambda connection: session(PikaChannel(connection)),
            name=name,
            should_stop=should_stop,
            on_connection_lost=on_connection_lost,
            also_transient=also_transient,
            heartbeat=self.heartbeat,
        )
