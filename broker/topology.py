"""Per-job exchanges and queues.

    fedq.<job>.tasks    direct exchange -> quorum queue fedq.<job>.tasks     (coordinator -> workers)
    fedq.<job>.updates  direct exchange -> quorum queue fedq.<job>.updates   (workers -> coordinator)
    fedq.<job>.dead     fanout exchange -> classic queue fedq.<job>.dead     (rejected messages, with a reason)

Quorum queues are durable and replicated, and count deliveries: a message that
keeps killing its consumer is dead-lettered after ``DELIVERY_LIMIT``
redeliveries instead of looping forever.

The dead-letter queue is a quorum queue too. It was a classic queue until jobs ran on
RabbitMQ clusters: a classic queue lives on one node, and while that node was down
every declare of the topology failed ("home node ... is down"), so no service of the
job could connect at all. A job that already has a classic one keeps it
(:data:`LEGACY_DEAD_QUEUE`); deleting it while it is empty lets the next declare
make it a quorum queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from pika.adapters.blocking_connection import BlockingChannel

# High enough that workers killed mid-task (each kill is one redelivery) don't
# lose a task; low enough that a poison message stops within minutes.
DELIVERY_LIMIT = 20
ROUTING_KEY = "fedq"
QUORUM = {"x-queue-type": "quorum"}
# The arguments of a dead-letter queue declared before it became a quorum queue.
LEGACY_DEAD_QUEUE: dict[str, str] = {}


def is_legacy_dead_queue(refusal: str) -> bool:
    """Whether a declare was refused (406) because the job's dead-letter queue is a classic queue."""
    return "x-queue-type" in refusal and "dead" in refusal


@dataclass(frozen=True)
class Topology:
    job: str

    @property
    def tasks(self) -> str:
        return f"fedq.{self.job}.tasks"

    @property
    def updates(self) -> str:
        return f"fedq.{self.job}.updates"

    @property
    def dead(self) -> str:
        return f"fedq.{self.job}.dead"

    @property
    def queues(self) -> tuple[str, str, str]:
        return self.tasks, self.updates, self.dead

    def declare(self, channel: BlockingChannel, *, dead_queue: dict[str, str] = QUORUM) -> None:
        """Idempotently declare everything; safe on every (re)connect. ``dead_queue`` is the dead-letter
        queue's arguments: :data:`LEGACY_DEAD_QUEUE` for a job whose dead-letter queue is classic."""
        channel.exchange_declare(self.dead, exchange_type="fanout", durable=True)
        channel.queue_declare(self.dead, durable=True, arguments=dict(dead_queue))
        channel.queue_bind(self.dead, self.dead)
        for name in (self.tasks, self.updates):
            channel.exchange_declare(name, exchange_type="direct", durable=True)
            channel.queue_declare(
                name,
                durable=True,
                arguments={
                    **QUORUM,
                    "x-delivery-limit": DELIVERY_LIMIT,
                    "x-dead-letter-exchange": self.dead,
                },
            )
            channel.queue_bind(name, name, routing_key=ROUTING_KEY)
        self.remove_stray_bindings(channel)

    def remove_stray_bindings(self, channel: BlockingChannel) -> None:
        """Unbind the update and dead queues from the task exchange. A worker may read the task
        queue, which is also read permission on the task exchange of the same name, and write to
        the update and dead exchanges, also write permission on those queues: enough to bind
        them, and copy every task there. Harmless to call when there is no such binding."""
        for queue in (self.updates, self.dead):
            channel.queue_unbind(queue, self.tasks, routing_key=ROUTING_KEY)

    def delete(self, channel: BlockingChannel) -> None:
        for name in self.queues:
            channel.queue_delete(name)
            channel.exchange_delete(name)
