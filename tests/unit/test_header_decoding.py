"""Headers pika 1.4.4 cannot decode: after ``header_decoding.install`` they decode to raw numbers."""
from __future__ import annotations

import math
import struct
from datetime import datetime, timezone

import pika.data

from fedq.broker import header_decoding
from fedq.broker.pika_transport import encodable


def table(*entries: tuple[bytes, bytes]) -> bytes:
    """An AMQP field table of (key, encoded value) pairs."""
    body = b"".join(struct.pack("B", len(key)) + key + value for key, value in entries)
    return struct.pack(">I", len(body)) + body


def test_a_timestamp_past_year_9999_decodes_to_its_seconds_instead_of_raising():
    header_decoding.install()
    encoded = table((b"huge", b"T" + struct.pack(">Q", 2**64 - 1)),
                    (b"fine", b"T" + struct.pack(">Q", 1_700_000_000)),
                    (b"nested", b"F" + table((b"deep", b"T" + struct.pack(">Q", 2**63)))),
                    (b"after", b"S" + struct.pack(">I", 2) + b"ok"))
    decoded, offset = pika.data.decode_table(encoded, 0)
    assert offset == len(encoded)
    assert decoded == {"huge": 2**64 - 1, "fine": datetime.fromtimestamp(1_700_000_000, timezone.utc),
                       "nested": {"deep": 2**63}, "after": "ok"}


def test_non_finite_floats_decode_as_floats():
    header_decoding.install()
    decoded, _ = pika.data.decode_table(table((b"d", b"d" + struct.pack(">d", math.nan)),
                                              (b"f", b"f" + struct.pack(">f", math.inf))), 0)
    assert math.isnan(decoded["d"]) and decoded["f"] == math.inf


def test_install_twice_keeps_one_wrapper():
    header_decoding.install()
    wrapper = pika.data.decode_value
    header_decoding.install()
    assert pika.data.decode_value is wrapper


def test_headers_pika_cannot_encode_again_are_dropped_before_republishing():
    headers = {"x-fedq-reason": "not_json", "huge": 2**64 - 1, "nested": {"ok": 1}}
    assert encodable(headers) == {"x-fedq-reason": "not_json", "nested": {"ok": 1}}
