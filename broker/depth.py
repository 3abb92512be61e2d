"""Queue depth: ready and unacknowledged messages, and consumers, per queue.

A passive ``queue_declare`` reports ready messages only; in-progress
(unacknowledged) work shows only in the management HTTP API. We ask the API
when it answers and fall back to AMQP otherwise, saying which source was used.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from dataclasses import dataclass

import pika
import pika.exceptions

from fedq.broker.connection import connect

MANAGEMENT_PORT = 15672


@dataclass(frozen=True)
class QueueDepth:
    name: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    exists: bool = True


def management_depths(amqp_url: str, queues: list[str], timeout: float = 2.0) -> list[QueueDepth] | None:
    """Depths from the management API, or None when it is not reachable."""
    params = pika.URLParameters(amqp_url)
    credentials = params.credentials
    vhost = urllib.parse.quote(params.virtual_host, safe="")
    token = b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    depths = []
    for queue in queues:
        url = f"http://{params.host}:{MANAGEMENT_PORT}/api/queues/{vhost}/{urllib.parse.quote(queue, safe='')}"
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                document = json.load(response)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                depths.append(QueueDepth(queue, None, None, None, exists=False))
                continue
            return None
        except (urllib.error.URLError, OSError, ValueError):
            return None
        depths.append(QueueDepth(queue, document.get("messages_ready", 0),
                                 document.get("messages_unacknowledged", 0), document.get("consumers", 0)))
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


def queue_depths(amqp_url: str, queues: list[str]) -> tuple[str, list[QueueDepth]]:
    """(source, depths): source is 'management' or 'amqp'."""
    depths = management_depths(amqp_url, queues)
    if depths is not None:
        return "management", depths
    return "amqp", amqp_depths(amqp_url, queues)
