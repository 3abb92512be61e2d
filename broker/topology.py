"""Per-job exchanges and queues.

    fedq.<job>.tasks    direct exchange -> quorum queue fedq.<job>.tasks     (coordinator -> workers)
    fedq.<job>.updates  direct exchange -> quorum queue fedq.<job>.updates   (workers -> coordinator)
    fedq.<job>.dead     fanout exchange -> classic queue fedq.<job>.dead     (rejected messages, with a reason)

Quorum queues are durable and replicated, and count deliveries: a message that
keeps killing its consumer is dead-lettered after ``DELIVERY_LIMIT``
redeliveries instead of looping forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from pika.adapters.blocking_connection import BlockingChannel

# High enough that workers killed mid-task (each kill is one redelivery) don't
# lose a task; low enough that a poison message stops within minutes.
DELIVERY_LIMIT = 20
ROUTING_KEY = "fedq"


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

    def declare(self, channel: BlockingChannel) -> None:
        """Idempotently declare everything; safe on every (re)connect."""
        channel.exchange_declare(self.dead, exchange_type="fanout", durable=True)
        channel.queue_declare(self.dead, durable=True)
        channel.queue_bind(self.dead, self.dead)
        for name in (self.tasks, self.updates):
            channel.exchange_declare(name, exchange_type="direct", durable=True)
            channel.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
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
