"""Rotary position embedding (RoPE), in HF's rotate-half convention: dimension i of a head rotates with dimension
i + head_dim/2, by the angle pos · theta^(-2i/head_dim); past the training length the frequencies may be stretched
(reffuse.core.config.RopeScaling: linear, llama3, or per-frequency factors).

`rope_tables` is the plain kernel a model computes its tables with (reffuse.core.model.PLAIN; reffuse.core.fast's
rope_rows cuts rows from tables made once); `apply_rope` rotates queries and keys inside `attention`.
"""

from __future__ import annotations

import math

import numpy as np

from reffuse.core.backend import array_module
from reffuse.core.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """RoPE's angular frequencies [head_dim/2], float64: theta^(-2i/head_dim), stretched as `scaling` says."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [head_dim/2]
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "factors":
        return inv_freq / np.asarray(scaling.factors, dtype=np.float64)
    # llama3: long wavelengths (low frequencies) interpolated, short ones kept, a linear blend between
    original = scaling.original_max_positions
    wavelength = 2 * math.pi / inv_freq
    blend = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    return np.where(wavelength < original / scaling.high_freq_factor, inv_freq,
                    np.where(wavelength > original / scaling.low_freq_factor, inv_freq / scaling.factor, blended))


def rope_tables(positions, head_dim: int, theta: float, dtype, xp=np, scaling: RopeScaling | None = None):
    """cos and sin [T, head_dim] for rotate-half RoPE: angle(pos, i) = pos · theta^(-2i/head_dim), i < head_dim/2
    (each frequency stretched as `scaling` says)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)                            # [head_dim/2]
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]   # [T, head_dim/2]
    angles = np.concatenate([angles, angles], axis=-1)                             # [T, head_dim]
    return xp.asarray(np.cos(angles), dtype=dtype), xp.asarray(np.sin(angles), dtype=dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (i, i + head_dim/2) of x [heads, T, head_dim] by its position's angle."""
    xp = array_module(x)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos + rotated * sin
