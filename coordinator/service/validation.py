"""Checks an update must pass before it may touch the global model.

Each failure raises :class:`MessageError` with a stable reason label, used as
the dead-letter reason header and the rejection counter.
"""
from __future__ import annotations

import numpy as np

from fedq.common.wire import codec
from fedq.common.wire.messages import ClaimCheck, MessageError, ModelUpdate
from fedq.common.store import ModelStore


def load_delta(update: ModelUpdate, store: ModelStore) -> tuple[str, bytes, codec.Weights]:
    """The update's delta as (sha256, safetensors bytes, arrays), from the message or
    its Redis claim check (verified against the claimed sha256)."""
    if isinstance(update.delta, ClaimCheck):
        claim = update.delta
        if claim.key != store.blobs.key(update.task_id):
            # An update may only claim its own blob, never another job's or another update's.
            raise MessageError("bad_claim", f"claim key {claim.key!r} is not this update's blob key")
        payload = store.blobs.get(claim.key)
        if payload is None:
            raise MessageError("missing_blob", f"claim-checked blob {claim.key!r} is gone (expired or never written)")
        digest = codec.digest(payload)
        if len(payload) != claim.nbytes or digest != claim.sha256:
            raise MessageError("bad_digest", f"blob {claim.key!r} does not match its sha256/size")
    else:
        payload = update.delta.payload
        digest = codec.digest(payload)
    try:
        return digest, payload, codec.decode(payload)
    except codec.CodecError as error:
        raise MessageError("bad_tensor", str(error)) from None


def check_tensors(delta: codec.Weights, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Names, shapes and dtypes must match the model's; every value must be finite."""
    if delta.keys() != expected.keys():
        missing = sorted(expected.keys() - delta.keys())
        extra = sorted(delta.keys() - expected.keys())
        raise MessageError("wrong_tensors", f"tensor names differ from the model's (missing {missing}, extra {extra})")
    for name, array in delta.items():
        shape, dtype = expected[name]
        if tuple(array.shape) != shape:
            raise MessageError("wrong_shape", f"tensor {name!r} has shape {tuple(array.shape)}, model has {shape}")
        if array.dtype.name != dtype:
            raise MessageError("wrong_dtype", f"tensor {name!r} has dtype {array.dtype.name}, model has {dtype}")
        if not np.isfinite(array).all():
            raise MessageError("not_finite", f"tensor {name!r} contains NaN or infinity")


def check_staleness(update: ModelUpdate, head: int, max_staleness: int, abandoned: set[int] = frozenset()) -> int:
    """The update's staleness (head - base_version), if it is acceptable."""
    if update.base_version in abandoned:
        raise MessageError("rolled_back", f"base version {update.base_version} was abandoned by a rollback")
    if update.base_version > head:
        raise MessageError("future_version", f"base version {update.base_version} is ahead of head {head}")
    staleness = head - update.base_version
    if staleness > max_staleness:
        raise MessageError("too_stale", f"staleness {staleness} exceeds max_staleness {max_staleness}")
    return staleness
