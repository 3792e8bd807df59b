# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lecture 01 — The Llama block in NumPy
#
# FFN Fusion rewires the blocks of a Llama-style transformer. Before rewiring anything we need to know exactly
# what one block computes, with which shapes, and how to be sure our NumPy code computes the same thing as
# everyone else's. This lecture takes a real pretrained model, **SmolLM2-135M-Instruct** (30 blocks, Apache-2.0,
# fetched by reffuse from the package registry on first use), and walks through one block piece by piece, with
# reffuse's own functions:
#
# | piece | paper | reffuse |
# |---|---|---|
# | RMSNorm | $\eta(x) = \frac{x}{\lVert x\rVert} \odot s$ | `reffuse.core.model.rms_norm` |
# | rotary position embedding (RoPE) | — | `reffuse.core.rope.rope_tables`, `apply_rope` |
# | grouped-query attention | $\mathrm{Attn}$ | `reffuse.core.model.attention` |
# | SwiGLU | eq. 3 | `reffuse.core.model.swiglu` |
# | the block | eq. 1–2: $g(X) = X + \mathrm{Attn}(\eta_1(X))$, $f(X) = g(X) + \mathrm{FFN}(\eta_2(g(X)))$ | `block_forward` |
# | the KV cache | — | `reffuse.KVCache` |
#
# and ends by holding the whole forward pass against Hugging Face `transformers` (when it is installed).
# Shapes are written `[T, d]`: T tokens, model width d. Runs in well under a minute.

# %%
import dataclasses

import numpy as np

import reffuse
from reffuse import (Attention, apply_rope, attention, block_forward, load_tokenizer, rms_norm, rope_tables, silu,
                     swiglu)
from reffuse.core.model import plain

model = plain(reffuse.load_model("smollm2"))    # float32; downloads the 98 MB GGUF once, then reads the cache
cfg = model.config
print(cfg)

# %% [markdown]
# ## 1. The weights and their shapes
#
# A `reffuse.Model` is plain data: the token embedding, a list of blocks, a final norm and the LM head (tied to
# the embedding here, as in SmolLM2), and the functions it computes with (`model.kernels`). `load_model` returns
# it on fast kernels (`reffuse.core.fast`, the same arithmetic arranged for speed, lecture 05); `plain(model)` puts
# it on the functions of the table above, so that `reffuse.forward` and `block_forward` below run exactly those. Each block
# holds an `Attention` (its norm gain $g_1$ and the q, k, v, o projections) and an `FFN` (its norm gain $g_2$ and
# the gate, up, down projections). Weights are stored `(out_features, in_features)`, as in PyTorch, so a
# projection is `x @ W.T`.

# %%
block = model.blocks[0]


def weights(part) -> dict:
    """A block part's weight arrays by field name; the fields other Llamas fill (biases) are None in SmolLM2."""
    return {f.name: getattr(part, f.name) for f in dataclasses.fields(part) if getattr(part, f.name) is not None}


for part in (block.attention, block.ffn):
    for name, w in weights(part).items():
        print(f"{type(part).__name__:9s} {name:5s} {w.shape}")

attention_params = sum(w.size for w in weights(block.attention).values())
ffn_params = sum(w.size for w in weights(block.ffn).values())
print(f"\nper block: attention {attention_params:,} parameters, FFN {ffn_params:,} "
      f"({ffn_params / (attention_params + ffn_params):.0%} of the block)")
print(f"embedding (shared with the LM head): {model.embed.size:,}; all blocks: "
      f"{len(model.blocks) * (attention_params + ffn_params):,}")

# %% [markdown]
# Three quarters of every block is its FFN: that is the part FFN Fusion makes wider and fewer. Attention is small in
# parameters but its queries, keys and values are tied to positions (and to a cache), which is why the paper
# removes attention first (lecture 04) before it can fuse FFNs.
#
# ## 2. From text to the residual stream
#
# The tokenizer turns text into ids `[T]`; the embedding turns ids into the **residual stream** `[T, d]`, the
# vector every block reads from and adds to.

# %%
tokenizer = load_tokenizer("smollm2")
text = "The capital of France is Paris. The capital of Italy is"
ids = np.array(tokenizer.encode(text))
print(len(ids), "tokens:", [tokenizer.decode([i]) for i in ids])

x = model.embed[ids]                             # [T] -> [T, d]
print("residual stream", x.shape, x.dtype)

# %% [markdown]
# ## 3. RMSNorm
#
# Every sub-block reads a *normalised* copy of the stream: $\eta(x) = \frac{x}{\mathrm{rms}(x)} \odot g$ with
# $\mathrm{rms}(x) = \sqrt{\mathrm{mean}(x^2) + \epsilon}$, per token, and a learned gain $g \in \mathbb{R}^d$.
# The paper writes $x / \lVert x \rVert \odot s$: the same thing, since $\lVert x\rVert = \sqrt{d}\,\mathrm{rms}(x)$,
# with $s = \sqrt{d}\, g$ (and $\epsilon$ left out). Two properties matter for fusion:
#
# * the output depends only on the *direction* of each token's vector, not its length (scale invariance), and
# * the gain is a diagonal matrix applied after normalising, so it can be folded into the next weights
#   (lecture 02).

# %%
gain, eps = block.attention.norm_gain, cfg.norm_eps
unit = rms_norm(x, np.ones(cfg.dim, dtype=x.dtype), eps)     # [T, d], gain 1
print("rms of each token after normalising:", np.sqrt(np.mean(unit ** 2, axis=-1))[:5].round(4))
print("scale invariance, max |η(10x) - η(x)|:", np.abs(rms_norm(10 * x, gain, eps) - rms_norm(x, gain, eps)).max())
print("gain statistics: min %.3f, median %.3f, max %.3f" % (gain.min(), np.median(gain), gain.max()))

# %% [markdown]
# (Scale invariance holds up to $\epsilon$: $10x$ and $x$ are normalised with slightly different $\epsilon$
# weight, which the tiny difference above shows.)
#
# ## 4. Rotary position embeddings (RoPE)
#
# Attention scores are dot products of queries and keys; RoPE makes them depend on *relative* position by
# rotating each query and key in 2-D planes, by an angle proportional to its position $p$:
# $\theta_i(p) = p \cdot b^{-2i/h}$ for $i < h/2$, head size $h$ and base $b$ (`rope_theta`). reffuse uses the
# **rotate-half** convention of HF: dimension $i$ pairs with $i + h/2$. (GGUF files from llama.cpp pair
# $(2i, 2i+1)$ instead and permute the q/k rows to match; reffuse's GGUF loader undoes that — the classic bug
# when porting Llama weights.)

# %%
cos, sin = rope_tables(np.arange(len(ids)), cfg.head_dim, cfg.rope_theta, model.dtype)
print("cos, sin tables:", cos.shape, " base", cfg.rope_theta)

rng = np.random.default_rng(0)
q_vec, k_vec = rng.standard_normal((2, 1, 1, cfg.head_dim))         # one head, one token, [1, 1, h]


def rotated(vec, position):
    c, s = rope_tables(np.array([position]), cfg.head_dim, cfg.rope_theta, np.float64)
    return apply_rope(vec, c, s)


print("length kept:", np.linalg.norm(q_vec).round(6), np.linalg.norm(rotated(q_vec, 7)).round(6))
for m, n in [(3, 1), (10, 8), (1000, 998)]:
    score = (rotated(q_vec, m) * rotated(k_vec, n)).sum()
    print(f"query at {m:4d}, key at {n:4d} (distance {m - n}): score {score:+.6f}")

# %% [markdown]
# The score is the same for every pair at distance 2: attention sees *how far back* a key is, not where it is.
#
# ## 5. Grouped-query attention
#
# SmolLM2 has 9 query heads but only 3 key/value heads: each key/value head serves a **group** of 3 query heads
# (query head $j$ reads kv head $j // 3$, HF's `repeat_kv`). Keys and values are what the KV cache stores, so
# this cuts the cache 3×. Shapes through `reffuse.core.model.attention` for our $T$ tokens:
#
# ```
# q = x @ W_q.T   [T, d] -> [T, 9·64] -> [9, T, 64]
# k = x @ W_k.T   [T, d] -> [T, 3·64] -> [3, T, 64]      (v the same)
# scores = q·k/√64 grouped by kv head   -> [3, 3, T, T], future positions masked to -inf
# out = softmax(scores) v               -> [9, T, 64] -> [T, 9·64] -> @ W_o.T -> [T, d]
# ```
#
# GQA is multi-head attention in which the key and value weights of the heads of a group are *equal*. We check
# that: repeat each kv head's weights for its 3 query heads, declare 9 kv heads, and the output is the same.

# %%
a = block.attention
h_in = rms_norm(x, a.norm_gain, eps)                                      # η1(x)  [T, d]
gqa = attention(a, h_in, cfg, cos, sin)                              # [T, d]

group = cfg.n_heads // cfg.n_kv_heads


def repeat_heads(w):
    """[n_kv·h, d] -> [n_heads·h, d]: kv head j's rows copied for each query head of its group."""
    return np.repeat(w.reshape(cfg.n_kv_heads, cfg.head_dim, -1), group, axis=0).reshape(-1, w.shape[1])


mha = attention(Attention(a.norm_gain, a.q, repeat_heads(a.k), repeat_heads(a.v), a.o), h_in,
                dataclasses.replace(cfg, n_kv_heads=cfg.n_heads), cos, sin)
print(f"group size {group}; max |GQA - MHA with repeated kv heads| = {np.abs(gqa - mha).max():.2e}")

# %% [markdown]
# **Causality.** A token may only attend to itself and earlier tokens. Change the last token and nothing before
# it may move:

# %%
changed = h_in.copy()
changed[-1] += 1.0
moved = np.abs(attention(a, changed, cfg, cos, sin) - gqa).max(axis=-1)   # per position
print("largest change per position:", moved.round(6))

# %% [markdown]
# ## 6. SwiGLU
#
# The FFN (eq. 3): $\mathrm{FFN}(u) = \big(\mathrm{silu}(u W_{\text{gate}}^\top) \odot u W_{\text{up}}^\top\big)
# W_{\text{down}}^\top$ with $\mathrm{silu}(z) = z\,\sigma(z)$. The *gate* decides, per hidden unit and token,
# how much of the *up* projection passes; the *down* projection returns to width d:
#
# ```
# [T, d] --gate, up--> [T, dh] --silu(gate) ⊙ up--> [T, dh] --down--> [T, d]      (d = 576, dh = 1536)
# ```
#
# Everything between the two projections is elementwise *per hidden unit*. That single fact is Theorem 3.1
# (lecture 02): hidden units of different FFNs can be put side by side in one wider FFN.

# %%
f = block.ffn
u = rms_norm(x, f.norm_gain, eps)                                         # η2  [T, d]
hidden = silu(u @ f.gate.T) * (u @ f.up.T)                           # [T, d] -> [T, dh]
print("hidden", hidden.shape, " output", swiglu(f, u).shape)
print("fraction of hidden activations with |value| < 0.01:", float(np.mean(np.abs(hidden) < 0.01)).__round__(3))

# %% [markdown]
# ## 7. The block, and the residual stream through the model
#
# `block_forward` is eq. 1–2: attention adds its output to the stream, then the FFN reads the updated stream and
# adds its own. Each block's **contribution** is $h(X) = f(X) - X$ (the paper's notation, §3). Lecture 03 asks
# how much each block's contribution depends on earlier blocks; here we look at how big the contributions are
# compared with the stream they are added to, token by token. The first token is left out of the average: every
# later token attends to it, and trained models park it at a huge norm (the *attention sink*), so its numbers
# describe the sink rather than the text.

# %%
after_block0 = block_forward(model, 0, x, cos, sin)                  # [T, d] -> [T, d]
print("block 0 output", after_block0.shape)

stream = []
logits = reffuse.forward(model, ids, hidden_states=stream)          # stream: embedding + 30 block outputs
ratios = [np.mean(np.linalg.norm(b - a, axis=-1)[1:] / np.linalg.norm(a, axis=-1)[1:])  # tokens 1.., per token
          for a, b in zip(stream[:-1], stream[1:])]
print("||h(X)|| / ||X|| per block (mean over tokens 1..T-1):")
print(np.round(ratios, 3))

# %% [markdown]
# Block 0 rewrites the stream entirely (the embeddings are short vectors; block 0's update is ~20 times longer).
# After it, most blocks add an update a quarter to a third as long as the stream, and a few late blocks much
# more. The smaller a block's update relative to the stream, the less its successors notice whether it ran
# before them or beside them: that is what makes running blocks in parallel a good approximation (lecture 03).
#
# ## 8. Next-token prediction
#
# The final norm and the LM head map the stream to logits `[T, vocab]`; row $t$ scores the token after
# position $t$.

# %%
top = np.argsort(logits[-1])[::-1][:5]
probs = np.exp(logits[-1] - logits[-1].max())
probs /= probs.sum()
print("logits", logits.shape)
for t in top:
    print(f"  {tokenizer.decode([t])!r:12s} p = {probs[t]:.3f}")

# %% [markdown]
# ## 9. The KV cache
#
# Generating token by token, a naive model would recompute every earlier position at every step. The KV cache
# keeps each attention block's keys and values; one decoding step then computes one new row per block and attends
# over the cached rows. The classic bug is a cache that "mostly" agrees with the uncached model, so we check:
# prefill the first tokens, then feed the rest one at a time, and compare with one uncached forward.

# %%
cache = reffuse.KVCache(model, max_tokens=len(ids))
prefill = 8
steps = [reffuse.forward(model, ids[:prefill], cache=cache)]         # [8, vocab], cache.length -> 8
for t in range(prefill, len(ids)):
    steps.append(reffuse.forward(model, ids[t:t + 1], cache=cache))  # [1, vocab] each, positions continue
cached = np.concatenate(steps)
print("cache length", cache.length, "; keys of block 0:", cache.keys[0].shape, "[n_kv, max_tokens, head_dim]")
print("max |cached - uncached| logits:", np.abs(cached - logits).max(), " (max |logit|", np.abs(logits).max(), ")")
print("same argmax everywhere:", bool((cached.argmax(-1) == logits.argmax(-1)).all()))

# %% [markdown]
# The difference is float32 rounding: the cached path multiplies matrices of other shapes, so the additions
# happen in another order (lecture 02 explains why that is the only difference). In float64 it shrinks below
# $10^{-12}$.
#
# Memory: the cache holds 2 (keys, values) × 30 blocks × 3 kv heads × 64 × 4 bytes per token:

# %%
per_token = 2 * len(cache.keys) * cfg.n_kv_heads * cfg.head_dim * np.dtype(model.dtype).itemsize
print(f"{per_token / 1024:.1f} KiB per token; 8192 tokens: {8192 * per_token / 2**20:.0f} MiB "
      f"(without GQA: {8192 * per_token * group / 2**20:.0f} MiB)")

# %% [markdown]
# ## 10. Does it agree with `transformers`?
#
# A reference implementation is only worth something if it agrees with the others. `reffuse.evaluation.reference` loads the
# same GGUF into Hugging Face's `LlamaForCausalLM` — transformers does its own dequantization and q/k
# un-permutation, so agreement checks reffuse's loader as well as its forward pass — and captures the residual
# stream after the embedding and after every decoder layer. This needs the `reference` extra (a CPU build of
# torch, transformers, accelerate); loading takes 10–20 s. The target in float32 is a max absolute logit error
# below 2e-4. Without the extra, this cell says so; from a shell, `reffuse verify --model smollm2 --against
# transformers` prints the same comparison block by block.

# %%
try:
    from reffuse.evaluation.reference import load_reference, reference_activations
    reference = load_reference("smollm2")                            # transformers' LlamaForCausalLM, float32
except (ImportError, reffuse.ReffuseError) as missing:
    print(f"transformers is not available here ({missing}).\n"
          "To check: pip install -e '.[reference]', then run this cell again or, from a shell,\n"
          "    reffuse verify --model smollm2 --against transformers")
else:
    theirs = reference_activations(reference, ids)                   # hidden_states [31, T, d], logits [T, vocab]
    block_errors = [np.abs(ours - ref).max() / np.abs(ref).max() for ours, ref in zip(stream, theirs.hidden_states)]
    print("relative error of the residual stream, embedding and blocks 0, 5, 10, 15, 20, 25, 29:")
    print(np.array(block_errors)[[0, 1, 6, 11, 16, 21, 26, 30]])
    logit_error = np.abs(logits - theirs.logits).max()
    print(f"logits: max |reffuse - transformers| = {logit_error:.2e} "
          f"({logit_error / np.abs(theirs.logits).max():.1e} of the largest logit)")
    print("same next-token argmax everywhere:", bool((logits.argmax(-1) == theirs.logits.argmax(-1)).all()))

# %% [markdown]
# ## Exercises
#
# 1. **RMSNorm and the paper.** Show numerically that `rms_norm(x, g, 0)` equals the paper's
#    $x / \lVert x \rVert \odot s$ with $s = \sqrt{d}\, g$, for the embedding of our text.
# 2. **RoPE frequencies.** Which pair of dimensions rotates fastest, and how many tokens does the slowest pair
#    need for one full turn with `rope_theta` = 100000 and head size 64?
# 3. **Causality of the whole model.** Change the *last* token id of `ids` and show that the logits of all
#    earlier positions are unchanged (to float32 rounding), while the last row changes.
# 4. **The cache in float64.** Repeat section 9 with `reffuse.load_model("smollm2", dtype="float64")` and show
#    that cached and uncached logits now agree to about $10^{-12}$.
# 5. **Counting.** How many multiply-adds does one block perform per token at context length S (attention
#    projections, attention scores and weighted sum, FFN)? At which S does attention cost as much as the FFN?
#
# Solutions: `lectures/solutions/01_solutions.py` (run it: `python lectures/solutions/01_solutions.py`).
#
# **Graded: write the block yourself.** `lectures/exercises/student.py` has the stubs `rms_norm`, `apply_rope`,
# `attention` (with a KV cache) and `swiglu`; `python -m pytest lectures/exercises/test_01_llama_block.py` grades
# them against the functions of the table above, on the tiny model and on SmolLM2's block 0 (`docs/course.md`).
