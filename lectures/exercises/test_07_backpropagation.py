"""Lecture 07, graded: the backward of RMSNorm, SwiGLU and attention against reffuse.training.backward's
forward/backward pairs (themselves checked against PyTorch's autograd in the project's tests), on the tiny
model's weights and on SmolLM2's block 0."""

import numpy as np
import pytest

from grading import check, gradients, parts
from reffuse.core.model import rms_norm
from reffuse.core.rope import rope_tables
from reffuse.training import backward as bw


def grade_rms_norm(graded, x, gain, eps, dy, what):
    dx, d_gain = parts(f"rms_norm_backward on {what}", graded.rms_norm_backward(dy, x, gain, eps), ("dx", "d_gain"))
    want_dx, want_gain = bw.rms_norm_backward(dy, bw.rms_norm_forward(x, gain, eps)[1], gain)
    check(f"rms_norm_backward on {what}: dx", dx, want_dx)
    check(f"rms_norm_backward on {what}: d_gain", d_gain, want_gain)


def grade_swiglu(graded, ffn, x, dy, what):
    dx, grads = parts(f"swiglu_backward on {what}", graded.swiglu_backward(dy, x, ffn.gate, ffn.up, ffn.down),
                      ("dx", "weight gradients"))
    want_dx, want = bw.swiglu_backward(dy, bw.swiglu_forward(ffn, x)[1], ffn)
    check(f"swiglu_backward on {what}: dx", dx, want_dx)
    for name in gradients(f"swiglu_backward on {what}", grads, ("gate", "up", "down")):
        check(f"swiglu_backward on {what}: d_{name}", grads[name], want[name])


def grade_attention(graded, attn, config, x, dy, what):
    dx, grads = parts(f"attention_backward on {what}",
                      graded.attention_backward(dy, x, attn.q, attn.k, attn.v, attn.o, config.n_heads,
                                                config.n_kv_heads, config.rope_theta), ("dx", "weight gradients"))
    cos, sin = rope_tables(np.arange(len(x)), config.head_dim, config.rope_theta, np.float64)
    want_dx, want = bw.attention_backward(dy, bw.attention_forward(attn, x, config, cos, sin)[1], attn, cos, sin)
    check(f"attention_backward on {what}: dx", dx, want_dx)
    for name in gradients(f"attention_backward on {what}", grads, ("q", "k", "v", "o")):
        check(f"attention_backward on {what}: d_w_{name}", grads[name], want[name])


def stream(rng, tokens, d):
    return 3 * rng.standard_normal((tokens, d))


def test_rms_norm_backward(graded, tiny, rng):
    d = tiny.config.dim
    x, dy = stream(rng, 7, d), rng.standard_normal((7, d))
    grade_rms_norm(graded, x, tiny.blocks[0].ffn.norm_gain, 1e-5, dy, "7 tokens")
    grade_rms_norm(graded, 0.05 * x, tiny.blocks[0].ffn.norm_gain, 1e-2, dy, "small x, eps 1e-2")


def test_swiglu_backward(graded, tiny, rng):
    d, ffn = tiny.config.dim, tiny.blocks[2].ffn
    x = rms_norm(stream(rng, 7, d), np.ones(d), 1e-5)
    grade_swiglu(graded, ffn, x, rng.standard_normal((7, d)), f"7 tokens, width {ffn.width}")


def test_attention_backward(graded, tiny, rng):
    d, cfg = tiny.config.dim, tiny.config
    x = rms_norm(stream(rng, 7, d), np.ones(d), 1e-5)
    grade_attention(graded, tiny.blocks[1].attention, cfg, x, rng.standard_normal((7, d)),
                    f"7 tokens, {cfg.n_heads} query heads on {cfg.n_kv_heads} kv heads")


@pytest.mark.slow
def test_smollm2_block_0_backward(graded, smollm2_part, rng):
    part = smollm2_part(0, 1, rng.integers(0, 49152, 6))
    cfg, block, x = part.config, part.blocks[0], part.embed                 # 6 token embeddings [6, d]
    dy = rng.standard_normal(x.shape)
    grade_rms_norm(graded, x, block.attention.norm_gain, cfg.norm_eps, dy, "SmolLM2's embeddings, block 0's gain")
    normed = rms_norm(x, block.attention.norm_gain, cfg.norm_eps)
    grade_attention(graded, block.attention, cfg, normed, dy, "SmolLM2's block 0")
    grade_swiglu(graded, block.ffn, normed, dy, "SmolLM2's FFN 0")
