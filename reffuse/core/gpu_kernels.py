"""Chains of elementwise steps of the forward pass as one GPU kernel each, made with `cupy.fuse`.

On a GPU every array operation is a kernel launch, and a launch costs a few microseconds however little it computes.
A decode step of a small model is mostly such small operations: written as NumPy calls, RMSNorm is 6 launches
(x², mean, + eps, sqrt, /, ⊙ gain), silu(gate) ⊙ up 5 and RoPE 6. Written once here with the array module's ufuncs,
each chain below is compiled by `cupy.fuse` into one kernel (an elementwise map, or a map, one reduction and a map
of its results):

    rms          sqrt(mean(x²) + eps) per token                 1 kernel     (RMSNorm: 2 with `scaled`)
    scaled       x / rms ⊙ gain                                  1 kernel
    silu_times   silu(gate) ⊙ up                                 1 kernel     (eq. 3's elementwise part)
    rotated      RoPE on q, scaled by 1/sqrt(head_dim)            1 kernel
    rotated_kv   RoPE on k, written with v into the KV cache     1 kernel
    row_max      max over keys of the masked scores              1 kernel     (the softmax: 3 with the next two)
    exp_sum      Σ exp(scores - max) over keys                   1 kernel
    normalized   exp(scores - max) / Σ, in place                 1 kernel

Each computes what the plain function does, in the same order of operations per element, so on NumPy (the tests'
strict stand-in, whose `fuse` runs the same Python and counts one operation per call) the results are those of
the plain functions; on a GPU only the reductions' order of additions differs. `kernels(xp)` compiles them for one
array module, once; a fused function compiles again for each new combination of dtypes and numbers of dimensions.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from reffuse.core.backend import array_module


@functools.cache
def kernels(xp) -> SimpleNamespace:
    """The fused kernels of module `xp` (cupy, or a module with its interface and `fuse`)."""

    @xp.fuse(kernel_name="rms")
    def rms(x, width, eps):
        """x [..., d] -> sqrt(mean(x²) + eps) [...]: one reduction, the mean as the sum over the width."""
        return xp.sqrt(xp.sum(x * x, axis=-1) / width + eps)

    @xp.fuse(kernel_name="scaled")
    def scaled(x, rms, gain):
        """RMSNorm's map: x / rms ⊙ gain, rms [..., 1] broadcast over the width."""
        return x / rms * gain

    @xp.fuse(kernel_name="silu_times")
    def silu_times(gate, up):
        """silu(gate) ⊙ up = gate / (1 + e^-gate) ⊙ up."""
        return gate / (1 + xp.exp(-gate)) * up

    def rotate(x_low, x_high, cos, sin, scale, out_low, out_high):
        """Rotate-half RoPE of the halves of x (dimensions i and i + head_dim/2), times scale, into out's halves;
        cos and sin are the first half of the tables (their second half repeats it)."""
        out_low[...] = (x_low * cos - x_high * sin) * scale
        out_high[...] = (x_high * cos + x_low * sin) * scale

    @xp.fuse(kernel_name="rotated")
    def rotated(x_low, x_high, cos, sin, scale, out_low, out_high):
        rotate(x_low, x_high, cos, sin, scale, out_low, out_high)

    @xp.fuse(kernel_name="rotated_kv")
    def rotated_kv(k_low, k_high, v_low, v_high, cos, sin, key_low, key_high, value_low, value_high):
        """k rotated into the cache's key rows, v copied into its value rows, in one pass."""
        rotate(k_low, k_high, cos, sin, 1, key_low, key_high)
        value_low[...] = v_low
        value_high[...] = v_high

    def masked(scores, mask):
        return scores if mask is None else scores + mask

    @xp.fuse(kernel_name="row_max")
    def row_max(scores, mask):
        """max over the last axis of scores + mask (mask: 0 or -inf, or None)."""
        return xp.max(masked(scores, mask), axis=-1)

    @xp.fuse(kernel_name="exp_sum")
    def exp_sum(scores, mask, most):
        """Σ exp(scores + mask - most) over the last axis: the softmax's denominator, in one pass."""
        return xp.sum(xp.exp(masked(scores, mask) - most), axis=-1)

    @xp.fuse(kernel_name="normalized")
    def normalized(scores, mask, most, total):
        """scores := exp(scores + mask - most) / total, the softmax, in place."""
        scores[...] = xp.exp(masked(scores, mask) - most) / total

    return SimpleNamespace(rms=rms, scaled=scaled, silu_times=silu_times, rotated=rotated, rotated_kv=rotated_kv,
                           row_max=row_max, exp_sum=exp_sum, normalized=normalized)


def halves(x):
    """The two halves of the last axis of x, as views: what rotate-half RoPE pairs."""
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def rms_norm(x, gain, eps):
    """reffuse.core.model.rms_norm in 2 kernels: x [..., d] -> x / sqrt(mean(x²) + eps) ⊙ gain."""
    fused = kernels(array_module(x))
    return fused.scaled(x, fused.rms(x, x.shape[-1], eps)[..., None], gain)


def softmax_(scores, mask=None):
    """reffuse.core.model.softmax_ of scores + mask in 3 kernels, in place; mask (0 or -inf) broadcasts to
    scores, or None."""
    fused = kernels(array_module(scores))
    most = fused.row_max(scores, mask)[..., None]
    fused.normalized(scores, mask, most, fused.exp_sum(scores, mask, most)[..., None])
    return scores

