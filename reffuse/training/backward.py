"""Backpropagation through the Llama decoder: each piece of the plain forward pass (reffuse.core.model) as a
forward/backward pair, the forward keeping what its backward reads, the backward the chain rule of the forward.

Notation: for a scalar loss L and an array a, da = ∂L/∂a has a's shape. A product y = x W^T with W [out, in]
(the (out, in) orientation of HF and PyTorch) has dx = dy W and dW = dy^T x. Training runs whole windows from
position 0 (no KV cache); RoPE is HF's rotate-half convention, and query head h reads kv head h // group (HF's
repeat_kv), as in the forward.

Each backward takes `weights`: whether the parameters of that piece train. A frozen piece still passes the
gradient on to its input, but computes no weight gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import array_module
from reffuse.core.config import Config
from reffuse.core.model import FFN, Attention, silu, softmax_
from reffuse.core.rope import apply_rope

# ---------------------------------------------------------------------------------------------------------------
# Token embedding


def embedding_forward(embed, ids):
    """x = E[ids]. ids [T] -> [T, d]."""
    return embed[ids]


def embedding_backward(dx, ids, vocab_size: int):
    """dE[v] = Σ_{t: ids[t] = v} dx[t]: a scatter-add, since a token that occurs twice receives both gradients.
    Written as a product with the [distinct tokens, T] indicator of which position holds which token (at most T²
    numbers), which NumPy and CuPy compute alike. dx [T, d] -> dE [vocab, d]."""
    xp = array_module(dx)
    tokens, position_token = xp.unique(ids, return_inverse=True)                    # [U], [T]
    holds = (xp.arange(len(tokens))[:, None] == position_token[None, :]).astype(dx.dtype)  # [U, T]
    d_embed = xp.zeros((vocab_size, dx.shape[1]), dtype=dx.dtype)
    d_embed[tokens] = holds @ dx                                                     # [U, T] @ [T, d]
    return d_embed


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm_forward(x, gain, eps):
    """η(x) = x̂ ⊙ g with x̂ = x · r, r = (mean_j x_j² + eps)^(-1/2) per token. x [T, d] -> [T, d].
    Keeps x̂ and r."""
    xp = array_module(x)
    r = 1 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)   # [T, 1]
    x_hat = x * r
    return x_hat * gain, (x_hat, r)


def rms_norm_backward(dy, cache, gain, weights: bool = True):
    """dg = Σ_t dy ⊙ x̂, and with dx̂ = dy ⊙ g, since ∂r/∂x_j = -r³ x_j / d:

        dx = r (dx̂ - x̂ · mean_j(dx̂_j x̂_j))

    (the gradient of the scale, r, removes from dx̂ its component along x̂). dy [T, d] -> dx [T, d], dg [d]."""
    x_hat, r = cache
    d_gain = (dy * x_hat).sum(axis=0) if weights else None
    dx_hat = dy * gain
    dx = r * (dx_hat - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True))
    return dx, d_gain


# ---------------------------------------------------------------------------------------------------------------
# Rotate-half RoPE


def rope_backward(dy, cos, sin):
    """RoPE is y = x ⊙ cos + R(x) ⊙ sin with R(x) = [-x₂, x₁] (x₁, x₂ the two halves of a head), a rotation of
    each pair (i, i + hd/2). Its transpose rotates back: R^T(z) = [z₂, -z₁] = -R(z), so

        dx = dy ⊙ cos + R^T(dy ⊙ sin) = dy ⊙ cos - R(dy ⊙ sin) = apply_rope(dy, cos, -sin).

    dy [heads, T, hd] -> dx [heads, T, hd]."""
    return apply_rope(dy, cos, -sin)


# ---------------------------------------------------------------------------------------------------------------
# Causal grouped-query attention


@dataclass
class AttentionCache:
    x: object      # [T, d]       the normalised input
    q: object      # [n_kv, group, T, hd]  after RoPE, query heads grouped by the kv head they read
    k: object      # [n_kv, T, hd] after RoPE
    v: object      # [n_kv, T, hd]
    heads: object  # [T, n_heads·hd]  the heads' outputs side by side, the input of W_o


def causal_probs(q, k):
    """P = softmax(q k^T / sqrt(hd) + M) over keys, M = -inf where the key is in the query's future.
    q [n_kv, group, T, hd], k [n_kv, T, hd] -> [n_kv, group, T, T]."""
    xp = array_module(q)
    T = q.shape[2]
    scores = q @ k[:, None].transpose(0, 1, 3, 2)                    # [n_kv, group, T, T]
    scores /= math.sqrt(q.shape[-1])
    scores += xp.triu(xp.full((T, T), -xp.inf, dtype=q.dtype), 1)    # keys after the query: -inf
    return softmax_(scores)


def attention_forward(attn: Attention, x, config: Config, cos, sin):
    """reffuse.core.model.attention over a whole window. x [T, d] (normalised) -> [T, d]."""
    T, hd = x.shape[0], config.head_dim
    q = (x @ attn.q.T).reshape(T, -1, hd).transpose(1, 0, 2)    # [T, d] -> [n_heads, T, hd]
    k = (x @ attn.k.T).reshape(T, -1, hd).transpose(1, 0, 2)    # [T, d] -> [n_kv, T, hd]
    v = (x @ attn.v.T).reshape(T, -1, hd).transpose(1, 0, 2)    # [T, d] -> [n_kv, T, hd]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    n_heads, n_kv = q.shape[0], k.shape[0]
    q = q.reshape(n_kv, n_heads // n_kv, T, hd)                  # query heads grouped by their kv head
    out = causal_probs(q, k) @ v[:, None]                        # [n_kv, group, T, hd]
    heads = out.reshape(n_heads, T, hd).transpose(1, 0, 2).reshape(T, n_heads * hd)
    return heads @ attn.o.T, AttentionCache(x, q, k, v, heads)   # [T, n_heads·hd] -> [T, d]


def attention_backward(dy, cache: AttentionCache, attn: Attention, cos, sin, weights: bool = True):
    """The chain rule through attention, from its output back to its normalised input. With S = q k^T / sqrt(hd)
    (masked), P = softmax(S) and O = P v per query head:

        dW_o = dy^T heads,  d heads = dy W_o                         the output projection
        dP = dO v^T,  dv = Σ_heads P^T dO                             O = P v
        dS = P ⊙ (dP - rowsum(dP ⊙ P))                               softmax's Jacobian; masked keys have P = 0
        dq = dS k / sqrt(hd),  dk = Σ_heads dS^T q / sqrt(hd)

    A kv head is read by `group` query heads, so its dk and dv sum over them (the transpose of HF's repeat_kv).
    P is recomputed from q and k rather than kept (T² numbers per head). Then RoPE's transpose on dq and dk,
    and the three input projections: dx = dq W_q + dk W_k + dv W_v, dW_q = dq^T x, ...
    dy [T, d] -> dx [T, d] and the weight gradients {q, k, v, o} (None when frozen)."""
    n_kv, group, T, hd = cache.q.shape
    n_heads = n_kv * group
    d_heads = dy @ attn.o                                                         # [T, d] -> [T, n_heads·hd]
    d_out = d_heads.reshape(T, n_heads, hd).transpose(1, 0, 2).reshape(n_kv, group, T, hd)
    probs = causal_probs(cache.q, cache.k)                                        # [n_kv, group, T, T]
    dv = (probs.transpose(0, 1, 3, 2) @ d_out).sum(axis=1)                        # [n_kv, T, hd]
    d_probs = d_out @ cache.v[:, None].transpose(0, 1, 3, 2)                      # [n_kv, group, T, T]
    d_scores = probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True))
    d_scores /= math.sqrt(hd)
    dq = (d_scores @ cache.k[:, None]).reshape(n_heads, T, hd)                    # [n_heads, T, hd]
    dk = (d_scores.transpose(0, 1, 3, 2) @ cache.q).sum(axis=1)                   # [n_kv, T, hd]
    dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
    dq, dk, dv = (a.transpose(1, 0, 2).reshape(T, -1) for a in (dq, dk, dv))      # [heads, T, hd] -> [T, heads·hd]
    dx = dq @ attn.q + dk @ attn.k + dv @ attn.v                                  # [T, d]
    grads = None
    if weights:
        grads = {"q": dq.T @ cache.x, "k": dk.T @ cache.x, "v": dv.T @ cache.x, "o": dy.T @ cache.heads}
    return dx, grads


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU (one FFN, or a fused wide one: Theorem 3.1 makes them the same code)


def swiglu_forward(ffn: FFN, x):
    """eq. 3: FFN(x) = (silu(x W_gate^T) ⊙ x W_up^T) W_down^T. x [T, d] -> [T, d]. Keeps x and the two
    pre-activations; silu is recomputed in the backward."""
    gate = x @ ffn.gate.T                                # [T, d] -> [T, dh]
    up = x @ ffn.up.T                                    # [T, d] -> [T, dh]
    return (silu(gate) * up) @ ffn.down.T, (x, gate, up)  # [T, dh] -> [T, d]


def swiglu_backward(dy, cache, ffn: FFN, weights: bool = True):
    """With a = x W_gate^T, b = x W_up^T, h = silu(a) ⊙ b, y = h W_down^T:

        dW_down = dy^T h,  dh = dy W_down
        db = dh ⊙ silu(a),  da = dh ⊙ b ⊙ silu'(a),  silu'(a) = σ(a) (1 + a (1 - σ(a)))
        dx = da W_gate + db W_up,  dW_gate = da^T x,  dW_up = db^T x

    Each hidden unit appears in its own column only, which is why a fused FFN (its units stacked, Theorem 3.1)
    needs no other code. dy [T, d] -> dx [T, d] and {gate, up, down} (None when frozen)."""
    xp = array_module(dy)
    x, a, b = cache
    with np.errstate(over="ignore"):  # e^-a overflows for a < -88 in float32: σ is 0 there, as it should be
        sigma = 1 / (1 + xp.exp(-a))                     # [T, dh]
    activated = a * sigma                                # silu(a)
    dh = dy @ ffn.down                                   # [T, d] -> [T, dh]
    db = dh * activated
    da = dh * b * sigma * (1 + a * (1 - sigma))
    dx = da @ ffn.gate + db @ ffn.up                     # [T, dh] -> [T, d]
    grads = None
    if weights:
        grads = {"gate": da.T @ x, "up": db.T @ x, "down": dy.T @ (activated * b)}
    return dx, grads
