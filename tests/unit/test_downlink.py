"""Downlink diffs (common/wire/downlink.py): exact, deterministic, small when little changed, and
refused whole when they do not fit the held weights or are damaged."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import zstandard

from fedq.common.wire import codec
from fedq.common.wire.downlink import XOR, ZIGZAG, DiffError, apply_diff, make_diff
from fedq.coordinator.ops.roles import grant

SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.weight": (10, 37), "fc.bias": (10,), "scale": (), "empty": (0, 5)}


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def assert_bit_identical(got: codec.Weights, want: codec.Weights) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        if want[name].dtype.itemsize == 4:
            assert np.array_equal(got[name].reshape(-1).view(np.uint32), want[name].reshape(-1).view(np.uint32)), name
        assert np.array_equal(bits(got[name]), bits(want[name])), name


def special_floats(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values mixed with -0.0, denormals, the largest finite floats, infinities and NaNs
    with payloads: every bit pattern must survive."""
    values = rng.standard_normal(shape).astype(np.float32).reshape(-1)
    if values.size:
        specials = np.array(
            [
                0x80000000,
                0x00000001,
                0x007FFFFF,
                0x80000010,
                0x7F7FFFFF,
                0xFF7FFFFF,
                0x7F800000,
                0x7FC12345,
                0xFFA00001,
            ],
            dtype=np.uint32,
        ).view(np.float32)
        where = rng.integers(0, values.size, size=min(values.size, 2 * len(specials)))
        values[where] = np.resize(specials, where.size)
    return values.reshape(shape)


def model(seed: int) -> codec.Weights:
    rng = np.random.default_rng(seed)
    return {name: special_floats(rng, shape) for name, shape in SHAPES.items()}


def stepped(weights: codec.Weights, seed: int, fraction: float = 1.0, scale: float = 1e-3) -> codec.Weights:
    """A FedAsync-like step: 0.6 of a small relative delta, on ``fraction`` of the entries."""
    rng = np.random.default_rng(seed)
    result = {}
    for name, array in weights.items():
        with np.errstate(invalid="ignore", over="ignore"):
            delta = (rng.standard_normal(array.shape) * scale * np.abs(array)).astype(np.float32)
            delta = np.where(rng.random(array.shape) < fraction, delta, np.float32(0))
            result[name] = np.where(delta != 0, array + np.float32(0.6) * delta, array).astype(np.float32)
    return result


@pytest.mark.parametrize("transform", [XOR, ZIGZAG])
@pytest.mark.parametrize("shuffle", [True, False, None])
def test_a_diff_gives_back_the_newer_weights_bit_for_bit(transform, shuffle):
    older, newer = model(1), model(2)  # unrelated: every sign, exponent and special value changes
    newer["scale"] = np.array(-0.0, dtype=np.float32)
    older["scale"] = np.array(0.0, dtype=np.float32)  # equal as floats, not as bits
    diff = make_diff(older, newer, transform=transform, shuffle=shuffle)
    assert_bit_identical(apply_diff(older, diff), newer)
    small = stepped(older, 3)
    assert_bit_identical(apply_diff(older, make_diff(older, small, transform=transform, shuffle=shuffle)), small)


def test_other_dtypes_and_a_diff_of_nothing_round_trip():
    older = {
        "steps": np.array([1, -5, 2**40], dtype=np.int64),
        "half": np.array([1.5, -0.0, 65504], dtype=np.float16),
        "mask": np.array([True, False]),
        "bytes": np.arange(7, dtype=np.uint8),
    }
    newer = {
        "steps": np.array([2, 2**62, -(2**63)], dtype=np.int64),
        "half": np.array([-1.5, 0.0, np.inf], dtype=np.float16),
        "mask": np.array([False, False]),
        "bytes": np.arange(7, dtype=np.uint8)[::-1].copy(),
    }
    for transform in (XOR, ZIGZAG):
        assert_bit_identical(apply_diff(older, make_diff(older, newer, transform=transform)), newer)
    assert apply_diff({}, make_diff({}, {})) == {}
    same = model(4)
    assert_bit_identical(apply_diff(same, make_diff(same, same)), same)


def test_chained_diffs_give_the_last_version():
    a = model(5)
    b = stepped(a, 6)
    c = stepped(b, 7, fraction=0.05)
    from_a = apply_diff(a, make_diff(a, b))
    assert_bit_identical(apply_diff(from_a, make_diff(b, c)), c)


def test_the_same_versions_make_the_same_bytes():
    older, newer = model(8), stepped(model(8), 9)
    diff = make_diff(older, newer)
    assert make_diff(older, newer) == diff
    reordered = {name: newer[name].copy() for name in reversed(list(newer))}
    assert make_diff({name: older[name] for name in reversed(list(older))}, reordered) == diff


def test_versions_with_different_tensors_have_no_diff():
    older = model(10)
    for newer in (
        {**older, "fc.bias": np.zeros(11, np.float32)},
        {name: array for name, array in older.items() if name != "scale"},
        {**older, "fc.bias": older["fc.bias"].astype(np.float64)},
    ):
        with pytest.raises(DiffError):
            make_diff(older, newer)
    with pytest.raises(DiffError, match="dtype"):
        make_diff({"c": np.zeros(2, np.complex64)}, {"c": np.ones(2, np.complex64)})


def test_a_diff_for_other_tensors_is_refused():
    older, newer = model(11), stepped(model(11), 12)
    diff = make_diff(older, newer)
    for held in (
        {**older, "fc.bias": np.zeros(11, np.float32)},  # another shape
        {**older, "fc.bias": older["fc.bias"].reshape(2, 5)},  # as many entries, another shape
        {name: array for name, array in older.items() if name != "fc.bias"},  # one tensor fewer
        {**older, "extra": np.zeros(1, np.float32)},  # one more
        {**older, "fc.bias": older["fc.bias"].astype(">f4")},  # another byte order
        {("fc.Bias" if name == "fc.bias" else name): array for name, array in older.items()},  # renamed
    ):
        with pytest.raises(DiffError, match="not those of the held weights"):
            apply_diff(held, diff)


def test_a_truncated_diff_is_refused_at_every_length():
    older, newer = model(13), stepped(model(13), 14)
    diff = make_diff(older, newer)
    for length in range(len(diff)):
        with pytest.raises(DiffError):
            apply_diff(older, diff[:length])


def test_a_diff_with_bytes_appended_is_refused():
    older, newer = model(15), stepped(model(15), 16)
    with pytest.raises(DiffError):
        apply_diff(older, make_diff(older, newer) + b"\0")


def test_every_flipped_bit_is_refused():
    """The header's CRC-32 and the frame's checksum leave no byte whose change goes unnoticed."""
    older, newer = model(17), stepped(model(17), 18)
    diff = make_diff(older, newer)
    for position in range(len(diff)):
        for flip in (0x01, 0x80):
            damaged = bytearray(diff)
            damaged[position] ^= flip
            with pytest.raises(DiffError):
                apply_diff(older, bytes(damaged))


def reframed(diff: bytes, frame: bytes) -> bytes:
    """``diff`` with its zstandard frame replaced: a hostile writer's (valid header and CRC)."""
    (header_size,) = struct.unpack_from("<I", diff, 7)
    return diff[: 11 + header_size + 4] + frame


def test_a_frame_that_decompresses_to_other_than_the_shapes_need_is_refused():
    older, newer = model(19), stepped(model(19), 20)
    diff = make_diff(older, newer)
    needed = sum(array.nbytes for array in older.values())
    for content in (b"\0" * (needed + 1), b"\0" * (needed - 1), b""):
        frame = zstandard.ZstdCompressor(write_content_size=True).compress(content)
        with pytest.raises(DiffError, match="holds"):
            apply_diff(older, reframed(diff, frame))
    # Without a stated size zstandard would decompress all of it: 256 MiB from a few KiB.
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (256 * 2**20))
    assert len(bomb) < 2**16
    with pytest.raises(DiffError, match="content size"):
        apply_diff(older, reframed(diff, bomb))
    # A frame header that claims 1 TiB (and holds one empty block): zstandard would try to allocate
    # all of it (MemoryError at best); the claim is refused first. Magic, a descriptor with an 8-byte
    # content size and a single segment, the size, a last raw block of 0 bytes.
    huge = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 2**40) + b"\x01\x00\x00"
    assert zstandard.frame_content_size(huge) == 2**40
    with pytest.raises(DiffError, match="holds 1099511627776 bytes"):
        apply_diff(older, reframed(diff, huge))
    honest = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * needed)
    assert_bit_identical(apply_diff(older, reframed(diff, honest)), older)
    # Two frames, the second one extra.
    with pytest.raises(DiffError):
        apply_diff(older, reframed(diff, honest + honest))


def test_a_frame_of_the_right_size_with_another_stream_applies_but_changes_nothing_it_should_not():
    """Checksums catch corruption, not a rewrite: a well-formed diff of zeros is a valid diff
    (the store checks the result's digest)."""
    older, newer = model(21), stepped(model(21), 22)
    needed = sum(array.nbytes for array in older.values())
    zeros = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * needed)
    rewritten = reframed(make_diff(older, newer), zeros)
    assert_bit_identical(apply_diff(older, rewritten), older)


def test_wrong_magic_format_or_transform_is_refused():
    older, newer = model(23), stepped(model(23), 24)
    diff = make_diff(older, newer)
    (header_size,) = struct.unpack_from("<I", diff, 7)
    for offset, value in ((0, ord("X")), (4, 2), (5, 7), (6, 2)):
        described = bytearray(diff[: 11 + header_size])
        described[offset] = value
        forged = bytes(described) + struct.pack("<I", zlib.crc32(described)) + diff[11 + header_size + 4 :]
        with pytest.raises(DiffError, match="not a model diff"):
            apply_diff(older, forged)
    with pytest.raises(DiffError, match="unknown diff transform"):
        make_diff(older, newer, transform=9)


def one_million_parameters(seed: int) -> codec.Weights:
    """An MLP 784-1262-10 initialised like torch's nn.Linear (uniform in +-1/sqrt(fan_in))."""
    rng = np.random.default_rng(seed)
    shapes = {"0.weight": (1262, 784), "0.bias": (1262,), "2.weight": (10, 1262), "2.bias": (10,)}
    return {
        name: rng.uniform(-1, 1, shape).astype(np.float32) / np.float32(np.sqrt(784 if name[0] == "0" else 1262))
        for name, shape in shapes.items()
    }


def test_a_diff_where_5_percent_changed_is_a_small_share_of_the_model():
    """bench/downlink.py measured 5.0 % of the full model for a 5 %-sparse step (6.3 % byte-shuffled)
    and 47 % for a dense one (60 % unshuffled) on this model."""
    older = one_million_parameters(25)
    full = len(codec.encode(older))
    sparse = stepped(older, 26, fraction=0.05)
    sparse_diff = make_diff(older, sparse)
    assert len(sparse_diff) < 0.065 * full, len(sparse_diff) / full
    assert len(sparse_diff) < 0.9 * len(make_diff(older, sparse, shuffle=True))  # why sparse is not shuffled
    dense = stepped(older, 27)
    dense_diff = make_diff(older, dense)
    assert len(dense_diff) < 0.55 * full, len(dense_diff) / full
    assert len(dense_diff) < 0.85 * len(make_diff(older, dense, shuffle=False))  # why dense is shuffled
    assert len(make_diff(older, dense, transform=ZIGZAG)) < len(make_diff(older, dense, transform=XOR))
    assert_bit_identical(apply_diff(older, sparse_diff), sparse)


def test_workers_may_read_diffs_and_monitors_see_them():
    from fedq.common.store.keys import JobKeys

    diff_key = JobKeys("j1").model_diff(3)
    assert diff_key == "fedq:{j1}:modeldiff:3"
    worker = grant("worker", "j1", "alice").redis_rules
    assert "%R~fedq:{j1}:modeldiff:*" in worker and "+strlen" in worker
    assert not any(rule.startswith(("~", "%W", "%RW")) and "modeldiff" in rule for rule in worker)
    assert "%R~fedq:{j1}:modeldiff:*" in grant("monitor", "j1", "ops").redis_rules
