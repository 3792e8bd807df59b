"""A Llama-style decoder in NumPy, written against the paper's equations (§2, eq. 1-5).

    X ∈ R^{T×d}                                     T tokens, model width d
    g(X) = X + Attn(η1(X))                           eq. 1, the attention sub-block
    f(X) = g(X) + FFN(η2(g(X)))                      eq. 2, the FFN sub-block
    FFN(X) = (silu(X W_gate^T) ⊙ X W_up^T) W_down^T   eq. 3, SwiGLU (the paper's W2, W1, W3)
    f(X) = X + FFN(η2(X))                            eq. 4, a block whose attention was removed
    f_[i,j](X) = X + Σ_k FFN_k(η2^k(X))              eq. 5, a run of attention-free blocks in parallel

Layout conventions, named because every port of Llama weights trips over one of them:
- Weights are stored (out_features, in_features) as in PyTorch and HF, so a projection is `x @ W.T`.
- RoPE is HF's rotate-half convention: dimension i of a head rotates with dimension i + head_dim/2
  (reffuse.core.rope). GGUF files (llama.cpp) rotate interleaved pairs (2i, 2i+1) and permute the q/k rows to
  match; the GGUF loader undoes that permutation.
- RMSNorm is x / sqrt(mean(x²) + eps) ⊙ gain, as in HF. The paper writes x/||x|| ⊙ s: the same up to a
  factor sqrt(d), which lives in the gain.
- Grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads), as HF's repeat_kv.
  The number of key/value heads may differ from block to block (Nemotron-NAS); each block's own weights say it.
- A sub-block may be one linear map instead (Nemotron-NAS `replace_with_linear`): x + η(x) W^T, no heads, no cache.

A model computes attention, its FFNs and the RoPE tables with the functions its field `kernels` holds. The default,
PLAIN, is this module's `attention` and `swiglu` and reffuse.core.rope's `rope_tables`: `forward` on a PLAIN model
is the equations as written here, and `plain(model)` puts any model on them, to read it or step through it.
`reffuse.load_model` returns models on reffuse.core.fast.FAST: the same arithmetic arranged for speed, each kernel
tested equal to the plain function it replaces.

Beside this module: a model's Config (and RopeScaling) in reffuse.core.config; RoPE's tables and rotation in
reffuse.core.rope; the KVCache that `forward(..., cache=...)` extends, and the checks on how many positions a model
takes (check_context, check_window), in reffuse.core.kv_cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from reffuse.core import layout as layouts
from reffuse.core.backend import array_module, to_device as _array_to_device
from reffuse.core.config import Config
from reffuse.core.kv_cache import KVCache, check_window
from reffuse.core.layout import BlockLayout, Layout
from reffuse.core.rope import apply_rope, rope_tables
from reffuse.errors import ReffuseError


# ---------------------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class Attention:
    norm_gain: np.ndarray  # [d]             η1's gain (HF input_layernorm)
    q: np.ndarray          # [n_heads*head_dim, d]
    k: np.ndarray          # [n_kv_heads*head_dim, d]   n_kv_heads of this block
    v: np.ndarray          # [n_kv_heads*head_dim, d]
    o: np.ndarray          # [d, n_heads*head_dim]
    q_bias: np.ndarray | None = None  # [n_heads*head_dim]   None: no bias
    k_bias: np.ndarray | None = None  # [n_kv_heads*head_dim]
    v_bias: np.ndarray | None = None  # [n_kv_heads*head_dim]
    o_bias: np.ndarray | None = None  # [d]


@dataclass
class FFN:
    norm_gain: np.ndarray  # [d]      η2's gain (HF post_attention_layernorm)
    gate: np.ndarray       # [dh, d]  the paper's W2 (HF gate_proj)
    up: np.ndarray         # [dh, d]  the paper's W1 (HF up_proj)
    down: np.ndarray       # [d, dh]  the paper's W3 (HF down_proj)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


@dataclass(frozen=True)
class Linear:
    """A sub-block replaced by one linear map, as Puzzle does (Nemotron-NAS `replace_with_linear`), in place of
    attention or of the FFN: x + η(x) W^T. It mixes no positions: no heads, no RoPE, no KV cache."""
    norm_gain: np.ndarray  # [d]
    weight: np.ndarray     # [d, d]; a tensor-parallel shard holds [d, d/N], the input features from first_input
    first_input: int = 0   # the first input feature `weight`'s columns read (row-parallel sharding)


@dataclass
class Block:
    """One transformer block; either sub-block may be absent (DeciLM's `no_op`) or one linear map."""
    attention: Attention | Linear | None
    ffn: FFN | Linear | None
    fused_from: tuple[int, ...] = ()  # a fused block: the layers (numbered as in the unfused model) it replaces


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


def linear(x, weight, bias=None):
    """x W^T (+ b): a projection of x [T, in] by weight [out, in] -> [T, out]."""
    y = x @ weight.T
    return y if bias is None else y + bias


def linear_map(part: Linear, x):
    """A replaced sub-block's output: η(x) W^T, x [T, d] (already normalised) -> [T, d]."""
    columns = x[:, part.first_input:part.first_input + part.weight.shape[1]]  # all of x, unless sharded
    return columns @ part.weight.T


def has_heads(part) -> bool:
    """An attention sub-block with heads (one that keeps keys and values), not absent and not a linear map."""
    return part is not None and not isinstance(part, Linear)


def swiglu(ffn: FFN, x):
    """eq. 3: FFN(x) = (silu(x W_gate^T) ⊙ x W_up^T) W_down^T."""
    hidden = silu(x @ ffn.gate.T) * (x @ ffn.up.T)  # [T, d] -> [T, dh]
    return hidden @ ffn.down.T                       # [T, dh] -> [T, d]


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
    q = linear(x, attn.q, attn.q_bias).reshape(T, -1, hd).transpose(1, 0, 2)  # [T, d] -> [n_heads, T, hd]
    k = linear(x, attn.k, attn.k_bias).reshape(T, -1, hd).transpose(1, 0, 2)  # [T, d] -> [n_kv, T, hd]
    v = linear(x, attn.v, attn.v_bias).reshape(T, -1, hd).transpose(1, 0, 2)  # [T, d] -> [n_kv, T, hd]
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
    return linear(out.transpose(1, 0, 2).reshape(T, n_heads * hd), attn.o, attn.o_bias)  # -> [T, d]


# ---------------------------------------------------------------------------------------------------------------
# The model: its weights and the functions that compute with them


@dataclass(frozen=True)
class Kernels:
    """The functions `forward` computes attention, an FFN, the RoPE tables and RMSNorm with, and how a model holds
    its sub-blocks for them. PLAIN is the plain functions (this module's, and reffuse.core.rope's rope_tables);
    reffuse.core.fast.FAST the same arithmetic arranged for speed."""
    name: str
    attention: Callable  # (attn, x [T, d], config, cos, sin, cache, layer) -> [T, d], as `attention`
    ffn: Callable        # (ffn, x [T, d]) -> [T, d], as `swiglu`
    rope: Callable       # (positions [T], head_dim, theta, dtype, xp, scaling=...) -> cos, sin [T, head_dim],
                         # as `rope_tables`
    arrange: Callable    # (model) -> the model with its sub-blocks held as these functions read them
    norm: Callable = rms_norm  # (x [T, d], gain [d], eps) -> [T, d], as `rms_norm`


def _plain_parts(model: Model) -> Model:
    """The model with every sub-block as this module's dataclass (the weights shared, not copied)."""
    def part(cls, p):
        if p is None or type(p) is cls or isinstance(p, Linear):
            return p
        return cls(**{f.name: getattr(p, f.name) for f in dataclasses.fields(cls)})

    blocks = [Block(part(Attention, b.attention), part(FFN, b.ffn), b.fused_from) for b in model.blocks]
    return dataclasses.replace(model, blocks=blocks)


PLAIN = Kernels("plain", attention, swiglu, rope_tables, _plain_parts)


@dataclass
class Model:
    config: Config
    embed: np.ndarray      # [vocab, d]
    blocks: list[Block]
    norm_gain: np.ndarray  # [d]      the final RMSNorm's gain (HF model.norm)
    lm_head: np.ndarray    # [vocab, d] (the same array as `embed` when tied)
    kernels: Kernels = PLAIN  # what forward computes with: PLAIN, or reffuse.core.fast.FAST (load_model's)

    @property
    def dtype(self):
        return self.embed.dtype

    def layout(self) -> Layout:
        """Its shapes without weights (reffuse.core.layout): attention present, FFN width, fused_from, and where
        they are not the model's own, key/value heads and linear replacements, per block."""
        cfg = self.config

        def block_layout(b):
            kv = b.attention.k.shape[0] // cfg.head_dim if has_heads(b.attention) else None
            return BlockLayout(b.attention is not None, b.ffn.width if isinstance(b.ffn, FFN) else 0,
                               tuple(b.fused_from), kv_heads=None if kv == cfg.n_kv_heads else kv,
                               linear_attention=isinstance(b.attention, Linear), linear_ffn=isinstance(b.ffn, Linear))

        return Layout(cfg.name, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size,
                      cfg.tie_embeddings, tuple(block_layout(b) for b in self.blocks),
                      source="a reffuse Model's shapes")

    def rope(self, positions):
        """RoPE tables cos, sin [T, head_dim] of its heads at `positions`, in its dtype and on its device."""
        cfg = self.config
        return self.kernels.rope(positions, cfg.head_dim, cfg.rope_theta, self.dtype, array_module(self.embed),
                                 scaling=cfg.rope_scaling)


def plain(model: Model) -> Model:
    """The model on PLAIN, to read or step through: `forward` then calls `attention` and `swiglu` of this module
    and `rope_tables` of reffuse.core.rope. The same weights, shared."""
    return PLAIN.arrange(dataclasses.replace(model, kernels=PLAIN))


def weights_of(part) -> dict:
    """A sub-block's weight arrays by field name, absent biases left out (reffuse.core.fast's StackedAttention
    holds q, k, v as one, qkv)."""
    fields = ((f.name, getattr(part, f.name)) for f in dataclasses.fields(part))
    return {name: value for name, value in fields if hasattr(value, "shape")}


def map_arrays(model: Model, fn: Callable) -> Model:
    """A new model with `fn` applied to every weight array (dtype casts, device moves); ties and kernels are kept."""
    def sub(part):
        if part is None:
            return None
        return dataclasses.replace(part, **{name: fn(a) for name, a in weights_of(part).items()})

    embed = fn(model.embed)
    lm_head = embed if model.config.tie_embeddings else fn(model.lm_head)
    blocks = [Block(sub(b.attention), sub(b.ffn), b.fused_from) for b in model.blocks]
    return dataclasses.replace(model, embed=embed, blocks=blocks, norm_gain=fn(model.norm_gain), lm_head=lm_head)


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
# Blocks, runs and the whole model


def _identity(x):
    return x


def lm_logits(model: Model, x):
    """The final RMSNorm and the LM head: the stream x [T, d] leaving the last block -> next-token logits [T, vocab]."""
    x = model.kernels.norm(x, model.norm_gain, model.config.norm_eps)
    return x @ model.lm_head.T                                            # [T, d] -> [T, vocab]


def attention_output(model: Model, part, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
    """What the attention sub-block adds to the stream x [T, d]: Attn(η1(x)), or η1(x) W^T for a linear map."""
    normed = model.kernels.norm(x, part.norm_gain, model.config.norm_eps)
    if isinstance(part, Linear):
        return linear_map(part, normed)
    return model.kernels.attention(part, normed, model.config, cos, sin, cache, layer)


def ffn_output(model: Model, part, x):
    """What the FFN sub-block adds to the stream x [T, d]: FFN(η2(x)), or η2(x) W^T for a linear map."""
    normed = model.kernels.norm(x, part.norm_gain, model.config.norm_eps)
    if isinstance(part, Linear):
        return linear_map(part, normed)
    return model.kernels.ffn(part, normed)


def block_forward(model: Model, layer: int, x, cos, sin, cache: KVCache | None = None,
                  allreduce: Callable = _identity, mids: list | None = None, outputs: list | None = None):
    """One block, eq. 1-2 (eq. 4 when its attention is absent). x [T, d] -> [T, d].

    `allreduce` is applied to each row-parallel output (o_proj, down_proj, a linear map) before it joins the
    residual stream: the identity in one process, a sum over ranks under tensor parallelism (reffuse.tp).
    mids: if a list, the stream between the two sub-blocks (after attention) is appended to it.
    outputs: if a list, the pair (attention's output, the FFN's output) is appended, None for an absent one.
    """
    block = model.blocks[layer]
    attn_out = mlp_out = None
    if block.attention is not None:
        attn_out = allreduce(attention_output(model, block.attention, x, cos, sin, cache, layer))
        x = x + attn_out                                                                     # eq. 1
    if mids is not None:
        mids.append(x)
    if block.ffn is not None:
        mlp_out = allreduce(ffn_output(model, block.ffn, x))
        x = x + mlp_out                                                                      # eq. 2 / eq. 4
    if outputs is not None:
        outputs.append((attn_out, mlp_out))
    return x


def parallel_forward(model: Model, first: int, last: int, x, cos, sin, allreduce: Callable = _identity):
    """Blocks first..last all reading the same x [T, d] -> [T, d].

    Attention-free blocks: eq. 5 with every block's own norm, x + Σ_k FFN_k(η2^k(x)); all FFNs read the same x,
    so one all-reduce. Whole blocks (a run with attention, the paper's App. B): x + Σ_k (f_k(x) - x), eq. 5's
    analogue for blocks, which the paper does not write down [inferred].
    """
    blocks = model.blocks[first:last + 1]
    if all(b.attention is None for b in blocks):
        update = sum(ffn_output(model, b.ffn, x) for b in blocks)                              # eq. 5
        return x + allreduce(update)
    return x + sum(block_forward(model, k, x, cos, sin, allreduce=allreduce) - x for k in range(first, last + 1))


def run_blocks(model: Model, x, cos=None, sin=None, start: int = 0, stop: int | None = None, parallel=(),
               cache: KVCache | None = None, allreduce: Callable = _identity, streams: list | None = None,
               mids: list | None = None, whole_blocks: bool = False, outputs: list | None = None):
    """Blocks start..stop-1 on the stream x [T, d] entering block `start`; the stream leaving block stop-1, [T, d].

    The one walk over blocks that every forward pass, partial run and measurement uses.
    cos, sin: the RoPE tables of x's positions (None where no block with attention runs).
    parallel: runs (first, last) inside start..stop-1 computed in the parallel form (parallel_forward): runs of
        attention-free blocks, or of whole blocks when whole_blocks is True.
    cache: positions continue from cache.length (the caller advances it once the pass is done).
    streams: if a list, the stream after every step is appended (a parallel run is one step).
    mids: if a list, each block's stream after its attention sub-block is appended (blocks run one by one only).
    outputs: if a list, each block's (attention output, FFN output) is appended (blocks run one by one only).
    """
    stop = len(model.blocks) if stop is None else stop
    runs = layouts.check_runs(len(model.blocks), parallel) if whole_blocks else layouts.check_groups(model, parallel)
    if any(first < start or last >= stop for first, last in runs):
        raise ReffuseError(f"parallel runs {runs} must lie inside blocks {start}..{stop - 1}")
    for first, last in layouts.steps(stop, runs):
        if last < start:
            continue
        if first == last:
            x = block_forward(model, first, x, cos, sin, cache, allreduce, mids, outputs)        # eq. 1-4
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


def forward(model: Model, token_ids: Sequence[int], parallel_groups=None, cache: KVCache | None = None,
            allreduce: Callable = _identity, hidden_states: list | None = None, mids: list | None = None,
            outputs: list | None = None):
    """Next-token logits [T, vocab] for token_ids [T].

    parallel_groups: runs (first, last) of attention-free blocks computed in the parallel form, eq. 5.
    cache: positions continue from cache.length, and the cache is extended by T.
    hidden_states: if a list is given, the residual stream is appended to it after the embedding and after
        every block (after every parallel run as a whole): 1 + number of steps arrays [T, d].
    mids, outputs: as run_blocks' (each block's stream after attention; its sub-blocks' outputs).
    """
    ids = check_token_ids(model, token_ids)
    xp = array_module(model.embed)
    if cache is not None:
        cache.check(model)
    start = cache.length if cache is not None else 0
    check_window(model, start + len(ids))
    cos, sin = model.rope(start + np.arange(len(ids)))                   # [T, head_dim] each

    x = model.embed[xp.asarray(ids)]                                      # [T] -> [T, d]
    if hidden_states is not None:
        hidden_states.append(x)
    x = run_blocks(model, x, cos, sin, parallel=parallel_groups or (), cache=cache, allreduce=allreduce,
                   streams=hidden_states, mids=mids, outputs=outputs)     # [T, d] -> [T, d], eq. 1-5
    if cache is not None:
        cache.length += len(ids)
    return lm_logits(model, x)                                            # [T, d] -> [T, vocab]

