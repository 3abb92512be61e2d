"""Scheduling policies: how many tasks to hand out, and when the buffer is ready for a server step.

Asynchronous modes (FedAsync, FedBuff) keep ``concurrency`` tasks training and
hand out a replacement as soon as an update arrives: clients never wait for the
buffer. Synchronous FedAvg dispatches ``concurrency`` tasks at one version and
steps when every one of them has come back or was rejected: the barrier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SchedulingPolicy(Protocol):
    def tasks_to_dispatch(self, in_flight: int, buffered: int) -> int:
        """How many new tasks to hand out now."""

    def buffer_ready(self, in_flight: int, buffered: int) -> bool:
        """Whether the buffered updates should be applied now."""


@dataclass(frozen=True)
class BufferedAsync:
    concurrency: int
    buffer_size: int

    def tasks_to_dispatch(self, in_flight: int, buffered: int) -> int:
        return max(self.concurrency - in_flight, 0)

    def buffer_ready(self, in_flight: int, buffered: int) -> bool:
        return buffered >= self.buffer_size


@dataclass(frozen=True)
class SynchronousBarrier:
    concurrency: int

    def tasks_to_dispatch(self, in_flight: int, buffered: int) -> int:
        # A new round only once the last one is applied: nothing out, nothing buffered.
        return self.concurrency if in_flight == 0 and buffered == 0 else 0

    def buffer_ready(self, in_flight: int, buffered: int) -> bool:
        # The barrier: every task of the round has come back or was rejected.
        return buffered > 0 and in_flight == 0


def scheduling_policy(synchronous: bool, concurrency: int, buffer_size: int) -> SchedulingPolicy:
    return SynchronousBarrier(concurrency) if synchronous else BufferedAsync(concurrency, buffer_size)
