"""Publishing with publisher confirms: a return means RabbitMQ has the message.

With ``confirm_delivery()`` on the channel, ``basic_publish(mandatory=True)``
raises ``UnroutableError`` (no queue bound) or ``NackError`` (broker refused)
synchronously, so nothing is silently dropped.
"""

from __future__ import annotations

import time
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from fedq.broker.topology import ROUTING_KEY

PERSISTENT = pika.DeliveryMode.Persistent


def publish(
    channel: BlockingChannel,
    exchange: str,
    body: bytes,
    *,
    message_id: str,
    headers: dict[str, Any] | None = None,
    routing_key: str = ROUTING_KEY,
    user_id: str | None = None,
) -> None:
    """Publish one persistent JSON message and wait for the broker's confirm."""
    channel.basic_publish(
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        mandatory=True,
        properties=message_properties(message_id, headers, user_id),
    )


def message_properties(
    message_id: str, headers: dict[str, Any] | None = None, user_id: str | None = None
) -> pika.BasicProperties:
    """The properties of a fedq message: persistent JSON, with its id and the time it was sent."""
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=message_id,
        timestamp=int(time.time()),
        headers=headers or {},
        user_id=user_id,
    )
