"""Queue depth: ready and unacknowledged messages, and consumers, per queue.

A passive ``queue_declare`` reports ready messages only; in-progress
(unacknowledged) work shows only in the management HTTP API. We ask the API
when it answers and fall back to AMQP otherwise, saying which source was used.
"""

from __future__ import annotations

from dataclasses import dataclass

import pika
import pika.exceptions

from fedq.broker.connection import connect
from fedq.broker.management import ManagementAPI, ManagementError, quote
from fedq.common.settings import amqp_urls


@dataclass(frozen=True)
class QueueDepth:
    name: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    exists: bool = True


def management_depths(
    amqp_url: str, queues: list[str], management_url: str | None = None, timeout: float = 2.0
) -> list[QueueDepth] | None:
    """Depths from the management API, or None when it is not reachable (or is another broker's)."""
    try:
        api = ManagementAPI.for_amqp_url(amqp_url, management_url, timeout=timeout)
    except ManagementError:
        return None
    vhost = quote(pika.URLParameters(amqp_urls(amqp_url)[0]).virtual_host)
    depths = []
    for queue in queues:
        try:
            document = api.request("GET", f"queues/{vhost}/{quote(queue)}")
        except ManagementError as error:
            if error.status == 404:
                depths.append(QueueDepth(queue, None, None, None, exists=False))
                continue
            return None
        depths.append(
            QueueDepth(
                queue,
                document.get("messages_ready", 0),
                document.get("messages_unacknowledged", 0),
                document.get("consumers", 0),
            )
        )
    return depths


def amqp_depths(amqp_url: str, queues: list[str]) -> list[QueueDepth]:
    """Ready messages and consumers via passive declares (unacked is unknown)."""
    connection = connect(amqp_url, name="fedq-status", attempts=2)
    depths = []
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                frame = channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                depths.append(QueueDepth(queue, None, None, None, exists=False))
                continue
            depths.append(QueueDepth(queue, frame.method.message_count, None, frame.method.consumer_count))
            channel.close()
    finally:
        connection.close()
    return depths


def queue_depths(amqp_url: str, queues: list[str], management_url: str | None = None) -> tuple[str, list[QueueDepth]]:
    """(source, depths): source is 'management' or 'amqp'."""
    depths = management_depths(amqp_url, queues, management_url)
    if depths is not None:
        return "management", depths
    return "amqp", amqp_depths(amqp_url, queues)
