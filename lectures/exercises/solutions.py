"""The teacher's answers to student.py, written as a student would: NumPy only, each piece from its equation,
nothing taken from reffuse, which grades them. Grade them: python -m pytest lectures/exercises --solutions
"""

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Lecture 01: the Llama block


def rms_norm(x, gain, eps):
    rms = np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)   # [T, 1], one per token
    return gain * (x / rms)


def apply_rope(x, positions, theta):
    half = x.shape[-1] // 2
    frequencies = 1.0 / theta ** (2 * np.arange(half) / x.shape[-1])    # radians per position, [hd/2]
    angles = np.outer(positions, frequencies)                          # [T, hd/2]
    c, s = np.cos(angles), np.sin(angles)
    first, second = x[..., :half], x[..., half:]                       # pair i is (i, i + hd/2)
    return np.concatenate([first * c - second * s, second * c + first * s], axis=-1)


def softmax(scores):
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def split_heads(y, n):
    """[T, n·hd] -> [n, T, hd]."""
    return y.reshape(y.shape[0], n, -1).transpose(1, 0, 2)


def attention(x, w_q, w_k, w_v, w_o, n_heads, n_kv_heads, theta, cache=None):
    hd = w_q.shape[0] // n_heads
    group = n_heads // n_kv_heads
    past = cache["k"].shape[1] if cache else 0
    positions = np.arange(past, past + len(x))
    q = apply_rope(split_heads(x @ w_q.T, n_heads), positions, theta)     # [n_heads, T, hd]
    k = apply_rope(split_heads(x @ w_k.T, n_kv_heads), positions, theta)  # [n_kv, T, hd]
    v = split_heads(x @ w_v.T, n_kv_heads)                                # [n_kv, T, hd]
    if cache is not None:
        if cache:
            k = np.concatenate([cache["k"], k], axis=1)                   # [n_kv, S, hd]
            v = np.concatenate([cache["v"], v], axis=1)
        cache["k"], cache["v"] = k, v
    visible = np.arange(k.shape[1])[None, :] <= positions[:, None]       # [T, S]: a key at or before the query
    outputs = []
    for h in range(n_heads):
        kv = h // group                                                  # the key/value head this query head reads
        scores = np.where(visible, q[h] @ k[kv].T / np.sqrt(hd), -np.inf)  # [T, S]
        outputs.append(softmax(scores) @ v[kv])                          # [T, hd]
    return np.concatenate(outputs, axis=1) @ w_o.T                       # [T, n_heads·hd] -> [T, d]


def sigmoid(z):
    return 0.5 * (1 + np.tanh(z / 2))  # = 1 / (1 + e^-z), without overflow for large negative z


def swiglu(x, w_gate, w_up, w_down):
    a = x @ w_gate.T                                                     # [T, dh]
    return (a * sigmoid(a) * (x @ w_up.T)) @ w_down.T                    # [T, dh] -> [T, d]


# ---------------------------------------------------------------------------------------------------------------
# Lecture 02: Theorem 3.1


def fuse_ffns(ffns):
    gates, ups, downs = zip(*ffns)
    return np.vstack(gates), np.vstack(ups), np.hstack(downs)  # hidden units side by side


def fold_norm_gain(gain, w_gate, w_up):
    # (u ⊙ g) W^T = u (W diag(g))^T
    return w_gate @ np.diag(gain), w_up @ np.diag(gain)


# ---------------------------------------------------------------------------------------------------------------
# Lecture 03: dependency metrics


def dependency_entry(blocks, x, i, j):
    def contribution_of_j(skipped):
        stream = x
        for k in range(j):
            if k != skipped:
                stream = blocks[k](stream)
        return blocks[j](stream) - stream

    h, h_without_i = contribution_of_j(None)[1:], contribution_of_j(i)[1:]   # tokens 1..T-1
    cos = np.sum(h * h_without_i, axis=-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(h_without_i, axis=-1))
    return float(np.mean(1 - cos))


# ---------------------------------------------------------------------------------------------------------------
# Lecture 06: tensor parallelism


def ring_step(buffers, phase, step):
    n, size = len(buffers), buffers[0].size
    starts = [c * size // n for c in range(n + 1)]
    after = [b.copy() for b in buffers]                     # every rank sends what it held before the step
    for sender in range(n):
        receiver = (sender + 1) % n
        if phase == "reduce-scatter":
            c = (sender - step) % n
            after[receiver][starts[c]:starts[c + 1]] += buffers[sender][starts[c]:starts[c + 1]]
        elif phase == "all-gather":
            c = (sender + 1 - step) % n
            after[receiver][starts[c]:starts[c + 1]] = buffers[sender][starts[c]:starts[c + 1]]
        else:
            raise ValueError(f"phase {phase!r}: use 'reduce-scatter' or 'all-gather'")
    return after


# ---------------------------------------------------------------------------------------------------------------
# Lecture 07: backpropagation


def rms_norm_backward(dy, x, gain, eps):
    d = x.shape[-1]
    inv_rms = 1 / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)  # [T, 1]
    d_gain = np.sum(dy * x * inv_rms, axis=0)
    d_normalised = dy * gain
    # ∂(x_i · inv_rms)/∂x_j = inv_rms δ_ij - x_i x_j inv_rms³ / d
    dx = d_normalised * inv_rms - x * inv_rms ** 3 * np.sum(d_normalised * x, axis=-1, keepdims=True) / d
    return dx, d_gain


def swiglu_backward(dy, x, w_gate, w_up, w_down):
    a, b = x @ w_gate.T, x @ w_up.T                          # [T, dh] each
    s = sigmoid(a)
    d_hidden = dy @ w_down                                   # [T, d] -> [T, dh]
    da = d_hidden * b * (s + a * s * (1 - s))                # d silu(a)/da = σ + a σ (1 - σ)
    db = d_hidden * a * s
    dx = da @ w_gate + db @ w_up
    return dx, {"gate": da.T @ x, "up": db.T @ x, "down": dy.T @ (a * s * b)}


def attention_backward(dy, x, w_q, w_k, w_v, w_o, n_heads, n_kv_heads, theta):
    T, hd = len(x), w_q.shape[0] // n_heads
    group = n_heads // n_kv_heads
    positions = np.arange(T)
    q = apply_rope(split_heads(x @ w_q.T, n_heads), positions, theta)
    k = apply_rope(split_heads(x @ w_k.T, n_kv_heads), positions, theta)
    v = split_heads(x @ w_v.T, n_kv_heads)
    causal = np.tril(np.ones((T, T), dtype=bool))
    probs = [softmax(np.where(causal, q[h] @ k[h // group].T / np.sqrt(hd), -np.inf)) for h in range(n_heads)]
    heads = np.concatenate([p @ v[h // group] for h, p in enumerate(probs)], axis=1)   # [T, n_heads·hd]

    d_heads = dy @ w_o                                       # [T, n_heads·hd]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for h, p in enumerate(probs):
        kv = h // group
        d_out = d_heads[:, h * hd:(h + 1) * hd]              # [T, hd]
        dv[kv] += p.T @ d_out                                # a kv head sums over the query heads reading it
        dp = d_out @ v[kv].T                                 # [T, T]
        d_scores = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) / np.sqrt(hd)
        dq[h] = d_scores @ k[kv]
        dk[kv] += d_scores.T @ q[h]
    # RoPE rotates; the transpose of a rotation is the rotation by the opposite angle, that of position -p
    dq, dk = apply_rope(dq, -positions, theta), apply_rope(dk, -positions, theta)
    dq, dk, dv = (g.transpose(1, 0, 2).reshape(T, -1) for g in (dq, dk, dv))   # [T, heads·hd]
    dx = dq @ w_q + dk @ w_k + dv @ w_v
    return dx, {"q": dq.T @ x, "k": dk.T @ x, "v": dv.T @ x, "o": dy.T @ heads}
