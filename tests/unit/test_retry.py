"""Reaching Redis and RabbitMQ at startup: the same bounded backoff, then one sentence."""

from __future__ import annotations

import socket
import time

import pytest

from fedq.common.retry import backoff_delays
from fedq.common.store import StoreError, connect_redis


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def test_the_backoff_doubles_up_to_its_cap_and_is_bounded():
    assert list(backoff_delays(5)) == [0.5, 1.0, 2.0, 4.0]
    assert list(backoff_delays(8))[-2:] == [8.0, 8.0]
    assert list(backoff_delays(1)) == []


def test_a_redis_that_stays_down_is_retried_then_named_in_one_sentence():
    url = f"redis://127.0.0.1:{closed_port()}/0"
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach Redis at {url} after 3 attempts"):
        connect_redis(url, attempts=3)
    assert time.monotonic() - started >= 1.5  # waited 0.5 s and 1 s between the three tries


def test_a_bad_redis_url_fails_at_once():
    started = time.monotonic()
    with pytest.raises(StoreError, match="is not valid"):
        connect_redis("http://not-redis/")
    assert time.monotonic() - started < 1.0
