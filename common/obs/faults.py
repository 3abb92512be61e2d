"""Crash points for fault-injection tests.

``FEDQ_CRASH_AT=point:n`` makes the process SIGKILL itself the n-th time it
passes ``crash_point(point)``: a real, unclean death at an exact place (between
the Redis commit and the acks, say), which a signal from outside cannot hit
reliably. Unset, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("FEDQ_CRASH_AT")
    if not spec:
        return None
    point, _, count = spec.partition(":")
    return point, int(count or 1)


_TARGET = _target()


def crash_point(point: str) -> None:
    if _TARGET is None or _TARGET[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
