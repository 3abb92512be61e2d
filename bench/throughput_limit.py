"""The machine's pipeline limit for ``throughput.py``: the Redis and RabbitMQ operations one update
needs, done back to back with no fedq logic, as updates per second.

Per update, whatever fedq does around them, these have to happen:

- the worker's claim check (when the delta is over the inline limit): SET the delta blob, and the
  coordinator's GET of it;
- the update message through the broker: a confirmed publish of it (the inline delta in base64
  JSON, or the claim's few hundred bytes) and the coordinator's consume and ack;
- one new task: a confirmed publish of a task-sized message (and a worker's consume and ack);
- per version, that is per ``buffer_size`` updates: SET of the model's weights.

They run in one thread, one after the other, so the figure is the rate of the operations
themselves on this machine, servers included: fedq's throughput as a share of it says how much
its own logic (validation, hashing, decoding, aggregation, bookkeeping) costs on top.

The messages go through queues of one of two kinds (``queues``):

- ``"classic"`` (issue 15's yardstick, and what ``throughput.py``'s "of limit" divides by):
  transient messages on an exclusive classic queue, the cheapest a broker offers.
- ``"quorum"``: persistent messages on durable quorum queues, which is what fedq's task and update
  queues are (``broker/topology.py``), because a broker restart must lose no task or update. Each
  confirm then waits for the queue's log, 3-4x longer per message on one node; one after the
  other, the operations are slower than fedq, which keeps several tasks in flight.
  ``throughput.py`` prints it beside the other, for what the queue kind alone costs.
"""

from __future__ import annotations

import base64
import statistics
import time
import uuid
from dataclasses import dataclass

import pika

from fedq.broker.connection import connect
from fedq.broker.topology import QUORUM
from fedq.common.store import connect_redis
from fedq.common.wire.limits import INLINE_LIMIT_BYTES

TASK_MESSAGE_BYTES = 700  # a signed round task, as fedq sends it
CLAIM_MESSAGE_BYTES = 450  # an update message carrying a claim check


QUEUE_KINDS = ("classic", "quorum")
PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)


@dataclass(frozen=True)
class PipelineLimit:
    updates_per_second: float  # median of the rounds
    rounds: list[float]


def pipeline_limit(
    amqp_url: str,
    redis_url: str,
    payload_bytes: int,
    model_bytes: int,
    buffer_size: int,
    *,
    queues: str = "classic",
    seconds: float = 3.0,
    rounds: int = 3,
) -> PipelineLimit:
    """Updates per second of the bare operations one update needs (see the module's docstring),
    through ``queues`` ("quorum" or "classic"): the median of ``rounds`` rounds of about ``seconds`` each."""
    if queues not in QUEUE_KINDS:
        raise ValueError(f"queues must be one of {QUEUE_KINDS}, not {queues!r}")
    durable = queues == "quorum"
    inline = payload_bytes <= INLINE_LIMIT_BYTES
    payload = bytes(payload_bytes)
    update_message = (
        b'{"delta":{"inline":"' + base64.b64encode(payload) + b'"}}' if inline else bytes(CLAIM_MESSAGE_BYTES)
    )
    task_message = bytes(TASK_MESSAGE_BYTES)
    weights = bytes(model_bytes)
    prefix = f"fedq-bench-limit-{uuid.uuid4().hex[:8]}"
    # (its keys share the hash tag {prefix}, as a job's do: one slot of a Redis Cluster)
    redis = connect_redis(redis_url, job=prefix)
    connection = connect(amqp_url, name="fedq-bench-pipeline-limit")
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        names = {}
        for kind in ("updates", "tasks"):
            declared = (
                channel.queue_declare(f"{prefix}.{kind}", durable=True, arguments=QUORUM)
                if durable
                else channel.queue_declare(f"{prefix}.{kind}", exclusive=True, auto_delete=True)
            )
            names[kind] = declared.method.queue
        properties = PERSISTENT if durable else None

        def through_broker(queue: str, body: bytes) -> None:
            channel.basic_publish("", queue, body, properties, mandatory=True)  # returns once confirmed
            method, _properties, _body = channel.basic_get(queue)
            assert method is not None, "a confirmed message was not there to get"
            channel.basic_ack(method.delivery_tag)

        def one_update(index: int) -> None:
            if not inline:
                key = f"{{{prefix}}}:update:{index % 4}"
                redis.set(key, payload)
                redis.get(key)
            through_broker(names["updates"], update_message)
            through_broker(names["tasks"], task_message)
            if index % buffer_size == buffer_size - 1:
                redis.set(f"{{{prefix}}}:model", weights)

        rates = []
        one_update(0)  # connections and buffers warmed up
        for _ in range(rounds):
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds or done % buffer_size:
                one_update(done)
                done += 1
            rates.append(done / (time.perf_counter() - started))
        return PipelineLimit(statistics.median(rates), rates)
    finally:
        redis.delete(f"{{{prefix}}}:model", *(f"{{{prefix}}}:update:{index}" for index in range(4)))
        if durable and connection.is_open:
            cleanup_channel = connection.channel()
            for name in (f"{prefix}.updates", f"{prefix}.tasks"):
                cleanup_channel.queue_delete(name)
        connection.close()
