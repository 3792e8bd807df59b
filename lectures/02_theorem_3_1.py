# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lecture 02 — Theorem 3.1: a sum of SwiGLUs is one wide SwiGLU
#
# FFN Fusion rests on two steps, and only one of them is exact:
#
# 1. **The approximation.** A run of attention-free blocks is computed *in parallel* instead of one after the
#    other: every FFN of the run reads the run's input $X$ instead of the output of its predecessor (eq. 5):
#    $$f_{[i,i+c]}(X) = X + \sum_{j=0}^{c} \mathrm{FFN}_{i+j}(\eta_2(X)).$$
#    No theorem bounds this step; lectures 03 and 04 measure it.
# 2. **The exact step.** The parallel sum of SwiGLUs *is* one wider SwiGLU (Theorem 3.1), so the $c+1$ FFNs
#    become one matrix multiply per projection: fewer, larger kernels and, under tensor parallelism, one
#    all-reduce instead of $c+1$ (lectures 05 and 06).
#
# This lecture proves step 2 with numbers: it checks the theorem, explains why float32 and float64 disagree with
# it at different levels, shows how each block's RMSNorm gain can be kept exactly by *folding* it into the
# weights, and measures what the paper's own choice — every FFN reads the **last** block's norm — costs.
#
# Everything here calls reffuse: `reffuse.core.fusion.fuse_ffns` builds the wide FFN, `reffuse.fuse` fuses runs of a
# whole model, `reffuse.core.model.swiglu` and `rms_norm` are the model's own pieces. Runs in a few seconds.

# %%
import numpy as np

import reffuse
from reffuse import (FFN, drop_attention, forward, fuse_ffns, kl_per_token, load_tokenizer, log_softmax, rms_norm,
                     silu, swiglu, with_last_norm)

np.set_printoptions(precision=4, suppress=False)

# %% [markdown]
# ## 1. The statement
#
# With the paper's names (eq. 3), $\mathrm{SwiGLU}(X) = \big(\sigma(X W_2^\top) \odot X W_1^\top\big) W_3^\top$,
# where $W_2$ is the gate, $W_1$ the up projection and $W_3$ the down projection (HF's `gate_proj`, `up_proj`,
# `down_proj`; reffuse's `FFN.gate`, `FFN.up`, `FFN.down`, stored `(out, in)` like PyTorch).
#
# **Theorem 3.1.** For FFNs $k = 1..n$ with hidden widths $d_h^k$,
# $$\sum_k \mathrm{SwiGLU}_k(U) = \mathrm{SwiGLU}^*(U),\quad
#   W_2^* = \begin{bmatrix}W_2^1\\ \vdots\\ W_2^n\end{bmatrix},\;
#   W_1^* = \begin{bmatrix}W_1^1\\ \vdots\\ W_1^n\end{bmatrix} \in \mathbb{R}^{(\sum_k d_h^k)\times d},\quad
#   W_3^* = \begin{bmatrix}W_3^1 & \cdots & W_3^n\end{bmatrix} \in \mathbb{R}^{d\times \sum_k d_h^k}.$$
#
# *Why.* Write the hidden activation of the wide FFN, $H^* = \sigma(U W_2^{*\top}) \odot U W_1^{*\top}$. Both
# $\sigma$ and $\odot$ act on each hidden unit on its own, so the columns of $H^*$ are the columns of
# $H^1, \dots, H^n$ side by side: $H^* = [H^1, \dots, H^n]$. The down projection is a sum over hidden units, and
# a sum over all units is the sum of the sums over each block's units:
# $H^* W_3^{*\top} = \sum_k H^k W_3^{k\top}$. Nothing about the widths needs to be equal.
#
# We check it on the synthetic `tiny` model: its blocks 4–9 have no attention and FFN widths that differ on
# purpose. Its weights are random — for an *identity* that is no weakness: it must hold for any weights.

# %%
tiny = reffuse.load_model("tiny", dtype="float64")
run = [b.ffn for b in tiny.blocks[4:9]]                        # five FFNs of the attention-free run
print("widths d_h^k:", [f.width for f in run], " d =", tiny.config.dim)

wide = fuse_ffns(run, norm="last")                             # concatenation only (gains: section 3)
print("W_gate*", wide.gate.shape, " W_up*", wide.up.shape, " W_down*", wide.down.shape)

# %% [markdown]
# The input $U$ stands for the normalised residual stream that every FFN of the run reads: $T$ tokens of width
# $d$. (The FFN itself never normalises; `swiglu(ffn, u)` is eq. 3 only.)

# %%
rng = np.random.default_rng(0)
T, d = 16, tiny.config.dim
u = rms_norm(rng.standard_normal((T, d)), np.ones(d), tiny.config.norm_eps)   # [T, d]

parallel_sum = sum(swiglu(f, u) for f in run)                  # Σ_k SwiGLU_k(U)   [T, d]
one_wide = swiglu(wide, u)                                     # SwiGLU*(U)        [T, d]
print("max |Σ_k SwiGLU_k(U) - SwiGLU*(U)| =", np.abs(parallel_sum - one_wide).max())

# %% [markdown]
# The proof's middle step, seen directly: the wide hidden activation $H^*$ [T, Σ d_h] is the five hidden
# activations side by side. This is also why tensor parallelism can cut the wide FFN anywhere along its hidden
# axis (lecture 06): each slice of hidden units is an FFN of its own.

# %%
def hidden(ffn, u):
    """H = silu(U W_gate^T) ⊙ U W_up^T, the activation the down projection reads."""
    return silu(u @ ffn.gate.T) * (u @ ffn.up.T)               # [T, d] -> [T, d_h]


stacked = np.concatenate([hidden(f, u) for f in run], axis=1)  # [T, Σ d_h]
print("H* shape", hidden(wide, u).shape, " max |H* - [H^1..H^n]| =", np.abs(hidden(wide, u) - stacked).max())

# %% [markdown]
# The same stacking works *inside* one FFN. $W_2$ and $W_1$ read the same $U$, so
# $[\,U W_2^\top \mid U W_1^\top\,] = U \begin{bmatrix}W_2\\ W_1\end{bmatrix}^\top$: one product instead of two,
# the theorem's concatenation applied to the two input projections of a single FFN. It changes no number, only how
# many products read the weights; whether that saves time is a question of speed, which lecture 05 answers for
# reffuse's fast kernels (they stack an attention's q, k and v this way, and keep gate and up apart).

# %%
ffn = run[0]
both = u @ np.concatenate([ffn.gate, ffn.up]).T                # [T, d] -> [T, 2 d_h]: gate and up in one product
separate = np.concatenate([u @ ffn.gate.T, u @ ffn.up.T], axis=1)
print("max |U [W_2; W_1]^T - [U W_2^T | U W_1^T]| =", np.abs(both - separate).max())

# %% [markdown]
# ## 2. Exact in theory, exact to rounding in practice: float64 vs float32
#
# Above the difference is about $10^{-16}$ times the output, not 0. Both sides perform the same multiplications;
# what differs is the *order of additions*: the wide down projection adds $\sum_k d_h^k$ products in one
# reduction, the parallel sum adds $d_h^k$ products per FFN and then adds the $n$ results. Floating-point
# addition is not associative, so the two results differ by a few units in the last place — the machine
# epsilon of the dtype sets the scale, whatever the theorem says:

# %%
for dtype in (np.float64, np.float32):
    run_d = [FFN(*(a.astype(dtype) for a in (f.norm_gain, f.gate, f.up, f.down))) for f in run]
    u_d = u.astype(dtype)
    reference = sum(swiglu(f, u_d) for f in run_d)
    err = np.abs(swiglu(fuse_ffns(run_d, norm="last"), u_d) - reference).max() / np.abs(reference).max()
    print(f"{np.dtype(dtype).name:8s} relative error {err:.2e}   machine epsilon {np.finfo(dtype).eps:.2e}"
          f"   ratio {err / np.finfo(dtype).eps:.1f}")

# %% [markdown]
# The same comparison as more FFNs are fused, each error in units of its dtype's machine epsilon. One FFN is
# computed the same way on both sides (0); from two on, the additions are ordered differently, and the error
# stays a few epsilons in both dtypes however many FFNs are fused: far from the error of order 1 that a wrong
# fusion would make.

# %%
from reffuse.plots import pyplot, show

plt = pyplot()
fig, ax = plt.subplots(figsize=(6.4, 3.2))
counts = range(1, len(run) + 1)
for dtype, marker in ((np.float64, "o"), (np.float32, "s")):
    in_epsilons = []
    for n in counts:
        run_d = [FFN(*(a.astype(dtype) for a in (f.norm_gain, f.gate, f.up, f.down))) for f in run[:n]]
        reference = sum(swiglu(f, u.astype(dtype)) for f in run_d)
        err = np.abs(swiglu(fuse_ffns(run_d, norm="last"), u.astype(dtype)) - reference).max() / np.abs(reference).max()
        in_epsilons.append(err / np.finfo(dtype).eps)
    ax.plot(list(counts), in_epsilons, marker=marker, label=f"{np.dtype(dtype).name} (eps {np.finfo(dtype).eps:.1e})")
ax.axhline(1, color="0.5", linestyle="--", linewidth=0.8, label="one machine epsilon")
ax.set_xticks(list(counts))
ax.set_xlabel("FFNs fused into one")
ax.set_ylabel("max |fused - parallel| / max |parallel|\nin machine epsilons")
ax.set_title("Theorem 3.1 holds to rounding: the error is a few epsilons")
ax.legend(fontsize=8)
show(fig)

# %% [markdown]
# Both errors are a small multiple of their dtype's epsilon: float32 agrees to about 7 digits, float64 to about
# 16. That is the test reffuse uses throughout: *fused vs parallel* must agree to rounding in both dtypes, and
# a float64 run separates "rounding" from "a different function". A true bug (a transposed block, a dropped
# gain) shows up as an error of order 1 in float64 too.
#
# ## 3. Folding the RMSNorm gains
#
# In a model, each FFN reads its *own* normalisation, $\eta_k(x) = \frac{x}{\mathrm{rms}(x)} \odot g_k$
# (reffuse follows HF: $\mathrm{rms}(x) = \sqrt{\mathrm{mean}(x^2)+\epsilon}$; the paper's $x/\lVert x\rVert
# \odot s_k$ is the same with $s_k = \sqrt{d}\, g_k$). The theorem needs one shared input $U$, but the gains
# differ per block. Two ways out:
#
# * **fold** (exact): $u \odot g_k$ times $W^\top$ equals $u$ times $(W\,\mathrm{diag}(g_k))^\top$, so scale the
#   *input columns* of block $k$'s gate and up projections by $g_k$, and let the fused block normalise with a
#   gain of ones: $U = x/\mathrm{rms}(x)$. The fused block then equals the parallel form with every block's own
#   norm, $x + \sum_k \mathrm{FFN}_k(\eta_k(x))$ (the paper's §5.5 remarks that $D_{s}$ can be "pushed" into the
#   next module; this is that push).
# * **last** (the paper's text): "η2 is taken from the last layer in the sequence": every FFN reads
#   $\eta_{\text{last}}$, and the other gains are dropped.
#
# The folding identity, for one block:

# %%
block = tiny.blocks[5].ffn
x = rng.standard_normal((T, d))                                 # a residual stream [T, d]
with_own_gain = rms_norm(x, block.norm_gain, tiny.config.norm_eps) @ block.gate.T          # η_k(x) W_gate^T
folded = rms_norm(x, np.ones(d), tiny.config.norm_eps) @ (block.gate * block.norm_gain).T  # U (W_gate diag g_k)^T
print("max |η_k(x) W^T - U (W diag g_k)^T| =", np.abs(with_own_gain - folded).max())

# %% [markdown]
# At the level of the whole model, `reffuse.fuse(model, groups, norm="fold")` must equal the *parallel* model
# (`forward(..., parallel_groups=groups)`, eq. 5 with each block's own gain) and `norm="last"` must equal the
# parallel model in which every block reads the last gain (`with_last_norm`). Both to rounding:

# %%
groups = [(4, 8)]                                               # blocks 4..8; block 9 stays alone (see lecture 04)
ids = rng.integers(0, tiny.config.vocab_size, 24)
parallel_fold = forward(tiny, ids, parallel_groups=groups)
parallel_last = forward(with_last_norm(tiny, groups), ids, parallel_groups=groups)
fused_fold = forward(reffuse.fuse(tiny, groups, norm="fold"), ids)
fused_last = forward(reffuse.fuse(tiny, groups, norm="last"), ids)
print("fold: max |fused - parallel| =", np.abs(fused_fold - parallel_fold).max())
print("last: max |fused - parallel(last gains)| =", np.abs(fused_last - parallel_last).max())
print("blocks before:", len(tiny.blocks), " after:", len(reffuse.fuse(tiny, groups).blocks))

# %% [markdown]
# ## 4. What `last` costs
#
# Fusion is exact, so the only difference between `fold` and `last` is *which function* the fused block
# computes. Folding costs nothing at run time — the gains are multiplied into the weights once, when fusing —
# so the two variants run at the same speed and have the same shapes. `last` only changes the answer, by
# ignoring every gain but one. How much that matters depends on how different the gains of a run are.
#
# On tiny, whose weights and gains are random, both parallel forms differ from the sequential model by several
# percent of the largest logit, `last` a little more:

# %%
def relative_gap(a, b):
    """max |a - b| / max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


sequential = forward(tiny, ids)
print(f"tiny  parallel(fold) vs sequential: {relative_gap(parallel_fold, sequential):.3f}")
print(f"tiny  parallel(last) vs sequential: {relative_gap(parallel_last, sequential):.3f}")

# %% [markdown]
# The question that matters is a trained model. SmolLM2 has attention in every block, so we first make an
# attention-free run by removing the attention of blocks 18–23 (`reffuse.method.removal.drop_attention`; *which*
# attention to remove, and what that costs, is lecture 04's subject). The attention-removed model, run
# sequentially, is the reference here: fusion should reproduce *it*. We fuse blocks 18–22 and leave the run's
# last block alone, as the paper does (lecture 04 shows why).
#
# We compare next-token distributions with the KL divergence $\mathrm{KL}(p_{\text{sequential}} \,\|\,
# p_{\text{fused}})$ in nats per token (`reffuse.evaluation.scoring.kl_per_token`), on a short passage of real text, in
# float64 so that only the method differs, not the rounding.

# %%
smollm2 = reffuse.load_model("smollm2", dtype="float64")
tokenizer = load_tokenizer("smollm2")
text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair.")
text_ids = np.array(tokenizer.encode(text))                   # [T]

removed = drop_attention(smollm2, range(18, 24))              # blocks 18..23 attention-free
run_groups = [(18, 22)]
reference_log_p = log_softmax(forward(removed, text_ids))     # the sequential attention-removed model


def kl_to_sequential(model):
    """Mean KL(sequential || model) over tokens 1.. (token 0, the attention sink, is left out), in nats."""
    return float(kl_per_token(reference_log_p, log_softmax(forward(model, text_ids)))[1:].mean())


print(f"{len(text_ids)} tokens; fused blocks {run_groups}")
print(f"KL(sequential || fused, norm='fold') = {kl_to_sequential(reffuse.fuse(removed, run_groups, 'fold')):.3f} nats")
print(f"KL(sequential || fused, norm='last') = {kl_to_sequential(reffuse.fuse(removed, run_groups, 'last')):.3f} nats")

# %% [markdown]
# Why `last` is worse: the gains of consecutive blocks are similar but not equal. Each row below is how far block
# $k$'s FFN gain is from the last block's, $\lVert g_k - g_{\text{last}}\rVert / \lVert g_{\text{last}}\rVert$:

# %%
gains = np.array([removed.blocks[i].ffn.norm_gain for i in range(18, 23)])   # [5, d]
for layer, g in zip(range(18, 23), gains):
    print(f"block {layer}: {np.linalg.norm(g - gains[-1]) / np.linalg.norm(gains[-1]):.2f}")

# %% [markdown]
# The farther a block is from the end of the run, the more its gain differs — and `last` replaces it anyway.
# So `last` adds an approximation of its own on top of the sequential → parallel one, for no gain in speed.
# reffuse's default is `fold`; `last` stays available to reproduce the paper. (After fusing, the paper trains
# the model further with distillation, which can absorb such differences; without training, `fold` is the
# better start.)

# %% [markdown]
# ## Exercises
#
# 1. **GeGLU.** The paper says the theorem holds for any GLU-style FFN. Write a GeGLU (GELU instead of SiLU,
#    the tanh approximation is fine) for the FFNs in `run` and check that the sum of five GeGLUs equals one wide
#    GeGLU built from the same concatenated weights. Which property of the activation does the proof use?
# 2. **The other direction.** Split `wide` into 3 *unequal* slices of hidden units (e.g. 200, 240, 200 units)
#    and check that the sum of the three slice-FFNs equals `wide`. This is exactly a column-parallel /
#    row-parallel shard of lecture 06 — where does the all-reduce go?
# 3. **Error growth.** For n = 1..5 FFNs of `run`, measure the float32 relative error of fused vs parallel sum.
#    Does it grow with n? Compare with float64.
# 4. **When `last` is free.** Build a copy of `tiny` in which blocks 4–8 all share the same FFN gain and show
#    that `fuse(..., norm="last")` and `fuse(..., norm="fold")` then give the same logits (to rounding).
# 5. **Not a theorem.** Even the smallest run, blocks (4, 5), computed in parallel differs from the sequential
#    model. Scale block 4's down projection by 0.1 (a smaller update to the residual stream) and compare the
#    gap before and after. Explain the change with the first-order view in `docs/paper.md` (section "Why the parallel form is close").
#
# Solutions: `lectures/solutions/02_solutions.py` (run it: `python lectures/solutions/02_solutions.py`).
#
# **Graded: fuse it yourself.** Write `fuse_ffns` (FFNs of unequal widths) and `fold_norm_gain` in
# `lectures/exercises/student.py`; `python -m pytest lectures/exercises/test_02_theorem_3_1.py` grades them against
# `reffuse.core.fusion.fuse_ffns` and the parallel form, eq. 5 (`docs/course.md`).
