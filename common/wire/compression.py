"""Lossy encodings of a model update (the uplink), shared by the workers that encode and the
coordinator and replay that decode.

A job picks one encoding (``--compression``); every update of the job is sent in it, and its
message names it. The encoded form is again a safetensors payload (nothing is unpickled),
with the encoding and the tensors' shapes in its header metadata, so that replay decodes the
stored blob exactly as the coordinator did when it applied it.

=========  ====================================================================  ===========
method     payload per tensor ``name``                                           bytes/value
=========  ====================================================================  ===========
none       ``name``: float32, as before (no metadata: the payload of older fedq)  4
fp16       ``name``: float16                                                      2
bf16       ``name``: uint16, the high half of the float32 (round to nearest even) 2
int8       ``name``: int8, and ``name::scale``: one float32 per ``block`` values  ~1
topk       ``name::indices`` (uint32, increasing) and ``name::values`` (float32)  8 per kept
           of the ``fraction`` largest magnitudes of the *whole* update
prune      ``name::mask`` (packed bits) and ``name::values`` (float32) of each    1/8 + 4 per
           tensor's ``fraction`` largest magnitudes (magnitude pruning)           kept
=========  ====================================================================  ===========

Decoding checks everything a hostile worker could get wrong before it allocates anything:
the encoding named in the payload, the tensor names and shapes against the model's, every
index in range and increasing, every count. The error is a :class:`codec.CodecError`.

Encoding and decoding are deterministic numpy: the same update gives the same bytes, the
same bytes the same float32 values (replay verifies bit for bit).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _load_numpy
from safetensors.numpy import save as _save_numpy

from fedq.common.wire import codec
from fedq.common.wire.codec import CodecError, Weights

TensorSpecs = Mapping[str, tuple[tuple[int, ...], str]]

METHODS = ("none", "fp16", "bf16", "int8", "topk", "prune")
LOSSLESS = "none"
# Defaults when the spec names no parameter: 1 % of the values for top-k, a tenth for pruning
# (its bitmask costs a bit per value, so it pays only at milder sparsity), and scales per 256
# values for int8 (1.6 % overhead; one outlier spoils the precision of 255 neighbours, not a tensor's).
DEFAULT_FRACTION = {"topk": 0.01, "prune": 0.1}
DEFAULT_INT8_BLOCK = 256
# One metadata entry (safetensors writes several in no fixed order, and the bytes must be reproducible).
_METADATA_KEY = "fedq"
_SEPARATOR = "::"  # never in a torch state-dict name (dots and letters)


@dataclass(frozen=True)
class Compression:
    """One job's uplink encoding: ``method`` and its parameter (``fraction`` kept for topk/prune,
    ``block`` values per scale for int8)."""

    method: str = LOSSLESS
    fraction: float = 0.0
    block: int = 0

    @classmethod
    def parse(cls, spec: str) -> Compression:
        """``none``, ``fp16``, ``bf16``, ``int8[:block=N]``, ``topk[:fraction=F]``, ``prune[:fraction=F]``."""
        method, _, rest = spec.strip().partition(":")
        method = method.strip().lower()
        if method not in METHODS:
            raise ValueError(f"unknown compression {method!r}; choose from {', '.join(METHODS)}")
        params: dict[str, str] = {}
        for part in filter(None, (piece.strip() for piece in rest.split(","))):
            name, equals, value = part.partition("=")
            if not equals:
                raise ValueError(f"compression parameter {part!r} needs a value (name=value)")
            params[name.strip()] = value.strip()
        allowed = {"topk": {"fraction"}, "prune": {"fraction"}, "int8": {"block"}}.get(method, set())
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(
                f"compression {method} takes {' or '.join(sorted(allowed)) or 'no parameters'}, "
                f"not {', '.join(sorted(unknown))}"
            )
        try:
            fraction = float(params.get("fraction", DEFAULT_FRACTION.get(method, 0.0)))
            block = int(params.get("block", DEFAULT_INT8_BLOCK if method == "int8" else 0))
        except ValueError:
            raise ValueError(f"compression {spec!r}: fraction must be a number and block an integer") from None
        if method in DEFAULT_FRACTION and not 0 < fraction <= 1:
            raise ValueError(f"compression {method}: fraction must be in (0, 1], not {fraction}")
        if method == "int8" and block < 1:
            raise ValueError(f"compression int8: block must be at least 1, not {block}")
        return cls(method, fraction, block)

    @property
    def spec(self) -> str:
        """The canonical spec: what updates name and what is recorded with every version."""
        if self.method in DEFAULT_FRACTION:
            return f"{self.method}:fraction={self.fraction:g}"
        if self.method == "int8":
            return f"int8:block={self.block}"
        return self.method

    @property
    def lossy(self) -> bool:
        return self.method != LOSSLESS

    @property
    def sparse(self) -> bool:
        """Whether an update changes only a fraction of the values (and so does a FedAsync step)."""
        return self.method in DEFAULT_FRACTION

    # -- encoding --------------------------------------------------------

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        """The update's payload in this encoding."""
        # np.asarray(order="C") keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d).
        delta = {name: np.asarray(array, dtype=np.float32, order="C") for name, array in delta.items()}
        if self.method == LOSSLESS:
            return codec.encode(delta)
        tensors = _ENCODERS[self.method](self, delta)
        shapes = {name: list(array.shape) for name, array in delta.items()}
        header = json.dumps({"encoding": self.spec, "shapes": shapes}, sort_keys=True, separators=(",", ":"))
        return _save_numpy(tensors, metadata={_METADATA_KEY: header})

    def roundtrip(self, delta: Mapping[str, np.ndarray]) -> tuple[bytes, Weights]:
        """(payload, what the coordinator will decode from it): the worker's error feedback keeps the difference."""
        payload = self.encode(delta)
        specs = {name: (tuple(array.shape), "float32") for name, array in delta.items()}
        return payload, decode(payload, specs)[1]

    def max_payload_bytes(self, specs: TensorSpecs) -> int:
        """An upper bound on this encoding's payload for tensors of ``specs``: larger is refused unread."""
        dense = codec.max_encoded_size(specs)
        values = sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in specs.values())
        # Metadata: the spec and every tensor's shape; the header lists up to three tensors per name.
        header = codec.max_encoded_size({}) + sum(
            3 * (len(name) + codec.HEADER_BYTES_PER_TENSOR) + 24 * (len(shape) + 1)
            for name, (shape, _) in specs.items()
        )
        per_value = {"fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4.0 / max(self.block, 1), "topk": 8.0, "prune": 4.125}
        if self.method == LOSSLESS:
            return dense
        return header + math.ceil(per_value[self.method] * values) + 8 * len(specs)


def _half(compression: Compression, delta: Weights) -> dict[str, np.ndarray]:
    if compression.method == "fp16":
        return {name: array.astype(np.float16) for name, array in delta.items()}
    return {name: _to_bfloat16_bits(array) for name, array in delta.items()}


def _to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> the high 16 bits of its nearest bfloat16, rounding ties to even."""
    bits = array.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.asarray(rounded, dtype=np.uint16).reshape(array.shape)  # 0-d arithmetic gives scalars


def _int8(compression: Compression, delta: Weights) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, array in delta.items():
        flat = array.ravel()
        blocks = -(-flat.size // compression.block)
        padded = np.zeros(blocks * compression.block, dtype=np.float32)
        padded[: flat.size] = flat
        grouped = padded.reshape(blocks, compression.block)
        scale = (np.abs(grouped).max(axis=1) / np.float32(127)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        quantised = np.clip(np.rint(grouped / safe[:, None]), -127, 127).astype(np.int8)
        tensors[name] = quantised.ravel()[: flat.size].reshape(array.shape)
        tensors[name + _SEPARATOR + "scale"] = scale
    return tensors


def _largest(magnitudes: np.ndarray, keep: int) -> np.ndarray:
    """A mask of the ``keep`` largest ``magnitudes``, ties broken by position (the first win), in
    linear time: np.argpartition finds the keep-th largest, but is not stable, so the mask is the
    values above it plus the first of those equal to it."""
    total = magnitudes.size
    if keep >= total:
        return np.ones(total, dtype=bool)
    threshold = np.partition(magnitudes, total - keep)[total - keep]
    chosen = magnitudes > threshold
    ties = np.flatnonzero(magnitudes == threshold)[: keep - int(chosen.sum())]
    chosen[ties] = True
    return chosen


def _topk(compression: Compression, delta: Weights) -> dict[str, np.ndarray]:
    """The ``fraction`` largest magnitudes over the whole update (global top-k), stored per tensor."""
    names = sorted(delta)
    total = sum(delta[name].size for name in names)
    keep = max(1, math.ceil(compression.fraction * total)) if total else 0
    magnitudes = np.concatenate([np.abs(delta[name].ravel()) for name in names]) if names else np.zeros(0)
    chosen = _largest(magnitudes, keep)
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name in names:
        flat = delta[name].ravel()
        indices = np.flatnonzero(chosen[offset : offset + flat.size]).astype(np.uint32)
        tensors[name + _SEPARATOR + "indices"] = indices
        tensors[name + _SEPARATOR + "values"] = flat[indices]
        offset += flat.size
    return tensors


def _prune(compression: Compression, delta: Weights) -> dict[str, np.ndarray]:
    """Each tensor's ``fraction`` largest magnitudes (ties by position), as a bitmask and the values."""
    tensors: dict[str, np.ndarray] = {}
    for name, array in delta.items():
        flat = array.ravel()
        keep = max(1, math.ceil(compression.fraction * flat.size)) if flat.size else 0
        mask = _largest(np.abs(flat), keep)
        tensors[name + _SEPARATOR + "mask"] = np.packbits(mask)
        tensors[name + _SEPARATOR + "values"] = flat[mask]
    return tensors


_ENCODERS = {"fp16": _half, "bf16": _half, "int8": _int8, "topk": _topk, "prune": _prune}


# -- decoding ------------------------------------------------------------


def decode(payload: bytes, specs: TensorSpecs) -> tuple[str, Weights]:
    """(the encoding's spec, the float32 delta) of an update payload whose tensors must have ``specs``.

    Raises :class:`CodecError` for anything that is not a well-formed payload of those tensors.
    """
    encoding, shapes = _header(payload)
    if encoding == LOSSLESS:
        return LOSSLESS, codec.decode(payload)
    try:
        compression = Compression.parse(encoding)
    except ValueError as error:
        raise CodecError(f"the payload's encoding {encoding!r} is not one fedq decodes: {error}") from None
    if compression.spec != encoding:
        raise CodecError(f"the payload's encoding {encoding!r} is not in canonical form ({compression.spec!r})")
    expected = {name: tuple(shape) for name, (shape, _) in specs.items()}
    if shapes != expected:
        raise CodecError("the payload's tensor names or shapes differ from the model's")
    try:
        loaded = _load_numpy(bytes(payload))
    except (SafetensorError, ValueError, TypeError, KeyError) as error:
        raise CodecError(f"not a safetensors payload: {error}") from None
    wanted = {name + suffix for name in expected for suffix in _PARTS[compression.method]}
    if set(loaded) != wanted:
        raise CodecError(
            f"a {compression.method} payload of this model holds {len(wanted)} tensors with fixed names; "
            f"this one differs by {sorted(set(loaded) ^ wanted)[:4]}"
        )
    decoder = _DECODERS[compression.method]
    return compression.spec, {
        name: decoder(compression, loaded, name, shape).reshape(shape) for name, shape in expected.items()
    }


_PARTS = {
    "fp16": ("",),
    "bf16": ("",),
    "int8": ("", _SEPARATOR + "scale"),
    "topk": (_SEPARATOR + "indices", _SEPARATOR + "values"),
    "prune": (_SEPARATOR + "mask", _SEPARATOR + "values"),
}


def _header(payload: bytes) -> tuple[str, dict[str, tuple[int, ...]] | None]:
    """The payload's encoding (``none`` without fedq metadata) and tensor shapes, from its header alone."""
    if len(payload) < 8:
        raise CodecError("not a safetensors payload: shorter than its header length")
    length = int.from_bytes(payload[:8], "little")
    if length > len(payload) - 8:
        raise CodecError("not a safetensors payload: its header runs past its end")
    try:
        header = json.loads(payload[8 : 8 + length])
        metadata = header.get("__metadata__") or {}
        if _METADATA_KEY not in metadata:
            return LOSSLESS, None
        ours = json.loads(metadata[_METADATA_KEY])
        encoding = ours["encoding"]
        shapes = {str(name): tuple(int(size) for size in shape) for name, shape in ours["shapes"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CodecError("not a safetensors payload: its header is not fedq's") from None
    if not isinstance(encoding, str):
        raise CodecError("not a safetensors payload: its encoding is not a name")
    return encoding, shapes


def _tensor(loaded: Mapping[str, np.ndarray], key: str, dtype: type, size: int | None) -> np.ndarray:
    array = loaded[key]
    if array.dtype != dtype or (size is not None and array.size != size):
        raise CodecError(
            f"tensor {key!r} has dtype {array.dtype.name} and {array.size} values, "
            f"not {np.dtype(dtype).name}{'' if size is None else f' and {size}'}"
        )
    return array.ravel()


def _decode_fp16(compression: Compression, loaded: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]):
    return _tensor(loaded, name, np.float16, _size(shape)).astype(np.float32)


def _decode_bf16(compression: Compression, loaded: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]):
    bits = _tensor(loaded, name, np.uint16, _size(shape)).astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32)


def _decode_int8(compression: Compression, loaded: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]):
    size = _size(shape)
    blocks = -(-size // compression.block)
    quantised = _tensor(loaded, name, np.int8, size)
    scale = _tensor(loaded, name + _SEPARATOR + "scale", np.float32, blocks)
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise CodecError(f"tensor {name!r}: int8 scales must be finite and not negative")
    padded = np.zeros(blocks * compression.block, dtype=np.float32)
    padded[:size] = quantised
    return (padded.reshape(blocks, compression.block) * scale[:, None]).ravel()[:size]


def _decode_topk(compression: Compression, loaded: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]):
    size = _size(shape)
    indices = _tensor(loaded, name + _SEPARATOR + "indices", np.uint32, None)
    values = _tensor(loaded, name + _SEPARATOR + "values", np.float32, indices.size)
    if indices.size > size or (indices.size and (int(indices[-1]) >= size or (np.diff(indices) <= 0).any())):
        raise CodecError(f"tensor {name!r}: top-k indices must be increasing and below {size}")
    dense = np.zeros(size, dtype=np.float32)
    dense[indices] = values
    return dense


def _decode_prune(compression: Compression, loaded: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]):
    size = _size(shape)
    packed = _tensor(loaded, name + _SEPARATOR + "mask", np.uint8, -(-size // 8))
    mask = np.unpackbits(packed, count=size).astype(bool)
    if np.unpackbits(packed)[size:].any():
        raise CodecError(f"tensor {name!r}: the pruning mask has bits set past the tensor's end")
    values = _tensor(loaded, name + _SEPARATOR + "values", np.float32, int(mask.sum()))
    dense = np.zeros(size, dtype=np.float32)
    dense[mask] = values
    return dense


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


_DECODERS = {
    "fp16": _decode_fp16,
    "bf16": _decode_bf16,
    "int8": _decode_int8,
    "topk": _decode_topk,
    "prune": _decode_prune,
}
