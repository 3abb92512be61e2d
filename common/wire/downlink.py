"""Exact differences between two versions of a model: what a worker that holds one needs to make the other.

A diff works on the tensors' bit patterns, never on their values, so applying it gives back the
newer weights bit for bit (negative zeros, denormals, NaN payloads and all). Per tensor (names
sorted), both versions are viewed as unsigned integers of their item size and the newer one is
encoded against the older one. When at least :data:`SHUFFLE_FROM` of the words changed, they are
byte-shuffled (every word's first byte, then every word's second byte, ...: blosc's shuffle),
which puts the bytes a small step leaves at 0 together; a sparser diff is mostly zero words, which
zstandard stores more compactly whole (each changed word is one run, not four). The whole is one
zstandard frame.

Two encodings exist; :data:`DEFAULT_TRANSFORM` is the one bench/downlink.py measured smaller:

- ``XOR``: ``older ^ newer``. Unchanged entries are 0; a changed float keeps its sign and high
  exponent bits out of the result only while it does not cross a power of two.
- ``ZIGZAG``: the wrapping integer difference ``newer - older``, zigzag-mapped (0, -1, 1, -2, ...
  -> 0, 1, 2, 3, ...). Floats of one sign are ordered like their bit patterns, so a small step is a
  small integer even when it crosses a power of two, and its high bytes are 0.

Layout (little-endian)::

    b"FQDL"  u8 format version  u8 transform  u8 shuffled (0/1)  u32 n
    n bytes of JSON [[name, dtype, shape], ...]   (names sorted; dtype as numpy's dtype.str)
    u32 CRC-32 of all the above
    one zstandard frame (its header states the content size; a checksum of the content ends it)

The two checksums catch corruption, not tampering: whoever may rewrite a diff may rewrite them too,
so a reader checks the weights a chain of diffs gives against the digest it expects
(:meth:`fedq.common.store.versions.VersionStore.load_weights_from` does).

:func:`apply_diff` refuses with :class:`DiffError` a diff whose tensors are not the older weights'
own, a truncated or corrupt one, and one whose frame would decompress to anything but exactly the
bytes the shapes need (it never decompresses more than that: no decompression bomb).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping

import numpy as np
import zstandard

from fedq.common.wire.codec import Weights

MAGIC = b"FQDL"
FORMAT_VERSION = 1
XOR = 1
ZIGZAG = 2
TRANSFORMS = {XOR: "xor", ZIGZAG: "zigzag"}
# bench/downlink.py, 1M-parameter MLP: the integer difference is 3-9 % smaller than XOR on
# trained, dense and 5 %-sparse steps alike.
DEFAULT_TRANSFORM = ZIGZAG
# bench/downlink.py: level 1 is as small as 3 (smaller on trained steps and unshuffled sparse
# ones) and the fastest; 6-9 save under 5 % for 3-10x the time, 19 costs ~1 s a diff.
DEFAULT_LEVEL = 1
# Shuffle when at least this share of the words changed. Measured: at 5 % changed a shuffled diff
# is 26 % larger than an unshuffled one, at 20 % they are even, at 50 % it is 21 % smaller.
SHUFFLE_FROM = 0.2

_PREFIX = struct.Struct("<4sBBBI")
_CRC = struct.Struct("<I")
# The JSON of the tensor list: ample for thousands of tensors, bounded so a hostile length is refused.
MAX_HEADER_BYTES = 16 * 2**20
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


class DiffError(ValueError):
    """A diff that cannot be made or applied; the message is one sentence."""


def _specs(weights: Mapping[str, np.ndarray]) -> list[list]:
    return [[name, weights[name].dtype.str, list(weights[name].shape)] for name in sorted(weights)]


def _words(array: np.ndarray) -> np.ndarray:
    """The array's bit patterns as a flat array of unsigned integers of its item size."""
    if array.dtype.kind not in "fiub" or array.dtype.itemsize not in _UNSIGNED:
        raise DiffError(f"cannot diff tensors of dtype {array.dtype}: only 1-, 2-, 4- and 8-byte numbers")
    return np.ascontiguousarray(array).reshape(-1).view(_UNSIGNED[array.dtype.itemsize])


def _encode(older: np.ndarray, newer: np.ndarray, transform: int) -> np.ndarray:
    if transform == XOR:
        return older ^ newer
    bits = older.dtype.itemsize * 8
    signed = (newer - older).view(_SIGNED[older.dtype.itemsize])  # wraps: unsigned arithmetic
    return ((signed << 1) ^ (signed >> (bits - 1))).view(older.dtype)


def _decode(older: np.ndarray, encoded: np.ndarray, transform: int) -> np.ndarray:
    if transform == XOR:
        return older ^ encoded
    difference = (encoded >> 1) ^ np.negative(encoded & 1)  # -1 wraps to all ones: the sign
    return older + difference  # wraps, as the difference did


def _shuffle(words: np.ndarray) -> bytes:
    """Every word's first byte, then every word's second byte, ..."""
    return words.view(np.uint8).reshape(-1, words.dtype.itemsize).T.tobytes()


def _unshuffle(planes: memoryview, dtype: np.dtype, count: int, shuffled: bool) -> np.ndarray:
    if not shuffled:
        return np.frombuffer(planes, dtype=_UNSIGNED[dtype.itemsize], count=count)
    raw = np.frombuffer(planes, dtype=np.uint8).reshape(dtype.itemsize, count)
    return np.ascontiguousarray(raw.T).view(_UNSIGNED[dtype.itemsize]).reshape(-1)


def make_diff(
    older: Weights,
    newer: Weights,
    *,
    transform: int = DEFAULT_TRANSFORM,
    level: int = DEFAULT_LEVEL,
    shuffle: bool | None = None,
) -> bytes:
    """The diff that turns ``older`` into ``newer`` (same names, dtypes and shapes); deterministic.

    ``shuffle`` None decides by the share of changed words (:data:`SHUFFLE_FROM`).
    """
    if transform not in TRANSFORMS:
        raise DiffError(f"unknown diff transform {transform!r}")
    specs = _specs(newer)
    if _specs(older) != specs:
        raise DiffError("the two versions' tensors differ in names, dtypes or shapes, so no diff joins them")
    encoded = [_encode(_words(older[name]), _words(newer[name]), transform) for name, _, _ in specs]
    if shuffle is None:
        words = sum(array.size for array in encoded)
        shuffle = sum(int(np.count_nonzero(array)) for array in encoded) >= SHUFFLE_FROM * words
    stream = b"".join(_shuffle(array) if shuffle else array.tobytes() for array in encoded)
    frame = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(stream)
    header = json.dumps(specs, separators=(",", ":")).encode()
    described = _PREFIX.pack(MAGIC, FORMAT_VERSION, transform, int(shuffle), len(header)) + header
    return described + _CRC.pack(zlib.crc32(described)) + frame


def apply_diff(older: Weights, diff: bytes) -> Weights:
    """The newer weights ``diff`` was made for, from ``older``: new arrays, bit-identical to them."""
    view = memoryview(diff)
    if len(view) < _PREFIX.size:
        raise DiffError(f"a diff of {len(view)} bytes is truncated: its prefix alone takes {_PREFIX.size}")
    magic, version, transform, shuffled, header_size = _PREFIX.unpack_from(view)
    if magic != MAGIC or version != FORMAT_VERSION or transform not in TRANSFORMS or shuffled not in (0, 1):
        raise DiffError(
            f"not a model diff of format {FORMAT_VERSION} (magic {bytes(magic)!r}, format {version}, "
            f"transform {transform}, shuffled {shuffled})"
        )
    if header_size > min(MAX_HEADER_BYTES, len(view) - _PREFIX.size - _CRC.size):
        raise DiffError(f"the diff's tensor list claims {header_size} bytes, more than the diff holds")
    header_end = _PREFIX.size + header_size
    (crc,) = _CRC.unpack_from(view, header_end)
    if crc != zlib.crc32(view[:header_end]):
        raise DiffError("the diff's header does not match its checksum (corrupt)")
    try:
        specs = json.loads(bytes(view[_PREFIX.size : header_end]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DiffError("the diff's tensor list is not valid JSON (corrupt or truncated)") from None
    reference = _specs(older)
    if specs != reference:
        raise DiffError("the diff's tensors are not those of the held weights (names, dtypes or shapes differ)")
    specs = reference  # equal, and of the types we made (JSON's true would pass for 1)
    dtypes = [np.dtype(dtype) for _, dtype, _ in specs]
    counts = [int(np.prod(shape, dtype=np.int64)) for _, _, shape in specs]
    expected = sum(count * dtype.itemsize for count, dtype in zip(counts, dtypes, strict=True))
    frame = view[header_end + _CRC.size :]
    try:
        # A frame header states its content size, and zstandard allocates that much whatever
        # max_output_size says: check it first, so a hostile header cannot make us allocate.
        claimed = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise DiffError(
            "the diff's compressed data has no valid zstandard frame header (corrupt or truncated)"
        ) from None
    if claimed != expected:
        raise DiffError(
            f"the diff's frame says it holds {claimed} bytes where the shapes need exactly {expected}"
            if claimed >= 0
            else "the diff's frame does not state its content size, which a diff of this format always does"
        )
    try:
        planes = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as error:
        raise DiffError(f"the diff's compressed data is corrupt or truncated ({error})") from None
    if len(planes) != expected:
        raise DiffError(f"the diff decompressed to {len(planes)} bytes where the shapes need exactly {expected}")
    newer: Weights = {}
    offset = 0
    stream = memoryview(planes)
    for (name, _, shape), dtype, count in zip(specs, dtypes, counts, strict=True):
        size = count * dtype.itemsize
        encoded = _unshuffle(stream[offset : offset + size], dtype, count, bool(shuffled))
        offset += size
        newer[name] = _decode(_words(older[name]), encoded, transform).view(dtype).reshape(shape)
    return newer
