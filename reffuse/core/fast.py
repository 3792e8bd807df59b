"""The forward pass's arithmetic arranged for speed: the kernels FAST, on which reffuse.load_model returns models.

Each replaces a plain function of reffuse.core.model (rope_rows: of reffuse.core.rope) and is tested equal to it
(tests/core/test_fast_paths.py): bit for bit where the operations are the same, within float32 rounding where a sum
runs over fewer zeros or in another order.

    attention_stacked  for `attention`: q, k and v in one product, masked work skipped (StackedAttention);
                       on a GPU, attention_in_few_kernels
    swiglu_in_cache    for `swiglu`: past the cache's size, the hidden units in column blocks; on a GPU,
                       silu(gate) ⊙ up in one kernel
    rope_rows          for `rope_tables`: rows cut from tables made once
    rms_norm_in_two_kernels  for `rms_norm`: on a GPU, one reduction and one map (the CPU computes rms_norm)
    gathered           every weight in one allocation, on huge pages

On a GPU each array operation is a kernel launch of a few microseconds, so there the kernels make few of them: the
elementwise chains are fused into one kernel each (reffuse.core.gpu_kernels) and a prefill's queries go in one
block. The CPU computes as before.

`for_speed(model)` puts a model on FAST; `reffuse.core.model.plain(model)` puts it back on the plain functions. What
each arrangement buys, measured on SmolLM2, is in benchmarks/results/profile_smollm2*/profile.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from reffuse.core import gpu_kernels
from reffuse.core.backend import array_module
from reffuse.core.config import Config
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import (FFN, Attention, Kernels, Model, has_heads, linear, map_arrays, rms_norm, silu, swiglu,
                                weights_of)
from reffuse.core.rope import apply_rope, rope_tables
from reffuse.errors import ReffuseError


# ---------------------------------------------------------------------------------------------------------------
# Attention


@dataclass(frozen=True)
class StackedAttention:
    """An attention whose q, k and v, which read the same input, are row blocks of one array `qkv`, so that one
    product reads all three. `q`, `k` and `v` are views of it with HF's meaning and orientation, as in Attention."""
    norm_gain: np.ndarray  # [d]
    qkv: np.ndarray        # [(n_heads + 2 n_kv_heads) head_dim, d]: q's rows, then k's, then v's
    o: np.ndarray          # [d, n_heads*head_dim]
    qkv_bias: np.ndarray | None = None  # [(n_heads + 2 n_kv_heads) head_dim]: q's, k's and v's biases
    o_bias: np.ndarray | None = None    # [d]

    @property
    def q(self):
        return self.qkv[:self.o.shape[1]]                                  # [n_heads*head_dim, d]

    @property
    def k(self):
        return self.qkv[self.o.shape[1]:(self.qkv.shape[0] + self.o.shape[1]) // 2]  # [n_kv_heads*head_dim, d]

    @property
    def v(self):
        return self.qkv[(self.qkv.shape[0] + self.o.shape[1]) // 2:]      # [n_kv_heads*head_dim, d]

    def _bias(self, rows: slice):
        return None if self.qkv_bias is None else self.qkv_bias[rows]

    @property
    def q_bias(self):
        return self._bias(slice(0, self.o.shape[1]))

    @property
    def k_bias(self):
        return self._bias(slice(self.o.shape[1], (self.qkv.shape[0] + self.o.shape[1]) // 2))

    @property
    def v_bias(self):
        return self._bias(slice((self.qkv.shape[0] + self.o.shape[1]) // 2, None))


def stacked(attn: Attention | StackedAttention) -> StackedAttention:
    """attn with q, k and v copied into one array (a StackedAttention as it is): the same numbers."""
    if isinstance(attn, StackedAttention):
        return attn
    q, k, v = attn.q, attn.k, attn.v
    if not (q.ndim == k.ndim == v.ndim == 2 and q.shape[1] == k.shape[1] and k.shape == v.shape
            and q.dtype == k.dtype == v.dtype and attn.o.shape[-1] == q.shape[0]):
        shapes = ", ".join(f"{name} {tuple(w.shape)} {w.dtype}" for name, w in zip("qkvo", (q, k, v, attn.o)))
        raise ReffuseError(f"Attention weights {shapes}: q, k and v must be 2-D with the same input width and "
                           "dtype, k and v of one shape, and o as many columns as q has rows")
    xp = array_module(q)
    biases = (attn.q_bias, attn.k_bias, attn.v_bias)
    qkv_bias = None
    if any(b is not None for b in biases):  # an absent one of the three adds zeros
        qkv_bias = xp.concatenate([xp.zeros(w.shape[0], w.dtype) if b is None else b for w, b in zip((q, k, v), biases)])
    return StackedAttention(attn.norm_gain, xp.concatenate((q, k, v)), attn.o, qkv_bias, attn.o_bias)


# Prefill queries per block in attention_stacked. Smaller blocks skip more of the masked half of the scores
# (a block sees past + its last position's keys) but make more, smaller products; 64 measured fastest on 2 cores
# for SmolLM2 at 128-512 tokens. A GPU computes the masked half at little cost and pays for every launch: there,
# all queries go in one block while its scores [n_heads·T, S] have at most GPU_SCORE_ELEMENTS elements (1 GiB of
# float32: one block up to 5,461 tokens with SmolLM2's 9 heads), and in blocks of that size beyond.
QUERY_BLOCK = 64
GPU_SCORE_ELEMENTS = 1 << 28


def query_block(xp, n_heads: int, T: int, S: int) -> int:
    """Queries per block for T queries against up to S keys, on the device of module xp."""
    if xp is np:
        return QUERY_BLOCK
    return max(1, min(T, GPU_SCORE_ELEMENTS // (n_heads * S)))


def attention_stacked(attn: StackedAttention, x, config: Config, cos, sin, cache: KVCache | None = None,
                      layer: int = 0):
    """`attention` with its arithmetic arranged for speed; x [T, d] -> [T, d].

    - q, k and v in one product x W_qkv^T, RoPE on q and k in one call;
    - 1/sqrt(head_dim) applied to q (T·head_dim numbers) instead of the scores (T·S): exact when it is a power
      of two, as for head_dim 64;
    - the query heads that share a kv head as the rows of one product per kv head, [group·T, hd] @ [hd, S],
      instead of one product per query head;
    - queries in blocks of QUERY_BLOCK, each against only the keys it may see: the masked half of the causal
      scores is never computed, and only a block's last QUERY_BLOCK keys need the mask.

    On a GPU: attention_in_few_kernels.
    """
    xp = array_module(x)
    if xp is not np:
        return attention_in_few_kernels(attn, x, config, cos, sin, cache, layer)
    T, hd = x.shape[0], config.head_dim
    n_heads = attn.o.shape[1] // hd
    n_kv = (attn.qkv.shape[0] // hd - n_heads) // 2
    group = n_heads // n_kv
    heads = linear(x, attn.qkv, attn.qkv_bias).reshape(T, -1, hd)   # [T, d] -> [T, n_heads + 2 n_kv, hd]
    rotated = apply_rope(heads[:, :n_heads + n_kv], cos[:, None], sin[:, None])  # q and k: [T, n_heads + n_kv, hd]
    q = rotated[:, :n_heads]
    q *= 1 / math.sqrt(hd)
    k, v = rotated[:, n_heads:].transpose(1, 0, 2), heads[:, n_heads + n_kv:].transpose(1, 0, 2)  # [n_kv, T, hd]
    past = 0
    if cache is not None:
        past = cache.length
        k, v = cache.append(layer, k, v)                             # -> [n_kv, S, hd], S = past + T
    # query head h reads kv head h // group: [T, n_heads, hd] -> [n_kv, T, group, hd], rows (t, g) per kv head
    q = xp.ascontiguousarray(q.reshape(T, n_kv, group, hd).transpose(1, 0, 2, 3))
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, T)
        B, seen = stop - start, past + stop                          # keys up to the block's last query
        scores = q[:, start:stop].reshape(n_kv, B * group, hd) @ k[:, :seen].transpose(0, 2, 1)  # [n_kv, B·group, seen]
        if B > 1:  # query t of the block may not see the block's keys after its own
            future = xp.triu(xp.full((B, B), -xp.inf, x.dtype), 1)[:, None]              # [B, 1, B]
            scores.reshape(n_kv, B, group, seen)[..., seen - B:] += future
        scores -= scores.max(axis=-1, keepdims=True)                 # softmax, normalised after the product:
        xp.exp(scores, out=scores)                                   # T·hd divisions instead of T·S
        out = scores @ v[:, :seen]
        out /= scores.sum(axis=-1, keepdims=True)
        blocks.append(out.reshape(n_kv, B, group, hd))
    out = blocks[0] if len(blocks) == 1 else xp.concatenate(blocks, axis=1)             # [n_kv, T, group, hd]
    return linear(out.transpose(1, 0, 2, 3).reshape(T, n_heads * hd), attn.o, attn.o_bias)  # -> [T, d]


_MASKS: dict = {}  # the last causal mask made, reused by every attention block of a forward pass


def causal_mask(xp, first: int, B: int, seen: int, dtype):
    """0 where query first + b may see key j (j <= first + b), else -inf: [B, 1, seen], broadcast over the heads."""
    key = (first, B, seen, np.dtype(dtype).str, xp.__name__, xp.cuda.runtime.getDevice())
    if key not in _MASKS:
        _MASKS.clear()
        future = xp.arange(seen) > xp.arange(first, first + B)[:, None]            # [B, seen]
        _MASKS[key] = xp.where(future, -xp.inf, 0).astype(dtype)[:, None]
    return _MASKS[key]


def attention_in_few_kernels(attn: StackedAttention, x, config: Config, cos, sin, cache: KVCache | None = None,
                             layer: int = 0):
    """`attention` on a GPU, in few kernel launches; x [T, d] -> [T, d]. attention_stacked's arrangement, and:

    - RoPE on q (with its 1/sqrt(head_dim)) in one kernel that writes q grouped by kv head, and RoPE on k in one
      kernel that writes k, and v beside it, straight into the KV cache's rows;
    - the softmax in three kernels (max, Σ exp, exp / Σ), the causal mask read inside them;
    - all queries of a prefill in one block (query_block), so one product per kv head makes every score.

    9 launches in a decode step (qkv, 2 RoPE, scores, 3 softmax, ·v, o), one more for the output's transposition
    in a prefill; tests/core/test_gpu_kernels.py counts them.
    """
    xp = array_module(x)
    fused, halves = gpu_kernels.kernels(xp), gpu_kernels.halves
    T, hd = x.shape[0], config.head_dim
    n_heads = attn.o.shape[1] // hd
    n_kv = (attn.qkv.shape[0] // hd - n_heads) // 2
    group = n_heads // n_kv
    heads = linear(x, attn.qkv, attn.qkv_bias).reshape(T, -1, hd)   # [T, d] -> [T, n_heads + 2 n_kv, hd]
    cos_half, sin_half = halves(cos)[0], halves(sin)[0]              # [T, hd/2]: the second halves repeat them
    # q, rotated and scaled, grouped by the kv head it reads: [n_kv, T, group, hd], written as [T, n_kv, group, hd]
    q = xp.empty((n_kv, T, group, hd), x.dtype)
    fused.rotated(*halves(heads[:, :n_heads].reshape(T, n_kv, group, hd)),
                  cos_half[:, None, None], sin_half[:, None, None], 1 / math.sqrt(hd), *halves(q.transpose(1, 0, 2, 3)))
    past = 0
    if cache is None:
        key_rows, value_rows = xp.empty((n_kv, T, hd), x.dtype), xp.empty((n_kv, T, hd), x.dtype)
    else:
        past = cache.length
        key_rows, value_rows = cache.rows(layer, T)                  # [n_kv, T, hd] each, views of the cache
    fused.rotated_kv(*halves(heads[:, n_heads:n_heads + n_kv]), *halves(heads[:, n_heads + n_kv:]),  # k, v
                     cos_half[:, None], sin_half[:, None],
                     *halves(key_rows.transpose(1, 0, 2)), *halves(value_rows.transpose(1, 0, 2)))
    if cache is None:
        k, v = key_rows, value_rows
    else:
        k, v = cache.keys[layer][:, :past + T], cache.values[layer][:, :past + T]       # [n_kv, S, hd]
    block = query_block(xp, n_heads, T, past + T)
    blocks = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        B, seen = stop - start, past + stop                          # keys up to the block's last query
        scores = q[:, start:stop].reshape(n_kv, B * group, hd) @ k[:, :seen].transpose(0, 2, 1)  # [n_kv, B·group, S]
        mask = causal_mask(xp, past + start, B, seen, x.dtype) if B > 1 else None                # [B, 1, seen]
        gpu_kernels.softmax_(scores.reshape(n_kv, B, group, seen), mask)
        blocks.append((scores @ v[:, :seen]).reshape(n_kv, B, group, hd))
    out = blocks[0] if len(blocks) == 1 else xp.concatenate(blocks, axis=1)             # [n_kv, T, group, hd]
    return linear(out.transpose(1, 0, 2, 3).reshape(T, n_heads * hd), attn.o, attn.o_bias)  # -> [T, d]


def rms_norm_in_two_kernels(x, gain, eps):
    """`rms_norm`; on a GPU in two kernels (reffuse.core.gpu_kernels.rms_norm) instead of six."""
    if array_module(x) is np:
        return rms_norm(x, gain, eps)
    return gpu_kernels.rms_norm(x, gain, eps)


# ---------------------------------------------------------------------------------------------------------------
# The FFN


# On a CPU, the hidden activations [T, dh] of a wide FFN (a fused run has dh = Σ dh_k) outgrow the cache when
# there are many tokens, and every elementwise step (silu, ⊙) then streams them through main memory: a fused
# run became slower than its blocks one by one. Above HIDDEN_ELEMENTS_IN_CACHE elements (4 MiB of float32; one
# SmolLM2 FFN reaches it at 683 tokens) swiglu_in_cache works in column blocks of HIDDEN_BLOCK_ELEMENTS (1 MiB):
# the sizes that measured fastest on 2 cores, for fused runs and for single FFNs alike.
HIDDEN_ELEMENTS_IN_CACHE = 1 << 20
HIDDEN_BLOCK_ELEMENTS = 1 << 18


def swiglu_in_cache(ffn: FFN, x):
    """`swiglu`, or on the CPU, once the hidden activations outgrow the cache, the same sum in column blocks; on a
    GPU, with silu(gate) ⊙ up in one kernel.

    gate and up read the same x, so they could be one product, as q, k and v are; stacked they were not faster
    (benchmarks/results/profile_smollm2*/profile.md, "Stacking"): two products of that size already stream at the
    machine's rate, so the FFN keeps two."""
    xp = array_module(x)
    if xp is not np:  # a GPU: silu(gate) ⊙ up in one kernel instead of five
        hidden = gpu_kernels.kernels(xp).silu_times(x @ ffn.gate.T, x @ ffn.up.T)  # [T, d] -> [T, dh]
        return hidden @ ffn.down.T                                                 # [T, dh] -> [T, d]
    if x.shape[0] * ffn.width > HIDDEN_ELEMENTS_IN_CACHE:
        return swiglu_in_column_blocks(ffn, x, HIDDEN_BLOCK_ELEMENTS)
    return swiglu(ffn, x)


def swiglu_in_column_blocks(ffn: FFN, x, block_elements: int):
    """swiglu summed over blocks b of hidden units: FFN(x) = Σ_b (silu(x W_gate[b]^T) ⊙ x W_up[b]^T) W_down[:, b]^T.

    Equal to swiglu up to rounding, because each hidden unit acts on its own (the fact behind Theorem 3.1, used
    the other way round). Each [T, block] intermediate has at most `block_elements` elements.
    """
    xp = array_module(x)
    n_blocks = -(-x.shape[0] * ffn.width // block_elements)  # ceil: blocks of equal width
    block = -(-ffn.width // n_blocks)
    out = xp.zeros((x.shape[0], ffn.down.shape[0]), dtype=x.dtype)
    for start in range(0, ffn.width, block):
        cols = slice(start, start + block)
        hidden = silu(x @ ffn.gate[cols].T)                          # [T, d] -> [T, block]
        hidden *= x @ ffn.up[cols].T
        out += hidden @ ffn.down[:, cols].T                          # [T, block] -> [T, d]
    return out


# ---------------------------------------------------------------------------------------------------------------
# RoPE tables


_ROPE_TABLES: dict = {}


def rope_rows(positions, head_dim: int, theta: float, dtype, xp=np, scaling=None):
    """rope_tables' rows for `positions`, cut from tables made once per (head_dim, theta, scaling, dtype, device)
    and remade twice as long when a later position is asked for. The same numbers: each row is computed on its own."""
    positions = np.asarray(positions, dtype=np.int64)
    device = None if xp is np else xp.cuda.runtime.getDevice()
    key = (head_dim, float(theta), scaling, np.dtype(dtype).str, xp.__name__, device)
    need = int(positions.max()) + 1 if positions.size else 0
    tables = _ROPE_TABLES.get(key)
    if tables is None or tables[0].shape[0] < need:
        length = max(need, 2 * tables[0].shape[0] if tables is not None else 1024)
        tables = _ROPE_TABLES[key] = rope_tables(np.arange(length), head_dim, theta, dtype, xp, scaling)
    cos, sin = tables
    if positions.size and (positions == positions[0] + np.arange(positions.size)).all():
        rows = slice(int(positions[0]), int(positions[0]) + positions.size)
    else:
        rows = xp.asarray(positions)
    return cos[rows], sin[rows]


# ---------------------------------------------------------------------------------------------------------------
# The weights, and the kernels


def with_stacked_attention(model: Model) -> Model:
    """The model with every attention a StackedAttention, as attention_stacked reads it."""
    blocks = [dataclasses.replace(b, attention=stacked(b.attention) if has_heads(b.attention) else b.attention)
              for b in model.blocks]
    return dataclasses.replace(model, blocks=blocks)


# Alignment of each weight in `gathered`'s arena: a cache line, where BLAS kernels like their operands to start.
ARENA_ALIGNMENT = 64


def gathered(model: Model) -> Model:
    """The same model with every weight copied into one allocation, each a view of it, 64-byte aligned. The same
    numbers, shapes and orientation.

    Why: NumPy asks Linux for huge pages (2 MiB) for allocations of 4 MiB or more, and the arena is one such; the
    weights as loaded are smaller arrays, or buffers NumPy did not allocate, on 4 KiB pages. A decode step reads
    every weight once, and with huge pages it needs 512 times fewer address translations to do so. How much that
    buys depends on whether the separate arrays happen to sit on huge pages, which the allocator decides.
    On a GPU the model is returned as it is.
    """
    if array_module(model.embed) is not np:
        return model
    arrays = [model.embed, model.norm_gain, model.lm_head] + [a for b in model.blocks for p in (b.attention, b.ffn)
                                                              if p is not None for a in weights_of(p).values()]
    arena = np.empty(sum(a.nbytes + ARENA_ALIGNMENT for a in arrays) + ARENA_ALIGNMENT, np.uint8)
    cursor = 0  # where the next weight goes: an offset into the arena

    def place(weight):
        """A copy of `weight` in the arena, starting aligned."""
        nonlocal cursor
        cursor += -(arena.ctypes.data + cursor) % ARENA_ALIGNMENT
        view = arena[cursor:cursor + weight.nbytes].view(weight.dtype).reshape(weight.shape)
        view[...] = weight
        cursor += weight.nbytes
        return view

    return map_arrays(model, place)


FAST = Kernels("fast", attention_stacked, swiglu_in_cache, rope_rows, with_stacked_attention, rms_norm_in_two_kernels)


def for_speed(model: Model) -> Model:
    """The model on FAST: q, k and v stacked and, on the CPU, every weight in one arena. The same numbers."""
    return gathered(FAST.arrange(dataclasses.replace(model, kernels=FAST)))
