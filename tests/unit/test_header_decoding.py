"""Headers pika 1.4.4 cannot decode: after ``header_decoding.install`` they decode to raw numbers."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime

import pika.data

from fedq.broker import header_decoding
from fedq.broker.pika_transport import encodable


def table(*entries: tuple[bytes, bytes]) -> bytes:
    """An AMQP field table of (key, encoded value) pairs."""
    body = b"".join(struct.pack("B", len(key)) + key + value for key, value in entries)
    return struct.pack(">I", len(body)) + body


def test_a_timestamp_past_year_9999_decodes_to_its_seconds_instead_of_raising():
    header_decoding.install()
    encoded = table(
        (b"huge", b"T" + struct.pack(">Q", 2**64 - 1)),
        (b"fine", b"T" + struct.pack(">Q", 1_700_000_000)),
        (b"nested", b"F" + table((b"deep", b"T" + struct.pack(">Q", 2**63)))),
        (b"after", b"S" + struct.pack(">I", 2) + b"ok"),
    )
    decoded, offset = pika.data.decode_table(encoded, 0)
    assert offset == len(encoded)
    assert decoded == {
        "huge": 2**64 - 1,
        "fine": datetime.fromtimestamp(1_700_000_000, UTC),
        "nested": {"deep": 2**63},
        "after": "ok",
    }


def test_non_finite_floats_decode_as_floats():
    header_decoding.install()
    decoded, _ = pika.data.decode_table(
        table((b"d", b"d" + struct.pack(">d", math.nan)), (b"f", b"f" + struct.pack(">f", math.inf))), 0
    )
    assert math.isnan(decoded["d"]) and decoded["f"] == math.inf


def test_install_twice_keeps_one_wrapper():
    header_decoding.install()
    wrapper = pika.data.decode_value
    header_decoding.install()
    assert pika.data.decode_value is wrapper


def test_headers_pika_cannot_encode_again_are_dropped_before_republishing():
    headers = {"x-fedq-reason": "not_json", "huge": 2**64 - 1, "nested": {"ok": 1}}
    assert encodable(headers) == {"x-fedq-reason": "not_json", "nested": {"ok": 1}}


def nested(kind: bytes, depth: int) -> bytes:
    """A value nested ``depth`` deep, built without recursion ({"n": {"n": ...}} or [[[...]]])."""
    inner = b""
    for _ in range(depth):
        inner = (b"\x01n" if kind == b"F" else b"") + kind + struct.pack(">I", len(inner)) + inner
    return kind + struct.pack(">I", len(inner)) + inner


def test_tables_and_arrays_nested_thousands_deep_decode_to_a_placeholder_without_recursing():
    header_decoding.install()
    limit = header_decoding.MAX_DEPTH
    for kind in (b"F", b"A"):
        encoded = table((b"deep", nested(kind, 20_000)), (b"after", b"S" + struct.pack(">I", 2) + b"ok"))
        decoded, offset = pika.data.decode_table(encoded, 0)
        assert offset == len(encoded) and decoded["after"] == "ok"
        levels, value = 0, decoded["deep"]
        while isinstance(value, (dict, list)):
            value = value["n"] if isinstance(value, dict) else value[0]
            levels += 1
        assert value == header_decoding.TOO_DEEP and levels == limit
    shallow, _ = pika.data.decode_table(table((b"ok", nested(b"F", limit - 1))), 0)
    assert header_decoding.TOO_DEEP not in repr(shallow), "what fits is decoded in full"


def test_headers_that_would_overflow_the_frame_are_dropped_largest_first_and_named():
    headers = {
        "pad": "x" * 130_000,
        "small": "kept",
        "x-fedq-reason": "unknown_task",
        "x-fedq-detail": "d" * 500,
        "x-fedq-origin": "updates",
    }
    kept = encodable(headers)
    assert kept == {
        "small": "kept",
        "x-fedq-reason": "unknown_task",
        "x-fedq-detail": "d" * 500,
        "x-fedq-origin": "updates",
        "x-fedq-dropped-headers": "pad",
    }
    assert pika.data.encode_table([], kept) < pika.spec.FRAME_MAX_SIZE - 1024
    assert encodable({"pad": "x" * 3000}, frame_max=4096) == {"x-fedq-dropped-headers": "pad"}
    assert encodable({"pad": "x" * 1000}, frame_max=4096) == {"pad": "x" * 1000}
