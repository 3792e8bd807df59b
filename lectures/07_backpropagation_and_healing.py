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
# # Lecture 07 — Backpropagation and healing
#
# Fusion is exact (Theorem 3.1) but the parallel step it rests on is not: lecture 04 measured what it costs on
# held-out text. The paper's answer is its third step, **healing**: the fused model is trained by knowledge
# distillation (KD) to match the next-token distributions of the model it came from (§3; the 253B model was
# distilled on tens of billions of tokens). Training needs gradients, and this lecture derives them piece by
# piece, the way `reffuse.training.backward` pairs every forward with its backward:
#
# 1. the chain rule through a product, RMSNorm, attention and SwiGLU, each checked against finite differences;
# 2. why the fused FFN's backward is the same code as one FFN's;
# 3. the whole model, `reffuse.gradients`, and the loss KD minimises;
# 4. a fused SmolLM2 healed for a hundred steps, with its held-out KL before and after.
#
# Notation: for a scalar loss L and an array a, `da` is ∂L/∂a, of a's shape. Weights are (out, in), so a product
# is y = x Wᵀ and its backward is dx = dy W, dW = dyᵀ x. Runs in about a minute.

# %%
import numpy as np

import reffuse
from reffuse.core.config import Config
from reffuse.core.model import FFN, Attention, attention, rms_norm, swiglu
from reffuse.core.rope import rope_tables
from reffuse.training import backward as bw
from reffuse.training.gradcheck import numerical_gradient, relative_error  # central differences, entry by entry

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. RMSNorm
#
# η(x) = x̂ ⊙ g with x̂ = x·r and r = (mean_j x_j² + ε)^(-1/2), per token. The gain's gradient is the easy part:
# dg = Σ_t dy ⊙ x̂. For x, write dx̂ = dy ⊙ g. Since ∂r/∂x_j = -r³ x_j / d,
#
# dx_j = r·dx̂_j - (r³ x_j / d) Σ_i dx̂_i x_i = r (dx̂_j - x̂_j · mean_i(dx̂_i x̂_i)).
#
# The second term removes from dx̂ its component along x̂: a norm cannot change the length of what it outputs,
# so the gradient has no say in that direction. The forward keeps x̂ and r for its backward.

# %%
x, gain, dy = rng.standard_normal((5, 8)), 1 + 0.3 * rng.standard_normal(8), rng.standard_normal((5, 8))
_, cache = bw.rms_norm_forward(x, gain, 1e-5)
dx, d_gain = bw.rms_norm_backward(dy, cache, gain)
loss = lambda: (dy * rms_norm(x, gain, 1e-5)).sum()   # a scalar whose gradient w.r.t. the output is dy
print(f"RMSNorm dx: relative error {relative_error(dx, numerical_gradient(loss, x)):.1e}")
print(f"RMSNorm dg: relative error {relative_error(d_gain, numerical_gradient(loss, gain)):.1e}")

# %% [markdown]
# ## 2. Attention
#
# Per query head: S = q kᵀ/√hd (masked: -∞ on future keys), P = softmax(S) over keys, O = P v, and the heads side
# by side go through W_o. Backwards:
#
# - the output projection: d heads = dy W_o, dW_o = dyᵀ heads;
# - O = P v: dP = dO vᵀ and dv = Pᵀ dO;
# - softmax: for each row, dS = P ⊙ (dP - Σ_j dP_j P_j) (its Jacobian is diag(P) - P Pᵀ). A masked key has P = 0,
#   so it gets no gradient, as it should;
# - S = q kᵀ/√hd: dq = dS k/√hd and dk = dSᵀ q/√hd;
# - RoPE is a rotation of each pair (i, i + hd/2), so its transpose is the rotation by the opposite angle:
#   `rope_backward(d, cos, sin) = apply_rope(d, cos, -sin)`;
# - the input projections: dx = dq W_q + dk W_k + dv W_v.
#
# Grouped-query attention adds one rule: a key/value head is read by `group` query heads, so its dk and dv are
# the **sums** over them (the transpose of HF's `repeat_kv`). Below, 6 query heads share 2 kv heads.

# %%
config = Config(vocab_size=16, dim=8, n_heads=6, n_kv_heads=2, head_dim=4)
attn = Attention(norm_gain=np.ones(8), q=rng.standard_normal((24, 8)), k=rng.standard_normal((8, 8)),
                 v=rng.standard_normal((8, 8)), o=rng.standard_normal((8, 24)))
cos, sin = rope_tables(np.arange(5), 4, 10000.0, np.float64)
x = rng.standard_normal((5, 8))
_, cache = bw.attention_forward(attn, x, config, cos, sin)
dx, grads = bw.attention_backward(dy, cache, attn, cos, sin)
loss = lambda: (dy * attention(attn, x, config, cos, sin)).sum()
print(f"attention dx:  relative error {relative_error(dx, numerical_gradient(loss, x)):.1e}")
for name in "qkvo":
    print(f"attention dW_{name}: relative error {relative_error(grads[name], numerical_gradient(loss, getattr(attn, name))):.1e}")

# %% [markdown]
# ## 3. SwiGLU, and why the fused FFN needs no backward of its own
#
# With a = x W_gateᵀ, b = x W_upᵀ, h = silu(a) ⊙ b and y = h W_downᵀ:
#
# dW_down = dyᵀ h,  dh = dy W_down,  db = dh ⊙ silu(a),  da = dh ⊙ b ⊙ silu'(a),  silu'(a) = σ(a)(1 + a(1 - σ(a))),
#
# and dx = da W_gate + db W_up. Every hidden unit lives in its own column of a and b, its own row of W_gate and
# W_up, its own column of W_down; nothing mixes units. That is the fact behind Theorem 3.1 (the sum of FFNs is one
# FFN with its units stacked), and it holds for the backward too: the fused FFN's weight gradients are its parts'
# gradients stacked as their weights are, and its input gradient is the sum of theirs. So the same
# `swiglu_backward` serves one FFN and a fused one of any widths.

# %%
ffns = [FFN(np.ones(8), rng.standard_normal((w, 8)), rng.standard_normal((w, 8)), rng.standard_normal((8, w)))
        for w in (3, 5, 4)]
fused = reffuse.fuse_ffns(ffns)
dx, grads = bw.swiglu_backward(dy, bw.swiglu_forward(fused, x)[1], fused)
parts = [bw.swiglu_backward(dy, bw.swiglu_forward(f, x)[1], f) for f in ffns]
print("fused dx = sum of the parts' dx:           ", np.allclose(dx, sum(p[0] for p in parts)))
print("fused dW_gate = the parts' dW_gate stacked:", np.allclose(grads["gate"], np.concatenate([p[1]["gate"] for p in parts])))
loss = lambda: (dy * swiglu(fused, x)).sum()
print(f"fused dW_up: relative error {relative_error(grads['up'], numerical_gradient(loss, fused.up)):.1e}")

# %% [markdown]
# ## 4. The whole model, and the loss that heals
#
# `reffuse.gradients(model, ids)` runs the model forward keeping what each backward reads, then goes back block
# by block. A residual add x + F(x) passes its gradient on and adds F's; the tied LM head and the embedding share
# one matrix, so its gradient is the sum of the head's and the lookup's (a scatter-add: a token that occurs
# twice gets both rows). Blocks below the lowest trainable weight run forward only.
#
# Healing minimises KL(teacher ‖ student) of the next-token distributions, at temperature τ and times τ²
# (Hinton et al.): its gradient with respect to the student's logits is τ (q - p)/T, the student's softened
# distribution minus the teacher's. The test suite checks every gradient of SmolLM2 against PyTorch autograd on
# transformers' own model; here, a check on the synthetic tiny model in float64 at a few entries.

# %%
tiny = reffuse.cast(reffuse.build_tiny(), "float64")
ids = rng.integers(0, 256, 12)
teacher_logits = 2 * rng.standard_normal((12, 256))


def kd_loss():
    z = reffuse.forward(tiny, ids)
    log_q = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    log_p = teacher_logits - np.log(np.exp(teacher_logits).sum(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()


loss, grads = reffuse.gradients(tiny, ids, teacher_logits=teacher_logits)
print(f"KD loss {loss:.6f} (written out: {kd_loss():.6f}); {len(grads)} gradient tensors")
weight, name = tiny.blocks[5].ffn.gate, "model.layers.5.mlp.gate_proj.weight"
entries = [(0, 0), (7, 3), (20, 40)]
numerical = numerical_gradient(kd_loss, weight, indices=entries)
for index in entries:
    print(f"block 5 dW_gate{index}: backward {grads[name][index]:+.6e}, finite differences {numerical[index]:+.6e}")

# %% [markdown]
# ## 5. Healing a fused SmolLM2
#
# The demo's plan: attention removed from blocks 5-12, the FFNs of 5-8 and of 9-11 fused into two wide blocks
# (lecture 04). We train only the two fused blocks (`--train fused` in `reffuse heal`) by KD from the original
# model, on the corpus' training split (27 plays and poems that neither the held-out nor the calibration text
# touches), and score held-out text before and after. A lecture's budget: 100 steps of 64 tokens, 6,400 tokens
# in all, where the paper used tens of billions; `reffuse heal` runs the same at a larger budget.

# %%
from reffuse import held_out_windows, load_tokenizer
from reffuse.core.names import named_weights
from reffuse.evaluation.scoring import evaluate
from reffuse.formats.corpus import training_windows
from reffuse.training.trainer import TrainingOptions, train

original = reffuse.load_model("smollm2")
tokenizer = load_tokenizer("smollm2")
student = reffuse.fuse(reffuse.drop_attention(original, range(5, 13)), [(5, 8), (9, 11)])
fused_blocks = [i for i, b in enumerate(student.blocks) if b.fused_from]
trainable = [n for n in named_weights(student) if n.startswith(tuple(f"model.layers.{i}." for i in fused_blocks))]
print(f"fused blocks {fused_blocks}: {sum(named_weights(student)[n].size for n in trainable):,} trainable weights")

held_out = held_out_windows(tokenizer, window=128, n_tokens=2048).ids
text = training_windows(tokenizer, window=64, n_tokens=6_400).ids
before = evaluate(student, held_out, base=original)
options = TrainingOptions(steps=100, learning_rate=3e-4, warmup=10, seed=0)
healed, log = train(student, text, trainable, options, teacher=original, progress=False)
after = evaluate(healed, held_out, base=original)
print(f"held-out KL to the original: {before.kl_from_base:.3f} -> {after.kl_from_base:.3f} nats")
print(f"held-out perplexity:         {before.perplexity:.1f} -> {after.perplexity:.1f} "
      f"(original {before.base_perplexity:.1f})")

# %%
import matplotlib.pyplot as plt

smoothed = np.convolve(log.losses, np.ones(10) / 10, mode="valid")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(log.losses, alpha=0.3, label="per step")
ax.plot(np.arange(9, len(log.losses)), smoothed, label="mean of 10 steps")
ax.set(xlabel="step (64 training tokens each)", ylabel="KD loss (nats)", title="Healing the two fused blocks")
ax.legend()
plt.show()

# %% [markdown]
# The training loss is measured on text the model is learning from; the held-out KL above is what counts. How
# far healing goes at larger budgets, and whether fusion then beats plain FFN removal, is what `reffuse heal`
# and the healing study measure; a hundred steps only show the direction.

# %% [markdown]
# ## Exercises
#
# 1. **The softmax's Jacobian.** Show that for p = softmax(s), ∂p_i/∂s_j = p_i (δ_ij - p_j), and that
#    dS = P ⊙ (dP - rowsum(dP ⊙ P)) is that Jacobian's transpose applied to dP. Check it numerically on one row.
# 2. **RoPE's transpose.** Check numerically that `rope_backward` is the transpose of `apply_rope`: for random a
#    and b, ⟨apply_rope(a), b⟩ = ⟨a, rope_backward(b)⟩.
# 3. **GQA's sum.** Build an attention with 6 query heads and 6 kv heads whose kv weights repeat each of 2 heads
#    three times; compare its dW_k (summed over the copies) with the 2-kv-head attention's dW_k.
# 4. **Temperature.** Compute the KD loss's gradient at τ = 1 and τ = 4 on the same logits. Why multiply by τ²?
# 5. **What to train.** Heal the fused SmolLM2 of section 5 training the whole attention-free run (the two fused
#    blocks and the run's last block, `--train run`) instead of the fused blocks only, at the same budget. Which is
#    better on held-out text?
#
# Solutions: `lectures/solutions/07_solutions.py` (run it: `python lectures/solutions/07_solutions.py`).
#
# **Graded: the backward passes.** Write `rms_norm_backward`, `swiglu_backward` and `attention_backward` in
# `lectures/exercises/student.py`; `python -m pytest lectures/exercises/test_07_backpropagation.py` grades them
# against `reffuse.training.backward` (`docs/course.md`).
