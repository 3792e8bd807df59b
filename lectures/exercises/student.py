"""Your own FFN Fusion, piece by piece: write each function below in NumPy, then grade it against reffuse.

    python -m pytest lectures/exercises                                  every function
    python -m pytest lectures/exercises/test_01_llama_block.py           one lecture's
    python -m pytest lectures/exercises -k rms_norm                      one function's tests

Until a function is written its tests fail with "not implemented yet". A wrong answer fails with what is wrong:
the shape, or the element furthest from reffuse's and by how much. Inputs are float64 and an answer must agree
with reffuse's to 1e-9 of the largest value: rounding is far below that, any wrong formula far above.

Notation: T tokens, d the model width, dh an FFN's hidden width, hd the head size. Weights are stored
(out_features, in_features), as in PyTorch and reffuse, so a projection is x @ W.T. Use NumPy only: the point is
to write each piece yourself, and reffuse is what grades it.
"""

import numpy as np  # noqa: F401  (for your code)

# ---------------------------------------------------------------------------------------------------------------
# Lecture 01: the Llama block


def rms_norm(x, gain, eps):
    """RMSNorm, per token: x / sqrt(mean(x²) + eps) ⊙ gain, the mean over the d features of each token.

    x [T, d], gain [d], eps a small float -> [T, d].
    """
    raise NotImplementedError("not implemented yet: rms_norm (lecture 01)")


def apply_rope(x, positions, theta):
    """Rotary position embedding, HF's rotate-half convention. For i < hd/2, dimensions i and i + hd/2 of every
    head form a pair, rotated as a point (x_i, x_{i+hd/2}) of the plane by the angle positions[t] · theta^(-2i/hd):

        y_i        = x_i cos(angle) - x_{i+hd/2} sin(angle)
        y_{i+hd/2} = x_{i+hd/2} cos(angle) + x_i sin(angle)

    x [heads, T, hd], positions [T] (the position of each token), theta the base (rope_theta) -> [heads, T, hd].
    """
    raise NotImplementedError("not implemented yet: apply_rope (lecture 01)")


def attention(x, w_q, w_k, w_v, w_o, n_heads, n_kv_heads, theta, cache=None):
    """Causal grouped-query self-attention with RoPE, and a KV cache.

    x [T, d], the normalised input; w_q [n_heads·hd, d]; w_k, w_v [n_kv_heads·hd, d]; w_o [d, n_heads·hd];
    hd = w_q.shape[0] // n_heads; theta the RoPE base.
    Head h of q is rows h·hd..(h+1)·hd of x @ w_q.T (k and v alike); q and k are rotated by apply_rope; query head h
    reads key/value head h // (n_heads // n_kv_heads); scores are q·k / sqrt(hd), softmax over the keys a query may
    see: those at its own position and before. The heads' outputs side by side [T, n_heads·hd] go through w_o.

    cache: None, or a dict that keeps the keys (after RoPE) and values of every position seen so far: {} before
    the first call; after each call cache["k"] and cache["v"] are [n_kv_heads, S, hd], S the positions seen.
    The T new tokens are at positions S..S+T-1 (0..T-1 without a cache) and see every cached position.

    Returns [T, d].
    """
    raise NotImplementedError("not implemented yet: attention (lecture 01)")


def swiglu(x, w_gate, w_up, w_down):
    """The FFN, eq. 3: (silu(x W_gate^T) ⊙ x W_up^T) W_down^T with silu(z) = z σ(z) = z / (1 + e^-z).

    x [T, d], w_gate and w_up [dh, d], w_down [d, dh] -> [T, d].
    """
    raise NotImplementedError("not implemented yet: swiglu (lecture 01)")


# ---------------------------------------------------------------------------------------------------------------
# Lecture 02: Theorem 3.1


def fuse_ffns(ffns):
    """Theorem 3.1: one wide SwiGLU equal to the sum of a run's FFNs, whose widths may differ:
    swiglu(u, *fuse_ffns(ffns)) equals Σ_k swiglu(u, *ffns[k]) for every u.

    ffns: a list of (w_gate [dh_k, d], w_up [dh_k, d], w_down [d, dh_k]).
    Returns (w_gate* [Σ dh_k, d], w_up* [Σ dh_k, d], w_down* [d, Σ dh_k]).
    """
    raise NotImplementedError("not implemented yet: fuse_ffns (lecture 02)")


def fold_norm_gain(gain, w_gate, w_up):
    """Fold an RMSNorm's gain into the two projections that read it: (w_gate', w_up') such that
    rms_norm(x, ones, eps) @ w'.T equals rms_norm(x, gain, eps) @ w.T for every x.

    gain [d], w_gate and w_up [dh, d] -> (w_gate' [dh, d], w_up' [dh, d]).
    """
    raise NotImplementedError("not implemented yet: fold_norm_gain (lecture 02)")


# ---------------------------------------------------------------------------------------------------------------
# Lecture 03: dependency metrics


def dependency_entry(blocks, x, i, j):
    """One entry M[i, j], i < j, of the paper's block-wise dependency matrix (§3).

    blocks: a list of functions f_k, each a whole block [T, d] -> [T, d] (its residual adds included);
    x [T, d]: the residual stream entering blocks[0]. With x_0 = x and x_{k+1} = f_k(x_k):
      h^j = f_j(x_j) - x_j            block j's contribution;
      h~^j_i                          the same, with block i skipped (x_{i+1} = x_i).
    M[i, j] is the cosine distance 1 - cos(h^j_t, h~^j_{i,t}) of each token t, averaged over tokens 1..T-1:
    token 0, the attention sink, is left out, as reffuse does by default.

    Returns a float.
    """
    raise NotImplementedError("not implemented yet: dependency_entry (lecture 03)")


# ---------------------------------------------------------------------------------------------------------------
# Lecture 06: tensor parallelism


def ring_step(buffers, phase, step):
    """One step of the ring all-reduce on N simulated ranks.

    buffers: a list of N 1-D arrays of one size, rank r's buffer at index r. Each is cut into N chunks: chunk c is
    elements c·size//N to (c+1)·size//N (exclusive). In a step every rank r sends one chunk to rank (r+1) mod N and
    receives one from rank (r-1) mod N, all at once:
      phase "reduce-scatter", step 0..N-2: rank r sends its chunk (r - step) mod N; the receiver adds it into its
        own copy of that chunk. After N-1 steps rank r holds the complete sum of chunk (r+1) mod N;
      phase "all-gather", step 0..N-2: rank r sends its chunk (r + 1 - step) mod N; the receiver overwrites its
        own copy of that chunk with it. After N-1 steps every rank holds the whole sum.

    Returns the N buffers after the step (a new list; the arrays may be updated in place).
    """
    raise NotImplementedError("not implemented yet: ring_step (lecture 06)")


# ---------------------------------------------------------------------------------------------------------------
# Lecture 07: backpropagation. For a scalar loss L, dy = ∂L/∂y has y's shape, and so does every gradient returned.


def rms_norm_backward(dy, x, gain, eps):
    """The backward of y = rms_norm(x, gain, eps).

    dy [T, d], x [T, d], gain [d] -> (dx [T, d], d_gain [d]).
    """
    raise NotImplementedError("not implemented yet: rms_norm_backward (lecture 07)")


def swiglu_backward(dy, x, w_gate, w_up, w_down):
    """The backward of y = swiglu(x, w_gate, w_up, w_down).

    dy [T, d], x [T, d] -> (dx [T, d], {"gate": [dh, d], "up": [dh, d], "down": [d, dh]}).
    """
    raise NotImplementedError("not implemented yet: swiglu_backward (lecture 07)")


def attention_backward(dy, x, w_q, w_k, w_v, w_o, n_heads, n_kv_heads, theta):
    """The backward of y = attention(x, w_q, w_k, w_v, w_o, n_heads, n_kv_heads, theta), without a cache
    (positions 0..T-1).

    dy [T, d], x [T, d] -> (dx [T, d], {"q": w_q's shape, "k": w_k's, "v": w_v's, "o": w_o's}).
    """
    raise NotImplementedError("not implemented yet: attention_backward (lecture 07)")
