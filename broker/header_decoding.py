"""Header values pika cannot decode must not cost a connection.

pika 1.4.4 turns a field-table timestamp (``'T'``) into a ``datetime``; a value
past year 9999 (anyone may publish one: 2^64-1, or milliseconds where seconds
were meant) raises ``OverflowError`` or ``ValueError`` inside the frame decoder.
pika reports that as a lost stream, the message comes back on reconnect, and
the consumer reconnects again and again until the queue's delivery limit
dead-letters it: minutes without progress from one message (pika/pika#1698).
Non-finite ``'f'``/``'d'`` values fail the same way (pika converts them with
``int``). A table or array nested a few thousand deep (a frame holds 128 KiB: room
for tens of thousands of levels) exhausts Python's stack in pika's recursive decoder
with ``RecursionError``, with the same result.

:func:`install` wraps pika's ``decode_value`` so that such a value decodes to
its raw number (seconds as an ``int``, the float as it is) and the message is
delivered like any other, and so that a table or array nested deeper than
:data:`MAX_DEPTH` decodes to :data:`TOO_DEEP` without being descended into.
Upstream fixed the timestamp case in pika/pika#1699, not yet in a release; the
wrapper stays harmless once it is.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pika.data

# Far deeper than any header fedq or a broker writes, far shallower than the stack allows.
MAX_DEPTH = 32
TOO_DEEP = f"<nested deeper than {MAX_DEPTH} levels: not decoded>"

_lock = threading.Lock()
_original: Callable[[bytes, int], tuple[Any, int]] | None = None
_nesting = threading.local()  # .depth: tables and arrays being decoded around the current value


def _tolerant_decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    assert _original is not None  # install() sets it before it puts this function in pika's place
    kind = encoded[offset : offset + 1]
    if kind in (b"F", b"A"):  # a field table or array: a 4-byte length, then its contents
        depth = getattr(_nesting, "depth", 0)
        if depth >= MAX_DEPTH:
            (length,) = struct.unpack_from(">I", encoded, offset + 1)
            return TOO_DEEP, offset + 5 + length
        _nesting.depth = depth + 1
        try:
            return _original(encoded, offset)
        finally:
            _nesting.depth = depth
    if kind == b"T":
        (seconds,) = struct.unpack_from(">Q", encoded, offset + 1)
        try:
            return datetime.fromtimestamp(seconds, UTC), offset + 9
        except (OverflowError, ValueError, OSError):
            return seconds, offset + 9
    if kind in (b"f", b"d"):
        size = 4 if kind == b"f" else 8
        (number,) = struct.unpack_from(">f" if kind == b"f" else ">d", encoded, offset + 1)
        if not math.isfinite(number):
            return number, offset + 1 + size
    return _original(encoded, offset)


def install() -> None:
    """Make pika's header decoding tolerant (idempotent, process-wide, thread-safe).

    pika's table decoder looks ``decode_value`` up as a module global on every
    value, nested tables and arrays included, so replacing it covers them all.
    """
    global _original
    with _lock:
        if _original is None:
            _original = pika.data.decode_value
            pika.data.decode_value = _tolerant_decode_value
