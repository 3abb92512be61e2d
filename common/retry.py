"""The bounded, backing-off retry both services use to reach RabbitMQ and Redis at startup.

A server that is still starting (or a network blip) is waited for; a wrong URL,
password or a server that stays down ends in one clear error within ~8 s
instead of a hang.
"""

from __future__ import annotations

from collections.abc import Iterator

CONNECT_ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0


def backoff_delays(attempts: int = CONNECT_ATTEMPTS) -> Iterator[float]:
    """The waits between ``attempts`` tries: 0.5, 1, 2, 4, ... seconds, at most MAX_BACKOFF_SECONDS."""
    delay = FIRST_BACKOFF_SECONDS
    for _ in range(attempts - 1):
        yield delay
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)
