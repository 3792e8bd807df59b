"""A Llama-style decoder in NumPy, written against the paper's equations (§2, eq. 1-5).

    X ∈ R^{T×d}                                     T tokens, model width d
    g(X) = X + Attn(η1(X))                           eq. 1, the attention sub-block
    f(X) = g(X) + FFN(η2(g(X)))                      eq. 2, the FFN sub-block
    FFN(X) = (silu(X W_gate^T) ⊙ X W_up^T) W_down^T   eq. 3, SwiGLU (the paper's W2, W1, W3)
    f(X) = X + FFN(η2(X))                            eq. 4, a block whose attention was removed
    f_[i,j](X) = X + Σ_k FFN_k(η2^k(X))              eq. 5, a run of attention-free blocks in parallel

Layout conventions, named because every port of Llama weights trips over one of them:
- Weights are stored (out_features, in_features) as in PyTorch and HF, so a projection is `x @ W.T`.
- RoPE is HF's rotate-half convention: dimension i of a head rotates with dimension i + head_dim/2.
  GGUF files (llama.cpp) rotate interleaved pairs (2i, 2i+1) and permute the q/k rows to match; the GGUF
  loader undoes that permutation.
- RMSNorm is x / sqrt(mean(x²) + eps) ⊙ gain, as in HF. The paper writes x/||x|| ⊙ s: the same up to a
  factor sqrt(d), which lives in the gain.
- Grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads), as HF's repeat_kv.
- An attention's q, k and v, which read the same input, are views of one array qkv [(n_heads + 2 n_kv) hd, d],
  so that one product reads all three; each view keeps HF's meaning and orientation.

The forward pass below is the plain one, written as the equations are. Where a faster arrangement of the same
arithmetic exists (one product where two read the same input, skipped masked work, tables made once), it lives in
"Fast paths" at the end of this module, is tested equal to the plain function it replaces, and `fast_paths(False)`
(or REFFUSE_PLAIN=1) switches every one of them off, to read or debug the plain path.
"""

from __future__ import annotations

import dataclasses
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from reffuse.core import layout as layouts
from reffuse.core.backend import array_module, to_device as _array_to_device
from reffuse.core.layout import BlockLayout, Layout
from reffuse.errors import ReffuseError


# ---------------------------------------------------------------------------------------------------------------
# Configuration and weights


@dataclass(frozen=True)
class Config:
    """What the weights do not say by their shapes."""
    vocab_size: int
    dim: int                    # d, the width of the residual stream
    n_heads: int                # query heads
    n_kv_heads: int             # key/value heads (grouped-query attention when fewer than n_heads)
    head_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the LM head reuses the token embedding
    name: str = "model"
    max_positions: int | None = None  # the context length it was trained for (None: not recorded)


def check_config(config: Config, source: str) -> Config:
    """Refuse a config that would build a model that fails later or computes something else, naming the key."""
    problems = []
    for key in ("vocab_size", "dim", "n_heads", "n_kv_heads", "head_dim"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            problems.append(f"{key} must be a positive integer, got {value!r}")
    if not problems and config.n_heads % config.n_kv_heads:
        problems.append(f"n_kv_heads {config.n_kv_heads} does not divide n_heads {config.n_heads}")
    for key in ("norm_eps", "rope_theta"):
        value = getattr(config, key)
        if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
            problems.append(f"{key} must be a finite number > 0, got {value!r}")
    if not isinstance(config.tie_embeddings, (bool, np.bool_)):
        problems.append(f"tie_embeddings must be true or false, got {config.tie_embeddings!r}")
    if config.max_positions is not None and (isinstance(config.max_positions, bool) or config.max_positions < 1):
        problems.append(f"max_positions must be a positive integer, got {config.max_positions!r}")
    if problems:
        raise ReffuseError(f"{source}: " + "; ".join(problems))
    return config


def _stacked(part, names: tuple[str, ...], stacked_name: str) -> None:
    """Store the (out, in) weights `names` of a frozen dataclass as row blocks of one new array `stacked_name`,
    each field becoming a view of its block: the same values, shapes and orientation, read in one pass."""
    arrays = [getattr(part, name) for name in names]
    widths = {a.shape[1] if a.ndim == 2 else None for a in arrays}
    if len(widths) != 1 or None in widths or len({a.dtype for a in arrays}) != 1:
        shapes = ", ".join(f"{name} {tuple(a.shape)} {a.dtype}" for name, a in zip(names, arrays))
        raise ReffuseError(f"{type(part).__name__} weights {shapes}: they must be 2-D with the same input width "
                           "and dtype")
    stacked = _adjacent(arrays)
    if stacked is None:
        stacked = array_module(arrays[0]).concatenate(arrays)
    object.__setattr__(part, stacked_name, stacked)
    start = 0
    for name, a in zip(names, arrays):
        object.__setattr__(part, name, stacked[start:start + a.shape[0]])
        start += a.shape[0]


def _adjacent(arrays):
    """The arrays as one [rows, width] view where they already are consecutive row blocks of one contiguous NumPy
    buffer (as `gathered` places q, k and v), else None."""
    base = arrays[0].base if isinstance(arrays[0], np.ndarray) else None
    if (not isinstance(base, np.ndarray) or not base.flags.c_contiguous
            or not all(a.base is base and a.flags.c_contiguous for a in arrays)):
        return None
    starts = [a.ctypes.data for a in arrays]
    if any(start + a.nbytes != following for start, a, following in zip(starts, arrays, starts[1:])):
        return None
    return np.ndarray((sum(a.shape[0] for a in arrays), arrays[0].shape[1]), arrays[0].dtype, buffer=base,
                      offset=starts[0] - base.ctypes.data)


@dataclass(frozen=True)
class Attention:
    norm_gain: np.ndarray  # [d]             η1's gain (HF input_layernorm)
    q: np.ndarray          # [n_heads*head_dim, d]
    k: np.ndarray          # [n_kv_heads*head_dim, d]
    v: np.ndarray          # [n_kv_heads*head_dim, d]
    o: np.ndarray          # [d, n_heads*head_dim]

    def __post_init__(self):
        _stacked(self, ("q", "k", "v"), "qkv")  # self.qkv [(n_heads + 2 n_kv_heads) head_dim, d]


@dataclass
class FFN:
    norm_gain: np.ndarray  # [d]      η2's gain (HF post_attention_layernorm)
    gate: np.ndarray       # [dh, d]  the paper's W2 (HF gate_proj)
    up: np.ndarray         # [dh, d]  the paper's W1 (HF up_proj)
    down: np.ndarray       # [d, dh]  the paper's W3 (HF down_proj)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


@dataclass
class Block:
    """One transformer block; either sub-block may be absent (DeciLM's `no_op`)."""
    attention: Attention | None
    ffn: FFN | None
    fused_from: tuple[int, ...] = ()  # a fused block: the layers (numbered as in the unfused model) it replaces


@dataclass
class Model:
    config: Config
    embed: np.ndarray      # [vocab, d]
    blocks: list[Block]
    norm_gain: np.ndarray  # [d]      the final RMSNorm's gain (HF model.norm)
    lm_head: np.ndarray    # [vocab, d] (the same array as `embed` when tied)

    @property
    def dtype(self):
        return self.embed.dtype

    def layout(self) -> Layout:
        """Its shapes without weights (reffuse.core.layout): attention present, FFN width, fused_from per block."""
        cfg = self.config
        blocks = tuple(BlockLayout(b.attention is not None, b.ffn.width if b.ffn is not None else 0,
                                   tuple(b.fused_from)) for b in self.blocks)
        return Layout(cfg.name, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size,
                      cfg.tie_embeddings, blocks, source="a reffuse Model's shapes")


def weights_of(part: Attention | FFN) -> dict:
    """A sub-block's weights by name (its stacked arrays hold the same numbers and are not counted again)."""
    return {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}


def map_arrays(model: Model, fn: Callable) -> Model:
    """A new model with `fn` applied to every weight array (dtype casts, device moves); ties are kept."""
    def sub(part):
        if part is None:
            return None
        return type(part)(**{name: fn(a) for name, a in weights_of(part).items()})

    embed = fn(model.embed)
    lm_head = embed if model.config.tie_embeddings else fn(model.lm_head)
    blocks = [Block(sub(b.attention), sub(b.ffn), b.fused_from) for b in model.blocks]
    return Model(model.config, embed, blocks, fn(model.norm_gain), lm_head)


def cast(model: Model, dtype) -> Model:
    """The same model in another float precision (float32 for speed, float64 as a reference)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ReffuseError(f"dtype {dtype} is not supported: use float32 or float64")
    return map_arrays(model, lambda a: a.astype(dtype, copy=False))


def to_device(model: Model, device: str) -> Model:
    """The same model with its arrays on "cpu" or "gpu[:N]"."""
    return map_arrays(model, lambda a: _array_to_device(a, device))


def layout(model: Model) -> Layout:
    """The model's layout (reffuse.core.layout): attention present, FFN width and fused_from, block by block."""
    return model.layout()


# ---------------------------------------------------------------------------------------------------------------
# The pieces of a block


def rms_norm(x, gain, eps):
    """η(x) = x / sqrt(mean(x²) + eps) ⊙ gain, per token."""
    xp = array_module(x)
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def silu(z):
    """z·σ(z) = z / (1 + e^-z). For z < -88 (float32) e^-z overflows to inf and the result is -0, as it should be."""
    xp = array_module(z)
    with np.errstate(over="ignore"):
        return z / (1 + xp.exp(-z))


def swiglu(ffn: FFN, x):
    """eq. 3: FFN(x) = (silu(x W_gate^T) ⊙ x W_up^T) W_down^T."""
    hidden = silu(x @ ffn.gate.T) * (x @ ffn.up.T)  # [T, d] -> [T, dh]
    return hidden @ ffn.down.T                       # [T, dh] -> [T, d]


def ffn_output(ffn: FFN, x):
    """eq. 3 as the forward pass computes it: swiglu, or on the CPU, once the hidden activations outgrow the
    cache, the same sum in column blocks (below), a fast path. The one place where that choice is made.

    gate and up read the same x, so they could be one product, as q, k and v are (attention_stacked): the
    stacking of Theorem 3.1 applied inside one FFN. Measured on SmolLM2 (benchmarks/results/profile_smollm2*, two
    runs: OpenBLAS's AVX2 and AVX-512 kernels), one stacked product took 1.02x and 1.01x the two products' time at
    one token and 1.00x and 1.03x at 512 tokens (95% intervals within 1.00-1.05), where q, k and v stacked took
    0.69x and 0.66x at one token: two products of 1536 rows already stream at the machine's rate, so the FFN keeps
    two."""
    if FAST_PATHS and x.shape[0] * ffn.width > HIDDEN_ELEMENTS_IN_CACHE and array_module(x) is np:
        return swiglu_in_column_blocks(ffn, x, HIDDEN_BLOCK_ELEMENTS)
    return swiglu(ffn, x)


# On a CPU, the hidden activations [T, dh] of a wide FFN (a fused run has dh = Σ dh_k) outgrow the cache when
# there are many tokens, and every elementwise step (silu, ⊙) then streams them through main memory: a fused
# run became slower than its blocks one by one. Above HIDDEN_ELEMENTS_IN_CACHE elements (4 MiB of float32; one
# SmolLM2 FFN reaches it at 683 tokens) ffn_output works in column blocks of HIDDEN_BLOCK_ELEMENTS (1 MiB): the sizes
# that measured fastest on 2 cores, for fused runs and for single FFNs alike.
HIDDEN_ELEMENTS_IN_CACHE = 1 << 20
HIDDEN_BLOCK_ELEMENTS = 1 << 18


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


def rope_tables(positions, head_dim: int, theta: float, dtype, xp=np):
    """cos and sin [T, head_dim] for rotate-half RoPE: angle(pos, i) = pos · theta^(-2i/head_dim), i < head_dim/2."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [head_dim/2]
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]   # [T, head_dim/2]
    angles = np.concatenate([angles, angles], axis=-1)                             # [T, head_dim]
    return xp.asarray(np.cos(angles), dtype=dtype), xp.asarray(np.sin(angles), dtype=dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (i, i + head_dim/2) of x [heads, T, head_dim] by its position's angle."""
    xp = array_module(x)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos + rotated * sin


def check_context(model: Model, positions: int) -> int:
    """Refuse more positions than the model's context length, or a KV cache for them that cannot fit in memory."""
    limit = model.config.max_positions
    if limit is not None and positions > limit:
        raise ReffuseError(f"{positions} positions (prompt and new tokens) exceed the context length of "
                           f"{model.config.name}, {limit}: shorten the prompt or ask for fewer new tokens")
    attention = sum(b.attention is not None for b in model.blocks)
    kv_bytes = 2 * attention * positions * model.config.n_kv_heads * model.config.head_dim * model.dtype.itemsize
    memory = _physical_memory()
    if memory is not None and kv_bytes > memory:
        raise ReffuseError(f"a KV cache of {positions} positions needs {kv_bytes / 2 ** 30:.1f} GiB, more than this "
                           f"machine's {memory / 2 ** 30:.1f} GiB: ask for fewer new tokens")
    return positions


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class KVCache:
    """Keys and values of the positions seen so far, one pair per attention block, preallocated.

    `forward(model, ids, cache=cache)` reads positions from `cache.length`, appends the new keys and values,
    and advances `cache.length`, so decoding one token at a time costs one new row per block.
    """

    def __init__(self, model: Model, max_tokens: int):
        xp, hd = array_module(model.embed), model.config.head_dim
        max_tokens = check_context(model, int(max_tokens))
        self.max_tokens, self.length = max_tokens, 0
        self.keys, self.values = {}, {}
        for i, block in enumerate(model.blocks):
            if block.attention is not None:
                n_kv = block.attention.k.shape[0] // hd  # a tensor-parallel shard holds fewer heads
                self.keys[i] = xp.zeros((n_kv, max_tokens, hd), dtype=model.dtype)
                self.values[i] = xp.zeros((n_kv, max_tokens, hd), dtype=model.dtype)

    def check(self, model: Model) -> None:
        """Refuse a cache that was made for a model of another structure."""
        hd = model.config.head_dim
        wanted = {i: (b.attention.k.shape[0] // hd, hd) for i, b in enumerate(model.blocks) if b.attention is not None}
        held = {i: (k.shape[0], k.shape[2]) for i, k in self.keys.items()}
        if wanted != held or any(k.dtype != model.dtype for k in self.keys.values()):
            raise ReffuseError(f"this KV cache was made for another model ({len(held)} attention blocks, not the "
                               f"{len(wanted)} of {model.config.name}, or other heads or dtype): make one with "
                               "KVCache(model, max_tokens)")

    def append(self, layer: int, k, v):
        """Store k, v [n_kv, T, hd] after the cached positions; return all keys and values so far [n_kv, S, hd]."""
        end = self.length + k.shape[1]
        if end > self.max_tokens:
            raise ReffuseError(f"KV cache holds {self.max_tokens} positions; {end} were asked for: "
                               "create the cache with a larger max_tokens")
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


def softmax_(scores):
    """softmax over the last axis, in place: the scores are attention's largest array, so no temporaries of
    their size are made (the trailing _ says the argument is overwritten)."""
    xp = array_module(scores)
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def attention(attn: Attention, x, config: Config, cos, sin, cache: KVCache | None = None, layer: int = 0):
    """Causal grouped-query self-attention with RoPE. x [T, d] (already normalised) -> [T, d]."""
    xp = array_module(x)
    T, hd = x.shape[0], config.head_dim
    q = (x @ attn.q.T).reshape(T, -1, hd).transpose(1, 0, 2)  # [T, d] -> [n_heads, T, hd]
    k = (x @ attn.k.T).reshape(T, -1, hd).transpose(1, 0, 2)  # [T, d] -> [n_kv, T, hd]
    v = (x @ attn.v.T).reshape(T, -1, hd).transpose(1, 0, 2)  # [T, d] -> [n_kv, T, hd]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    past = 0
    if cache is not None:
        past = cache.length
        k, v = cache.append(layer, k, v)                        # -> [n_kv, S, hd], S = past + T
    n_heads, n_kv, S = q.shape[0], k.shape[0], k.shape[1]
    q = q.reshape(n_kv, n_heads // n_kv, T, hd)                # query heads grouped by the kv head they read
    scores = q @ k[:, None].transpose(0, 1, 3, 2)              # -> [n_kv, group, T, S]
    scores /= math.sqrt(hd)
    if T > 1:  # one new token (decoding) sees every key; otherwise hide each query's future keys
        future = xp.arange(S)[None, :] > (past + xp.arange(T))[:, None]  # [T, S], True where a key is in the future
        scores += xp.where(future, -xp.inf, 0).astype(scores.dtype)
    probs = softmax_(scores)                                   # over keys
    out = (probs @ v[:, None]).reshape(n_heads, T, hd)         # -> [n_heads, T, hd]
    return out.transpose(1, 0, 2).reshape(T, n_heads * hd) @ attn.o.T  # -> [T, d]


# ---------------------------------------------------------------------------------------------------------------
# Blocks, runs and the whole model


def _identity(x):
    return x


def lm_logits(model: Model, x):
    """The final RMSNorm and the LM head: the stream x [T, d] leaving the last block -> next-token logits [T, vocab]."""
    x = rms_norm(x, model.norm_gain, model.config.norm_eps)
    return x @ model.lm_head.T                                            # [T, d] -> [T, vocab]


def block_forward(model: Model, layer: int, x, cos, sin, cache: KVCache | None = None,
                  allreduce: Callable = _identity, mids: list | None = None):
    """One block, eq. 1-2 (eq. 4 when its attention is absent). x [T, d] -> [T, d].

    `allreduce` is applied to each row-parallel output (o_proj, down_proj) before it joins the residual stream:
    the identity in one process, a sum over ranks under tensor parallelism (reffuse.tp).
    mids: if a list, the stream between the two sub-blocks (after attention) is appended to it.
    """
    block, eps = model.blocks[layer], model.config.norm_eps
    if block.attention is not None:
        x = x + allreduce(attention_output(block.attention, rms_norm(x, block.attention.norm_gain, eps),
                                           model.config, cos, sin, cache, layer))             # eq. 1
    if mids is not None:
        mids.append(x)
    if block.ffn is not None:
        x = x + allreduce(ffn_output(block.ffn, rms_norm(x, block.ffn.norm_gain, eps)))     # eq. 2 / eq. 4
    return x


def parallel_forward(model: Model, first: int, last: int, x, cos, sin, allreduce: Callable = _identity):
    """Blocks first..last all reading the same x [T, d] -> [T, d].

    Attention-free blocks: eq. 5 with every block's own norm, x + Σ_k FFN_k(η2^k(x)); all FFNs read the same x,
    so one all-reduce. Whole blocks (a run with attention, the paper's App. B): x + Σ_k (f_k(x) - x), eq. 5's
    analogue for blocks, which the paper does not write down [inferred].
    """
    blocks = model.blocks[first:last + 1]
    if all(b.attention is None for b in blocks):
        eps = model.config.norm_eps
        update = sum(ffn_output(b.ffn, rms_norm(x, b.ffn.norm_gain, eps)) for b in blocks)   # eq. 5
        return x + allreduce(update)
    return x + sum(block_forward(model, k, x, cos, sin, allreduce=allreduce) - x for k in range(first, last + 1))


def run_blocks(model: Model, x, cos=None, sin=None, start: int = 0, stop: int | None = None, parallel=(),
               cache: KVCache | None = None, allreduce: Callable = _identity, streams: list | None = None,
               mids: list | None = None, whole_blocks: bool = False):
    """Blocks start..stop-1 on the stream x [T, d] entering block `start`; the stream leaving block stop-1, [T, d].

    The one walk over blocks that every forward pass, partial run and measurement uses.
    cos, sin: the RoPE tables of x's positions (None where no block with attention runs).
    parallel: runs (first, last) inside start..stop-1 computed in the parallel form (parallel_forward): runs of
        attention-free blocks, or of whole blocks when whole_blocks is True.
    cache: positions continue from cache.length (the caller advances it once the pass is done).
    streams: if a list, the stream after every step is appended (a parallel run is one step).
    mids: if a list, each block's stream after its attention sub-block is appended (blocks run one by one only).
    """
    stop = len(model.blocks) if stop is None else stop
    runs = layouts.check_runs(len(model.blocks), parallel) if whole_blocks else layouts.check_groups(model, parallel)
    if any(first < start or last >= stop for first, last in runs):
        raise ReffuseError(f"parallel runs {runs} must lie inside blocks {start}..{stop - 1}")
    for first, last in layouts.steps(stop, runs):
        if last < start:
            continue
        if first == last:
            x = block_forward(model, first, x, cos, sin, cache, allreduce, mids)                 # eq. 1-4
        else:
            x = parallel_forward(model, first, last, x, cos, sin, allreduce)                     # eq. 5
        if streams is not None:
            streams.append(x)
    return x


def check_token_ids(model: Model, token_ids) -> np.ndarray:
    """A 1-D int64 array of ids, each in [0, vocab)."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ReffuseError(f"token ids must be a non-empty 1-D sequence, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ReffuseError(f"token ids must be integers, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= model.config.vocab_size))
    if bad.size:
        raise ReffuseError(f"token id {int(ids[bad[0]])} at position {int(bad[0])} is out of range for the "
                           f"vocabulary of {model.config.vocab_size} ({bad.size} such ids)")
    return ids.astype(np.int64)


def rope_for(model: Model, positions, xp=np):
    """RoPE tables cos, sin [T, head_dim] of the model's heads at `positions`, in its dtype, on xp's device."""
    cfg = model.config
    if FAST_PATHS:
        return rope_rows(positions, cfg.head_dim, cfg.rope_theta, model.dtype, xp)
    return rope_tables(positions, cfg.head_dim, cfg.rope_theta, model.dtype, xp)


def forward(model: Model, token_ids: Sequence[int], parallel_groups=None, cache: KVCache | None = None,
            allreduce: Callable = _identity, hidden_states: list | None = None):
    """Next-token logits [T, vocab] for token_ids [T].

    parallel_groups: runs (first, last) of attention-free blocks computed in the parallel form, eq. 5.
    cache: positions continue from cache.length, and the cache is extended by T.
    hidden_states: if a list is given, the residual stream is appended to it after the embedding and after
        every block (after every parallel run as a whole): 1 + number of steps arrays [T, d].
    """
    ids = check_token_ids(model, token_ids)
    xp = array_module(model.embed)
    if cache is not None:
        cache.check(model)
    start = cache.length if cache is not None else 0
    cos, sin = rope_for(model, start + np.arange(len(ids)), xp)

    x = model.embed[xp.asarray(ids)]                                      # [T] -> [T, d]
    if hidden_states is not None:
        hidden_states.append(x)
    x = run_blocks(model, x, cos, sin, parallel=parallel_groups or (), cache=cache, allreduce=allreduce,
                   streams=hidden_states)                                 # [T, d] -> [T, d], eq. 1-5
    if cache is not None:
        cache.length += len(ids)
    return lm_logits(model, x)                                            # [T, d] -> [T, vocab]


# ---------------------------------------------------------------------------------------------------------------
# Fast paths: the same arithmetic, arranged for speed. Each is tested equal to the plain function it replaces
# (tests/core/test_fast_paths.py): bit for bit where the operations are the same, within float32 rounding where
# a sum runs over fewer zeros or in another order. ffn_output (column blocks, above), attention_output and
# rope_for choose; the rest of the model does not know.

FAST_PATHS = os.environ.get("REFFUSE_PLAIN") != "1"


@contextmanager
def fast_paths(enabled: bool = True):
    """Within the `with` block, the fast paths on, or off (False: the plain functions only, to read or debug them)."""
    global FAST_PATHS
    before, FAST_PATHS = FAST_PATHS, bool(enabled)
    try:
        yield
    finally:
        FAST_PATHS = before


def attention_output(attn: Attention, x, config: Config, cos, sin, cache: KVCache | None = None, layer: int = 0):
    """Attention as the forward pass computes it: `attention`, or its fast path. The one place that chooses."""
    if FAST_PATHS:
        return attention_stacked(attn, x, config, cos, sin, cache, layer)
    return attention(attn, x, config, cos, sin, cache, layer)


# Prefill queries per block in attention_stacked. Smaller blocks skip more of the masked half of the scores
# (a block sees past + its last position's keys) but make more, smaller products; 64 measured fastest on 2 cores
# for SmolLM2 at 128-512 tokens.
QUERY_BLOCK = 64


def attention_stacked(attn: Attention, x, config: Config, cos, sin, cache: KVCache | None = None, layer: int = 0):
    """`attention` with its arithmetic arranged for speed; x [T, d] -> [T, d].

    - q, k and v in one product x W_qkv^T (their weights are one array, attn.qkv), RoPE on q and k in one call;
    - 1/sqrt(head_dim) applied to q (T·head_dim numbers) instead of the scores (T·S): exact when it is a power
      of two, as for head_dim 64;
    - the query heads that share a kv head as the rows of one product per kv head, [group·T, hd] @ [hd, S],
      instead of one product per query head;
    - queries in blocks of QUERY_BLOCK, each against only the keys it may see: the masked half of the causal
      scores is never computed, and only a block's last QUERY_BLOCK keys need the mask.
    """
    xp = array_module(x)
    T, hd = x.shape[0], config.head_dim
    n_heads, n_kv = attn.q.shape[0] // hd, attn.k.shape[0] // hd
    group = n_heads // n_kv
    heads = (x @ attn.qkv.T).reshape(T, -1, hd)                      # [T, d] -> [T, n_heads + 2 n_kv, hd]
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
    return out.transpose(1, 0, 2, 3).reshape(T, n_heads * hd) @ attn.o.T                # -> [T, d]


# Alignment of each weight in `gathered`'s arena: a cache line, where BLAS kernels like their operands to start.
ARENA_ALIGNMENT = 64


def gathered(model: Model) -> Model:
    """The same model with every weight copied into one allocation, each a view of it, 64-byte aligned; q, k and v
    adjacent, so that qkv is a view of them too. The same numbers, shapes and orientation.

    Why: NumPy asks Linux for huge pages (2 MiB) for allocations of 4 MiB or more, and the arena is one such; the
    weights as loaded are smaller arrays, or buffers NumPy did not allocate, on 4 KiB pages. A decode step reads
    every weight once, and with huge pages it needs 512 times fewer address translations to do so: on SmolLM2 a
    decode step took 0.93x (95% interval 0.91-0.96) and 0.91x (0.89-0.93) the time of the same weights as
    separate arrays in two runs (benchmarks/results/profile_smollm2*): how much depends on whether the separate
    arrays happen to sit on huge pages, which the allocator decides.
    On a GPU the model is returned as it is.
    """
    if array_module(model.embed) is not np:
        return model
    parts = [b.attention for b in model.blocks] + [b.ffn for b in model.blocks]
    arrays = [model.embed, model.norm_gain, model.lm_head] + [a for p in parts if p is not None
                                                              for a in weights_of(p).values()]
    arena = np.empty(sum(a.nbytes + ARENA_ALIGNMENT for a in arrays) + ARENA_ALIGNMENT, np.uint8)
    cursor = 0  # where the next weight goes: an offset into the arena

    def place(*weights):
        """Copies of `weights` side by side in the arena, the next weight starting aligned after them."""
        nonlocal cursor
        cursor += -(arena.ctypes.data + cursor) % ARENA_ALIGNMENT
        views = []
        for w in weights:
            view = arena[cursor:cursor + w.nbytes].view(w.dtype).reshape(w.shape)
            view[...] = w
            views.append(view)
            cursor += w.nbytes
        return views

    blocks = []
    for b in model.blocks:
        attn, ffn = b.attention, b.ffn
        if attn is not None:
            attn = Attention(*place(attn.norm_gain), *place(attn.q, attn.k, attn.v), *place(attn.o))
        if ffn is not None:
            ffn = FFN(*place(ffn.norm_gain), *place(ffn.gate), *place(ffn.up), *place(ffn.down))
        blocks.append(Block(attn, ffn, b.fused_from))
    embed, = place(model.embed)
    lm_head = embed if model.config.tie_embeddings else place(model.lm_head)[0]
    return Model(model.config, embed, blocks, *place(model.norm_gain), lm_head)


_ROPE_TABLES: dict = {}


def rope_rows(positions, head_dim: int, theta: float, dtype, xp=np):
    """rope_tables' rows for `positions`, cut from tables made once per (head_dim, theta, dtype, device) and
    remade twice as long when a later position is asked for. The same numbers: each row is computed on its own."""
    positions = np.asarray(positions, dtype=np.int64)
    device = None if xp is np else xp.cuda.runtime.getDevice()
    key = (head_dim, float(theta), np.dtype(dtype).str, xp.__name__, device)
    need = int(positions.max()) + 1 if positions.size else 0
    tables = _ROPE_TABLES.get(key)
    if tables is None or tables[0].shape[0] < need:
        length = max(need, 2 * tables[0].shape[0] if tables is not None else 1024)
        tables = _ROPE_TABLES[key] = rope_tables(np.arange(length), head_dim, theta, dtype, xp)
    cos, sin = tables
    if positions.size and (positions == positions[0] + np.arange(positions.size)).all():
        rows = slice(int(positions[0]), int(positions[0]) + positions.size)
    else:
        rows = xp.asarray(positions)
    return cos[rows], sin[rows]
