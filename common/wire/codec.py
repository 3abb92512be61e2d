"""Tensor codec: named float arrays <-> safetensors bytes.

safetensors carries only tensors and string metadata, so bytes that arrive from
the network can never run code (no pickle, no ``torch.load``). It also loads
about 10x faster than ``torch.save`` output.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _load_numpy
from safetensors.numpy import save as _save_numpy

Weights = dict[str, np.ndarray]


class CodecError(ValueError):
    """Bytes that are not a valid safetensors tensor file."""


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays; the output is byte-identical for identical input."""
    # np.asarray(order="C") keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d).
    return _save_numpy({name: np.asarray(array, order="C") for name, array in tensors.items()})


def decode(payload: bytes) -> Weights:
    """Parse safetensors bytes into named numpy arrays (writable copies)."""
    try:
        loaded = _load_numpy(bytes(payload))
    # KeyError: a dtype numpy cannot represent (BF16, F8_*), which safetensors does not wrap.
    except (SafetensorError, ValueError, TypeError, KeyError) as error:
        raise CodecError(f"not a safetensors payload: {error}") from None
    return {name: np.array(array, copy=True) for name, array in loaded.items()}


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def weights_digest(tensors: Mapping[str, np.ndarray]) -> str:
    return digest(encode(tensors))


def tensor_specs(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name): what an update must match to be applied."""
    return {name: (tuple(array.shape), array.dtype.name) for name, array in tensors.items()}


def num_parameters(tensors: Mapping[str, np.ndarray]) -> int:
    return int(sum(array.size for array in tensors.values()))
