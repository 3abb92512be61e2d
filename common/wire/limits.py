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
