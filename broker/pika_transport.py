"""The transport on RabbitMQ through pika: confirmed publishing, manual acks, reconnect."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pika
import pika.data

from fedq.broker.connection import HEARTBEAT_SECONDS
from fedq.broker.publisher import publish
from fedq.broker.session import run_with_reconnect
from fedq.broker.topology import Topology
from fedq.broker.transport import Channel, Delivery


def encodable(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers pika can encode again. A dead-lettered message keeps its sender's headers,
    and a hostile sender's may not survive the trip back (an integer past 2^63, say)."""
    kept = {}
    for name, value in headers.items():
        try:
            pika.data.encode_table([], {name: value})
        except Exception:  # noqa: BLE001 - pika raises struct.error, TypeError, its own errors, ...
            continue
        kept[name] = value
    return kept


class PikaChannel:
    """One confirm-mode channel of a blocking connection."""

    def __init__(self, connection: pika.BlockingConnection):
        self.connection = connection
        self.channel = connection.channel()
        self.channel.confirm_delivery()

    def declare(self, topology: Topology) -> None:
        topology.declare(self.channel)

    def consume(self, queue: str, *, prefetch: int, inactivity_timeout: float) -> Iterator[Delivery | None]:
        self.channel.basic_qos(prefetch_count=prefetch)
        for method, properties, body in self.channel.consume(queue, inactivity_timeout=inactivity_timeout):
            if method is None:
                yield None
            else:
                yield Delivery(method.delivery_tag, body, properties.message_id, dict(properties.headers or {}))

    def cancel(self) -> None:
        self.channel.cancel()

    def publish(self, exchange: str, body: bytes, *, message_id: str, headers: dict[str, Any] | None = None) -> None:
        publish(self.channel, exchange, body, message_id=message_id, headers=encodable(headers or {}))

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

    def run(self, session: Callable[[Channel], None], *, name: str, should_stop: Callable[[], bool] = lambda: False,
            on_connection_lost: Callable[[], None] = lambda: None,
            also_transient: tuple[type[BaseException], ...] = ()) -> None:
        run_with_reconnect(self.amqp_url, lambda connection: session(PikaChannel(connection)), name=name,
                           should_stop=should_stop, on_connection_lost=on_connection_lost,
                           also_transient=also_transient, heartbeat=self.heartbeat)
