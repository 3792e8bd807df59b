"""Lecture 01, graded: RMSNorm, RoPE, grouped-query attention with a KV cache and SwiGLU against the functions the
plain forward pass runs (reffuse.core.model: rms_norm, attention, swiglu, block_forward; reffuse.core.rope:
rope_tables and apply_rope; reffuse.core.kv_cache: KVCache), on the tiny model's weights and on SmolLM2's block 0."""

import numpy as np
import pytest

from grading import check
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import Attention, attention, block_forward, rms_norm, swiglu
from reffuse.core.rope import apply_rope, rope_tables


def normalised_input(tiny, rng, tokens):
    """What attention and the FFN read: a normalised residual stream [tokens, d]."""
    return rms_norm(3 * rng.standard_normal((tokens, tiny.config.dim)), np.ones(tiny.config.dim), 1e-5)


def test_rms_norm(graded, tiny, rng):
    gain = tiny.blocks[0].attention.norm_gain
    x = 3 * rng.standard_normal((9, tiny.config.dim))
    check("rms_norm(x, gain, eps=1e-5)", graded.rms_norm(x, gain, 1e-5), rms_norm(x, gain, 1e-5))
    small = 0.05 * x  # mean(x²) near eps: where eps goes (inside the square root) shows
    check("rms_norm(x, gain, eps=1e-2) on small x", graded.rms_norm(small, gain, 1e-2), rms_norm(small, gain, 1e-2))


@pytest.mark.parametrize("head_dim, theta, positions", [(16, 10000.0, range(7)),
                                                        (16, 10000.0, range(5, 12)),
                                                        (64, 100000.0, [0, 1, 2, 999, 5000])],
                         ids=["from 0", "from 5", "SmolLM2's heads, far positions"])
def test_apply_rope(graded, rng, head_dim, theta, positions):
    positions = np.array(positions)
    x = rng.standard_normal((3, len(positions), head_dim))           # [heads, T, hd]
    cos, sin = rope_tables(positions, head_dim, theta, np.float64)
    check(f"apply_rope(x [3, {len(positions)}, {head_dim}], positions {positions.tolist()}, theta {theta:g})",
          graded.apply_rope(x, positions, theta), apply_rope(x, cos, sin))


def call_attention(graded, attn: Attention, x, config, cache=None):
    return graded.attention(x, attn.q, attn.k, attn.v, attn.o, config.n_heads, config.n_kv_heads,
                            config.rope_theta, cache=cache)


def test_attention(graded, tiny, rng):
    cfg, attn = tiny.config, tiny.blocks[0].attention               # 4 query heads read 2 kv heads
    x = normalised_input(tiny, rng, 9)
    cos, sin = rope_tables(np.arange(9), cfg.head_dim, cfg.rope_theta, np.float64)
    check(f"attention on 9 tokens ({cfg.n_heads} query heads, {cfg.n_kv_heads} kv heads)",
          call_attention(graded, attn, x, cfg), attention(attn, x, cfg, cos, sin))


def test_attention_with_kv_cache(graded, tiny, rng):
    """A prefill of 5 tokens, two single tokens, then 3 at once: each output against reffuse's attention on its
    KVCache, and the cache itself against reffuse's after every call."""
    cfg, attn = tiny.config, tiny.blocks[0].attention
    x = normalised_input(tiny, rng, 10)
    theirs, ours = KVCache(tiny, max_tokens=10), {}
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 10)]:
        cos, sin = rope_tables(np.arange(start, stop), cfg.head_dim, cfg.rope_theta, np.float64)
        want = attention(attn, x[start:stop], cfg, cos, sin, theirs, layer=0)
        theirs.length = stop
        case = f"attention with a KV cache, tokens {start}..{stop - 1} after {start} cached"
        check(case, call_attention(graded, attn, x[start:stop], cfg, cache=ours), want)
        for name, kept in (("k", theirs.keys[0]), ("v", theirs.values[0])):
            if name not in ours:
                pytest.fail(f"{case}: the cache holds no {name!r} after the call: keep cache[{name!r}] "
                            f"[n_kv_heads, S, hd]", pytrace=False)
            check(f"{case}: cache[{name!r}]", ours[name], kept[:, :stop])


def test_swiglu(graded, tiny, rng):
    ffn = tiny.blocks[1].ffn
    x = normalised_input(tiny, rng, 9)
    check(f"swiglu on 9 tokens, width {ffn.width}", graded.swiglu(x, ffn.gate, ffn.up, ffn.down), swiglu(ffn, x))


@pytest.mark.slow
def test_smollm2_block_0(graded, smollm2_part, rng):
    """SmolLM2's block 0 (eq. 1-2) in float64 from your functions: its attention (9 query heads on 3 kv heads,
    head size 64, RoPE base 100000) with and without a cache, its FFN, and the whole block."""
    part = smollm2_part(0, 1, rng.integers(0, 49152, 12))
    cfg, attn, ffn = part.config, part.blocks[0].attention, part.blocks[0].ffn
    x = part.embed                                                   # the stream entering block 0 [12, d]
    cos, sin = rope_tables(np.arange(12), cfg.head_dim, cfg.rope_theta, np.float64)

    normed = rms_norm(x, attn.norm_gain, cfg.norm_eps)
    check("rms_norm of SmolLM2's embeddings, block 0's gain", graded.rms_norm(x, attn.norm_gain, cfg.norm_eps), normed)
    want_attention = attention(attn, normed, cfg, cos, sin)
    check("attention of SmolLM2's block 0", call_attention(graded, attn, normed, cfg), want_attention)
    cache = {}
    stepped = [call_attention(graded, attn, normed[:8], cfg, cache)]
    stepped += [call_attention(graded, attn, normed[t:t + 1], cfg, cache) for t in range(8, 12)]
    check("attention of SmolLM2's block 0, 8 tokens then 4 one at a time through your cache",
          np.concatenate(stepped), want_attention)
    check(f"SmolLM2's FFN 0, width {ffn.width}", graded.swiglu(normed, ffn.gate, ffn.up, ffn.down), swiglu(ffn, normed))

    ours = x + call_attention(graded, attn, graded.rms_norm(x, attn.norm_gain, cfg.norm_eps), cfg)
    ours = ours + graded.swiglu(graded.rms_norm(ours, ffn.norm_gain, cfg.norm_eps), ffn.gate, ffn.up, ffn.down)
    check("SmolLM2's block 0 (eq. 1-2) built from your rms_norm, attention and swiglu", ours,
          block_forward(part, 0, x, cos, sin))
