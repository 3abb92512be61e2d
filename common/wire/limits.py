"""Size limits and lifetimes of what travels between the coordinator and workers."""

from __future__ import annotations

# A delta above this travels as a Redis claim check instead of inside the message
# (RabbitMQ 4 caps messages at 16 MiB; large messages also stall the broker).
INLINE_LIMIT_BYTES = 256 * 1024
# Claim-checked deltas outlive any sensible queueing delay, then expire by themselves.
UPDATE_BLOB_TTL_SECONDS = 7 * 24 * 3600
# A task whose local training raised is retried (by whichever worker takes it next)
# until it has been delivered this many times, then dead-lettered with the error.
TRAINING_ATTEMPTS = 3
# Everything of an update message but its delta (ids, metrics, JSON): generous, and still
# small enough that a message over the bound is refused before it is parsed.
UPDATE_ENVELOPE_BYTES = 64 * 1024
# A round task is a few hundred bytes; anything much larger is not one.
MAX_TASK_MESSAGE_BYTES = 64 * 1024


def max_update_message_bytes(max_delta_bytes: int) -> int:
    """The largest update message that can carry a delta of at most ``max_delta_bytes`` (base64 inline)."""
    return 4 * -(-max_delta_bytes // 3) + UPDATE_ENVELOPE_BYTES
