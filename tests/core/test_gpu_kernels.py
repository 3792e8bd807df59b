"""The GPU's fused kernels (reffuse.core.gpu_kernels) and its attention in few kernels, on the strict CuPy stand-in
(tests/support/strict_cupy), whose `fuse` runs the same Python on NumPy, refuses what cupy.fuse refuses, and counts
one device operation per call.

Tolerances: each fused kernel computes, element by element, the operations of the plain function in the same order,
and on the stand-in both run NumPy, so they are equal bit for bit in float32 and float64 alike (the sums of the
reductions run over the same contiguous rows). attention_in_few_kernels arranges attention's products otherwise
(q scaled before its product, query heads grouped per kv head), so it is held to 1e-12 in float64 and to the
float32 targets of reffuse.evaluation.verify, as the CPU's fast attention is (tests/core/test_fast_paths.py).
"""

import numpy as np
import pytest

import reffuse
from reffuse.core import fast, gpu_kernels
from reffuse.core.backend import to_numpy
from reffuse.core.fast import attention_in_few_kernels, for_speed, stacked
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import attention, forward, rms_norm, silu, softmax_, to_device
from reffuse.core.rope import apply_rope, rope_tables
from reffuse.core.tiny import SMOLLM2_SHAPED_CONFIG, build_synthetic, build_tiny
from reffuse.evaluation.verify import TARGETS

DTYPES = ("float32", "float64")


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_fused_kernel_equals_the_plain_function(strict_device, dtype):
    device, rng = strict_device, np.random.default_rng(0)
    x, gain = rng.standard_normal((5, 12)).astype(dtype), (1 + rng.standard_normal(12)).astype(dtype)
    on = device.asarray
    fused = gpu_kernels.kernels(device)

    x_on, gain_on = on(x), on(gain)
    device.reset()
    normed = gpu_kernels.rms_norm(x_on, gain_on, 1e-5)
    assert device.stats["operations"] == 2                              # instead of 6
    np.testing.assert_array_equal(normed.get(), rms_norm(x, gain, 1e-5))

    gate, up = 30 * rng.standard_normal((5, 12)).astype(dtype), x  # gates far below -88: silu's overflow path
    gate_on, up_on = on(gate), on(up)
    device.reset()
    hidden = fused.silu_times(gate_on, up_on)
    assert device.stats["operations"] == 1                              # instead of 5
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(hidden.get(), silu(gate) * up)

    heads = rng.standard_normal((6, 3, 8)).astype(dtype)                # [T, heads, hd]
    cos, sin = rope_tables(np.arange(20, 26), 8, 10000.0, dtype)
    out, inputs = device.empty(heads.shape, dtype), (on(heads), on(cos[:, None, :4]), on(sin[:, None, :4]))
    device.reset()
    fused.rotated(*gpu_kernels.halves(inputs[0]), *inputs[1:], 0.125, *gpu_kernels.halves(out))
    assert device.stats["operations"] == 1                              # instead of 6, with the scaling 7
    rotated = apply_rope(heads.transpose(1, 0, 2), cos, sin).transpose(1, 0, 2)
    np.testing.assert_array_equal(out.get(), rotated * 0.125)

    scores = rng.standard_normal((2, 4, 3, 7)).astype(dtype)            # [n_kv, T, group, S], keys 3.. of 7 new
    mask = np.where(np.arange(7) > 3 + np.arange(4)[:, None], -np.inf, 0).astype(dtype)[:, None]  # [T, 1, S]
    held, mask_on = on(scores), on(mask)
    device.reset()
    gpu_kernels.softmax_(held, mask_on)
    assert device.stats["operations"] == 3                              # max, Σ exp, exp / Σ
    np.testing.assert_array_equal(held.get(), softmax_(scores + mask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score_elements", [1 << 28, 40])
def test_attention_in_few_kernels_equals_attention(strict_device, monkeypatch, dtype, score_elements):
    """A prefill in one query block (or, with a small GPU_SCORE_ELEMENTS, in several and a last, shorter one) after
    cached positions, then one-token steps; the KV caches filled alike. Without a cache, as forward computes."""
    monkeypatch.setattr(fast, "GPU_SCORE_ELEMENTS", score_elements)
    model = reffuse.cast(build_tiny(), dtype)
    cfg, attn = model.config, model.blocks[0].attention
    check = ((lambda a, b: relative(a, b) < 1e-12) if dtype == "float64" else
             (lambda a, b: np.abs(a - b).max() < TARGETS["float32"]["logits_max_abs"]))
    x = np.random.default_rng(3).standard_normal((30, cfg.dim)).astype(dtype)
    gpu = to_device(model, "gpu")
    caches = {"cpu": KVCache(model, 40), "gpu": KVCache(gpu, 40)}
    for start, stop in ((0, 7), (7, 25), (25, 26), (26, 27)):
        cos, sin = rope_tables(np.arange(start, stop), cfg.head_dim, cfg.rope_theta, dtype)
        expected = attention(attn, x[start:stop], cfg, cos, sin, caches["cpu"])
        got = attention_in_few_kernels(stacked(gpu.blocks[0].attention), strict_device.asarray(x[start:stop]), cfg,
                                       strict_device.asarray(cos), strict_device.asarray(sin), caches["gpu"])
        assert check(got.get(), expected)
        for cache in caches.values():
            cache.length = stop
    for held in ("keys", "values"):  # one product x W_qkv^T against three: OpenBLAS may sum in another order
        assert check(getattr(caches["gpu"], held)[0].get(), getattr(caches["cpu"], held)[0])
    cos, sin = rope_tables(np.arange(9), cfg.head_dim, cfg.rope_theta, dtype)
    no_cache = attention_in_few_kernels(stacked(gpu.blocks[0].attention), strict_device.asarray(x[:9]), cfg,
                                        strict_device.asarray(cos), strict_device.asarray(sin))
    assert check(no_cache.get(), attention(attn, x[:9], cfg, cos, sin))


def test_the_query_block_is_64_on_the_cpu_and_a_whole_prefill_on_a_gpu(strict_device):
    assert fast.query_block(np, 9, 1024, 1024) == fast.QUERY_BLOCK == 64
    assert fast.query_block(strict_device, 9, 1024, 1024) == 1024
    assert fast.query_block(strict_device, 9, 1, 4096) == 1
    blocks = fast.query_block(strict_device, 9, 16384, 16384)           # scores held to GPU_SCORE_ELEMENTS
    assert 1 < blocks < 16384 and 9 * blocks * 16384 <= fast.GPU_SCORE_ELEMENTS


# synthetic-smollm2's structure (30 blocks with attention, 9 query heads on 3 kv heads, tied embeddings) at small
# widths: the same operations, each on fewer numbers. A prefill's queries go in one block up to thousands of tokens
# (query_block), so its count does not depend on its length: the fast test counts a 64-token prefill, the slow one
# checks that synthetic-smollm2's own 1,024-token prefill makes the same count.
SMOLLM2_STRUCTURE = SMOLLM2_SHAPED_CONFIG.__class__(**{**SMOLLM2_SHAPED_CONFIG.__dict__, "vocab_size": 512,
                                                       "dim": 36, "head_dim": 8})
DECODE_OPERATIONS, PREFILL_OPERATIONS = 600, 1500  # per decode step; per 1,024-token prefill
# Per block: RMSNorm 2, qkv 1, RoPE 2, scores 1, softmax 3, ·v 1, o 1, residual 1; RMSNorm 2, gate and up 2,
# silu ⊙ up 1, down 1, residual 1; in a prefill, the attention output's transposition 1. Outside the blocks: the
# ids' copy, the embedding's gather, the final RMSNorm 2, the LM head; in a prefill, the causal mask 5, made once.
DECODE_COUNT, PREFILL_COUNT = 30 * 19 + 5, 30 * 20 + 10


def operation_counts(strict_device, model, prompt: int) -> tuple[int, int]:
    """Device operations of a prefill of `prompt` tokens and of the decode step after it, on the stand-in (the
    RoPE tables, made once per process, made beforehand)."""
    gpu = reffuse.to_device(model, "gpu")
    gpu.rope(np.arange(prompt + 1))
    cache = KVCache(gpu, prompt + 1)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt)
    strict_device.reset()
    forward(gpu, ids, cache=cache)
    prefill = strict_device.stats["operations"]
    strict_device.reset()
    logits = forward(gpu, [5], cache=cache)
    assert to_numpy(logits).shape == (1, model.config.vocab_size)
    return prefill, strict_device.stats["operations"]


def test_operations_per_decode_step_and_per_prefill(strict_device):
    model = for_speed(build_synthetic(SMOLLM2_STRUCTURE, [True] * 30, [48] * 30))
    assert operation_counts(strict_device, model, 64) == (PREFILL_COUNT, DECODE_COUNT)
    assert PREFILL_COUNT <= PREFILL_OPERATIONS and DECODE_COUNT <= DECODE_OPERATIONS


@pytest.mark.slow
def test_operation_counts_of_synthetic_smollm2(strict_device):
    """The counts above are synthetic-smollm2's own, at 1,024 tokens (about a minute on two CPU cores)."""
    model = reffuse.load_model("synthetic-smollm2")
    assert operation_counts(strict_device, model, 1024) == (PREFILL_COUNT, DECODE_COUNT)


def test_the_stand_ins_fuse_refuses_what_cupy_fuse_refuses(strict_device):
    device = strict_device
    x = device.asarray(np.ones((2, 3)))
    for body, error in ((lambda a: device.sum(a, axis=-1, keepdims=True), "no keepdims"),
                        (lambda a: a[0], "has no attribute|not subscriptable"),
                        (lambda a: device.max(a - device.sum(a, axis=-1), axis=-1), "before its reduction"),
                        (lambda a: a * x, "cannot compute with ndarray"),
                        (lambda a: device.sum(a, axis=-1) + device.sum(a, axis=0), "one reduction")):
        with pytest.raises((TypeError, NotImplementedError), match=error):
            device.fuse(body)(x)

    def written_in_a_reduction(a):
        a += 1
        return device.sum(a, axis=-1)

    def written_where_broadcast(a, b):  # b [3] in a kernel of a's [2, 3]: two threads would update each element
        b += 1

    with pytest.raises(ValueError, match="by value"):
        device.fuse(written_in_a_reduction)(x)
    with pytest.raises(ValueError, match="smaller than the kernel's"):
        device.fuse(written_where_broadcast)(x, device.asarray(np.ones(3)))
