"""Pure functions on named float arrays that both sides use: the coordinator's aggregation and the
worker's update encoding (which may not import each other)."""

from __future__ import annotations

import numpy as np

from fedq.common.wire.codec import Weights


def clip_by_norm(delta: Weights, max_norm: float) -> Weights:
    """delta scaled by min(1, max_norm / ||delta||_2), the norm taken over all tensors together."""
    norm = float(
        np.sqrt(sum(float(np.dot(array.ravel().astype(np.float64), array.ravel())) for array in delta.values()))
    )
    if norm <= max_norm:
        return delta
    scale = np.float32(max_norm / norm)
    return {name: array * scale for name, array in delta.items()}
