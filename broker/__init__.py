"""RabbitMQ plumbing for fedq. The service loops see only ``transport`` (a small protocol:
consume, ack, nack, reject, publish, purge, poll); ``pika_transport`` implements it on RabbitMQ
(``connection`` with bounded retry, ``session`` reconnecting, ``topology``, ``publisher`` with
confirms), ``memory`` in memory for unit tests; ``depth`` reads queue depths for operators,
``dead_letters`` what a dead letter's headers say (reason, origin) for ``fedq dead``.
Imports only ``fedq.common``.
"""
