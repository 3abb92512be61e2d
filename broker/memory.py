"""An in-memory broker with RabbitMQ's semantics where the loops depend on them.

For the loops' unit tests: manual acks, prefetch, requeue on nack and on a lost
connection, dead-lettering on reject and past the quorum queues' delivery limit,
purge. Thread-safe, so a test can run a loop in one thread and play the other
side in another. Not a RabbitMQ emulator: no routing keys, no TTLs.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fedq.broker.topology import DELIVERY_LIMIT, Topology
from fedq.broker.transport import DELIVERY_COUNT_HEADER, Channel, Delivery

# Headers RabbitMQ sets on a dead-lettered message (the first death's reason and queue).
DEATH_REASON_HEADER = "x-first-death-reason"
DEATH_QUEUE_HEADER = "x-first-death-queue"


class ConnectionLost(ConnectionError):
    """The in-memory connection was dropped (``MemoryBroker.drop_connections``)."""


class Unroutable(RuntimeError):
    """Published to an exchange that routes to no queue."""


class UserIdRefused(RuntimeError):
    """A publish whose user_id is not the connection's user: RabbitMQ closes the channel (406)."""


@dataclass
class Message:
    body: bytes
    message_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    returns: int = 0  # times given back to the queue (nack, lost consumer): the quorum delivery count


@dataclass
class _Queue:
    name: str
    dead_letter_exchange: str | None = None
    delivery_limit: int | None = None
    ready: deque[Message] = field(default_factory=deque)
    unacked: int = 0


class MemoryBroker:
    def __init__(self):
        self._condition = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._routes: dict[str, str] = {}  # exchange -> queue
        self._channels: list[MemoryChannel] = []
        self._tags = itertools.count(1)

    # -- what the channels use ------------------------------------------

    def declare(self, topology: Topology) -> None:
        with self._condition:
            for name in (topology.tasks, topology.updates):
                self._queues.setdefault(name, _Queue(name, topology.dead, DELIVERY_LIMIT))
                self._routes[name] = name
            self._queues.setdefault(topology.dead, _Queue(topology.dead))
            self._routes[topology.dead] = topology.dead

    def publish(self, exchange: str, message: Message) -> None:
        with self._condition:
            queue = self._routes.get(exchange)
            if queue is None:
                raise Unroutable(f"exchange {exchange!r} routes to no queue")
            self._queues[queue].ready.append(message)
            self._condition.notify_all()

    def _give_back(self, queue: _Queue, message: Message) -> None:
        """Requeue a delivery, or dead-letter it once it was given back more than the delivery limit."""
        message.returns += 1
        if queue.delivery_limit is not None and message.returns > queue.delivery_limit:
            self._dead_letter(queue, message, "delivery_limit")
        else:
            queue.ready.appendleft(message)
        self._condition.notify_all()

    def _dead_letter(self, queue: _Queue, message: Message, reason: str) -> None:
        if queue.dead_letter_exchange is None:
            return  # dropped, as RabbitMQ drops it
        headers = {**message.headers, DEATH_REASON_HEADER: reason, DEATH_QUEUE_HEADER: queue.name}
        self._queues[self._routes[queue.dead_letter_exchange]].ready.append(
            Message(message.body, message.message_id, headers)
        )
        self._condition.notify_all()

    # -- what tests use -------------------------------------------------

    def open_channel(self, user: str = "guest") -> MemoryChannel:
        with self._condition:
            channel = MemoryChannel(self, user)
            self._channels.append(channel)
            return channel

    def drop_connections(self) -> None:
        """Close every channel as a lost connection would: their unacked deliveries return."""
        with self._condition:
            for channel in list(self._channels):
                channel._close()

    def ready(self, queue: str) -> list[Message]:
        with self._condition:
            return list(self._queues[queue].ready) if queue in self._queues else []

    def unacked(self, queue: str) -> int:
        with self._condition:
            return self._queues[queue].unacked if queue in self._queues else 0

    def get(self, queue: str, timeout: float = 0.0) -> Message | None:
        """Take the next ready message, acked at once (basic_get with auto_ack), waiting up to ``timeout``."""
        with self._condition:
            self._condition.wait_for(lambda: queue in self._queues and self._queues[queue].ready, timeout)
            if queue in self._queues and self._queues[queue].ready:
                return self._queues[queue].ready.popleft()
            return None

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds (re-checked whenever a queue changes), up to ``timeout``."""
        with self._condition:
            return self._condition.wait_for(condition, timeout)


class MemoryChannel:
    def __init__(self, broker: MemoryBroker, user: str = "guest"):
        self.broker = broker
        self.user = user  # the connection's user, as RabbitMQ authenticated it
        self._unacked: dict[int, tuple[_Queue, Message]] = {}
        self._open = True
        self._consuming = False
        self._consumed: tuple[str, int] | None = None  # (queue, prefetch) of the running consume
        self._refused: list[str] = []  # publish_unconfirmed's messages no queue took

    def _check_open(self) -> None:
        if not self._open:
            raise ConnectionLost("the in-memory connection was dropped")

    def _close(self) -> None:
        if not self._open:
            return
        self._open = False
        for queue, message in self._unacked.values():
            queue.unacked -= 1
            self.broker._give_back(queue, message)
        self._unacked.clear()
        self.broker._channels.remove(self)
        self.broker._condition.notify_all()

    def close(self) -> None:
        with self.broker._condition:
            self._close()

    # -- the Channel protocol -------------------------------------------

    def declare(self, topology: Topology) -> None:
        self._check_open()
        self.broker.declare(topology)

    def remove_stray_bindings(self, topology: Topology) -> None:
        """Nothing to undo: the in-memory broker routes each exchange to its one queue."""
        self._check_open()

    def wait_for_queue(self, queue: str, should_stop: Callable[[], bool]) -> bool:
        condition = self.broker._condition
        with condition:
            while not should_stop():
                self._check_open()
                if queue in self.broker._queues:
                    return True
                condition.wait(0.1)
        return False

    def consume(self, queue_name: str, *, prefetch: int, inactivity_timeout: float) -> Iterator[Delivery | None]:
        condition = self.broker._condition
        self._consuming = True
        self._consumed = (queue_name, prefetch)
        while True:
            with condition:
                self._check_open()
                queue = self.broker._queues[queue_name]
                condition.wait_for(  # (the lambda is called here, with this iteration's queue)
                    lambda: not self._open or not self._consuming or (queue.ready and len(self._unacked) < prefetch),  # noqa: B023
                    inactivity_timeout,
                )
                self._check_open()
                if not self._consuming:
                    return
                delivery = None
                if queue.ready and len(self._unacked) < prefetch:
                    message = queue.ready.popleft()
                    tag = next(self.broker._tags)
                    self._unacked[tag] = (queue, message)
                    queue.unacked += 1
                    headers = dict(message.headers)
                    if message.returns:
                        headers[DELIVERY_COUNT_HEADER] = message.returns
                    delivery = Delivery(tag, message.body, message.message_id, headers, message.user_id)
            yield delivery

    def waiting(self) -> int:
        with self.broker._condition:
            if not (self._open and self._consuming and self._consumed):
                return 0
            queue_name, prefetch = self._consumed
            return max(0, min(len(self.broker._queues[queue_name].ready), prefetch - len(self._unacked)))

    def cancel(self) -> None:
        self._consuming = False

    def publish(
        self,
        exchange: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
        user_id: str | None = None,
    ) -> None:
        self._check_open()
        if user_id is not None and user_id != self.user:
            raise UserIdRefused(f"user_id property set to {user_id!r} but the connection's user is {self.user!r}")
        self.broker.publish(exchange, Message(bytes(body), message_id, dict(headers or {}), user_id))

    def publish_unconfirmed(self, exchange: str, body: bytes, *, message_id: str) -> None:
        try:
            self.publish(exchange, body, message_id=message_id)
        except Unroutable:
            self._refused.append(message_id)  # as RabbitMQ returns it, and the caller hears later

    def refused(self) -> list[str]:
        self._check_open()
        refused, self._refused = self._refused, []
        return refused

    def _settle(self, tag: int) -> tuple[_Queue, Message]:
        self._check_open()
        queue, message = self._unacked.pop(tag)
        queue.unacked -= 1
        return queue, message

    def ack(self, tag: int) -> None:
        with self.broker._condition:
            self._settle(tag)
            self.broker._condition.notify_all()

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        with self.broker._condition:
            queue, message = self._settle(tag)
            if requeue:
                self.broker._give_back(queue, message)
            else:
                self.broker._dead_letter(queue, message, "rejected")

    def reject(self, tag: int) -> None:
        self.nack(tag, requeue=False)

    def purge(self, queue: str) -> None:
        with self.broker._condition:
            self._check_open()
            self.broker._queues[queue].ready.clear()

    def poll(self) -> None:
        self._check_open()


class MemoryTransport:
    """Runs a session on a fresh in-memory channel, again after each dropped connection."""

    def __init__(self, broker: MemoryBroker, user: str = "guest"):
        self.broker = broker
        self.user = user
        self.sessions = 0

    def run(
        self,
        session: Callable[[Channel], None],
        *,
        name: str,
        should_stop: Callable[[], bool] = lambda: False,
        on_connection_lost: Callable[[], None] = lambda: None,
        also_transient: tuple[type[BaseException], ...] = (),
    ) -> None:
        while not should_stop():
            channel = self.broker.open_channel(self.user)
            self.sessions += 1
            try:
                session(channel)
                return
            except (ConnectionLost,) + also_transient:
                if should_stop():
                    return
                on_connection_lost()
            finally:
                channel.close()
