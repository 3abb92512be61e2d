"""Structured logging: one ``key=value`` line per event, easy to grep and to parse."""

from __future__ import annotations

import logging
import sys
from typing import Any


def setup_logging(level: str = "INFO", stream: Any = None) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=stream or sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )
    # pika logs every connection state change, and each failed connection attempt
    # as an ERROR with a traceback; fedq logs its own one-line events for those.
    # At DEBUG, pika's own account is shown too.
    logging.getLogger("pika").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def kv(event: str, **fields: Any) -> str:
    """``event=NAME key=value ...``: the message part of every fedq log line."""
    return " ".join([f"event={event}"] + [f"{key}={_format(value)}" for key, value in fields.items()])
