"""The worker: ``service`` is the task loop (consume, train off-thread, publish, ack);
``training`` runs one task's local training and packs the update; ``cli`` is ``fedq worker``.
"""
