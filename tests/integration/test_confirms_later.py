"""Publishing without waiting for each confirm, on a real RabbitMQ: every message lands, and the
broker's refusals (no queue bound, a closed channel) come back by message id."""

from __future__ import annotations

import pika
import pytest

from fedq.broker.connection import connect
from fedq.broker.pika_transport import PikaChannel
from fedq.broker.topology import Topology
from tests.support import AMQP_URL, wait_until


def refused_after_confirms(channel: PikaChannel, connection: pika.BlockingConnection, expected: int) -> list[str]:
    """Every refusal reported once the broker confirmed everything (the connection must do I/O)."""
    refused: list[str] = []

    def settled() -> bool:
        connection.process_data_events(time_limit=0.05)
        refused.extend(channel.refused())
        return len(refused) >= expected and not channel._later._unconfirmed  # type: ignore[union-attr]

    wait_until(settled, 60, "the broker did not confirm every message")
    return refused


@pytest.fixture
def declared(job):
    """(connection, channel, topology) of the job, its topology declared; the connection closed after."""
    connection = connect(AMQP_URL, name=f"fedq-test-{job}")
    try:
        topology = Topology(job)
        channel = PikaChannel(connection)
        channel.declare(topology)
        yield connection, channel, topology
    finally:
        connection.close()


def test_unconfirmed_publishes_all_arrive_and_an_unroutable_one_is_named(job, declared):
    connection, channel, topology = declared
    for index in range(50):
        channel.publish_unconfirmed(topology.tasks, b"{}", message_id=f"task-{index}")
    assert refused_after_confirms(channel, connection, 0) == []
    depth = channel.channel.queue_declare(topology.tasks, passive=True).method.message_count
    assert depth == 50

    # An exchange no queue is bound to: the broker returns the message, then acks it.
    channel.channel.exchange_declare(f"{job}.nowhere", "direct", auto_delete=True)
    channel.publish_unconfirmed(f"{job}.nowhere", b"{}", message_id="lost-1")
    channel.publish_unconfirmed(topology.tasks, b"{}", message_id="kept")
    assert refused_after_confirms(channel, connection, 1) == ["lost-1"]

    # An exchange that does not exist: the broker closes the channel; what it had not
    # confirmed is refused, and the next publish goes out on a fresh channel.
    channel.publish_unconfirmed(f"{job}.missing", b"{}", message_id="lost-2")
    wait_until(
        lambda: connection.process_data_events(time_limit=0.05) or channel._later.channel.is_closed,  # type: ignore[union-attr]
        60,
        "the broker did not close the channel",
    )
    channel.publish_unconfirmed(topology.tasks, b"{}", message_id="after")
    assert refused_after_confirms(channel, connection, 1) == ["lost-2"]
    depth = channel.channel.queue_declare(topology.tasks, passive=True).method.message_count
    assert depth == 52


def test_waiting_counts_the_deliveries_the_consumer_holds_and_they_come_without_waiting(declared):
    """The coordinator reads ahead only what ``waiting()`` says is there: on a real broker, a
    consumer with prefetch 3 and five messages queued holds three, then fewer as it takes them."""
    connection, channel, topology = declared
    for index in range(5):
        channel.publish(topology.updates, b"{}", message_id=f"update-{index}")
    deliveries = channel.consume(topology.updates, prefetch=3, inactivity_timeout=0.05)
    first = next(deliveries)
    assert first is not None
    wait_until(
        lambda: connection.process_data_events(time_limit=0.05) or channel.waiting() == 2,
        60,
        "the consumer never held the two deliveries its prefetch allows beside the first",
    )
    held = [next(deliveries), next(deliveries)]
    assert all(delivery is not None for delivery in held) and channel.waiting() == 0
    channel.cancel()
