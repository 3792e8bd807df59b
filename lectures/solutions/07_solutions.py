"""Solutions to the exercises of lecture 07 (backpropagation and healing).
Run: python lectures/solutions/07_solutions.py"""

import numpy as np

import reffuse
from reffuse import held_out_windows, load_tokenizer
from reffuse.core.config import Config
from reffuse.core.model import Attention, attention, softmax_
from reffuse.core.rope import apply_rope, rope_tables
from reffuse.core.names import named_weights
from reffuse.evaluation.scoring import evaluate
from reffuse.formats.corpus import training_windows
from reffuse.training import backward as bw
from reffuse.training.losses import distillation_rows
from reffuse.training.trainer import TrainingOptions, train

rng = np.random.default_rng(0)

# 1. The softmax's Jacobian: ∂p_i/∂s_j = p_i (δ_ij - p_j), so (Jᵀ dp)_j = Σ_i dp_i p_i (δ_ij - p_j)
#    = p_j (dp_j - Σ_i dp_i p_i): P ⊙ (dP - rowsum(dP ⊙ P)).
s, dp = rng.standard_normal(6), rng.standard_normal(6)
p = softmax_(s.copy())
jacobian = np.diag(p) - np.outer(p, p)
print(f"1. Jacobianᵀ dp vs the formula: max difference {np.abs(jacobian.T @ dp - p * (dp - (dp * p).sum())).max():.1e}")
assert np.allclose(jacobian.T @ dp, p * (dp - (dp * p).sum()))

# 2. RoPE's transpose: <apply_rope(a), b> = <a, rope_backward(b)>, because a rotation's transpose is its inverse.
cos, sin = rope_tables(np.arange(7), 8, 10000.0, np.float64)
a, b = rng.standard_normal((3, 7, 8)), rng.standard_normal((3, 7, 8))
left, right = (apply_rope(a, cos, sin) * b).sum(), (a * bw.rope_backward(b, cos, sin)).sum()
print(f"2. <R a, b> = {left:.12f}, <a, Rᵀ b> = {right:.12f}")
assert np.isclose(left, right, rtol=1e-12)

# 3. GQA's sum: 2 kv heads each read by 3 query heads equal 6 kv heads holding each of the 2 three times; the
#    gradient of a shared head is the sum of its copies' gradients.
hd, d = 4, 8
q, k, v, o = (rng.standard_normal(shape) for shape in ((6 * hd, d), (2 * hd, d), (2 * hd, d), (d, 6 * hd)))
copies = lambda w: np.repeat(w.reshape(2, hd, d), 3, axis=0).reshape(6 * hd, d)  # kv head h -> query heads 3h..3h+2
grouped = Attention(np.ones(d), q, k, v, o)
repeated = Attention(np.ones(d), q, copies(k), copies(v), o)
x, dy = rng.standard_normal((5, d)), rng.standard_normal((5, d))
cos, sin = rope_tables(np.arange(5), hd, 10000.0, np.float64)
gqa = Config(vocab_size=4, dim=d, n_heads=6, n_kv_heads=2, head_dim=hd)
mha = Config(vocab_size=4, dim=d, n_heads=6, n_kv_heads=6, head_dim=hd)
assert np.allclose(attention(grouped, x, gqa, cos, sin), attention(repeated, x, mha, cos, sin))
_, g_grouped = bw.attention_backward(dy, bw.attention_forward(grouped, x, gqa, cos, sin)[1], grouped, cos, sin)
_, g_repeated = bw.attention_backward(dy, bw.attention_forward(repeated, x, mha, cos, sin)[1], repeated, cos, sin)
summed = g_repeated["k"].reshape(2, 3, hd, d).sum(axis=1).reshape(2 * hd, d)
print(f"3. dW_k of the shared heads vs the sum over their copies: max difference "
      f"{np.abs(g_grouped['k'] - summed).max():.1e}")
assert np.allclose(g_grouped["k"], summed)

# 4. Temperature: the logits' gradient is τ (q_τ - p_τ) / T. Softening makes q_τ - p_τ about 1/τ² as large for
#    small differences (the softmax's slope at z/τ is 1/τ), so without τ² the signal would shrink with τ; τ²
#    keeps it on the scale of τ = 1 (Hinton et al.).
z, teacher = rng.standard_normal((4, 10)), rng.standard_normal((4, 10))
for tau in (1.0, 4.0):
    loss, grad = distillation_rows(z, teacher, tau, 4)
    print(f"4. τ = {tau:g}: loss {loss:.4f}, |gradient| {np.abs(grad).sum():.4f}")

# 5. What to train: the whole attention-free run (the two fused blocks and the run's last, unfused block) against
#    the fused blocks alone, at the same budget as the lecture.
original = reffuse.load_model("smollm2")
tokenizer = load_tokenizer("smollm2")
student = reffuse.fuse(reffuse.drop_attention(original, range(5, 13)), [(5, 8), (9, 11)])
held_out = held_out_windows(tokenizer, window=128, n_tokens=2048).ids
text = training_windows(tokenizer, window=64, n_tokens=6_400).ids
options = TrainingOptions(steps=100, learning_rate=3e-4, warmup=10, seed=0)
results = {}
for label, blocks in {"fused blocks": [i for i, b in enumerate(student.blocks) if b.fused_from],
                      "whole run": [i for i, b in enumerate(student.blocks) if b.attention is None]}.items():
    names = [n for n in named_weights(student) if n.startswith(tuple(f"model.layers.{i}." for i in blocks))]
    healed, _ = train(student, text, names, options, teacher=original, progress=False)
    results[label] = evaluate(healed, held_out, base=original).kl_from_base
    print(f"5. training the {label} (blocks {blocks}): held-out KL {results[label]:.3f}")
print("   more trainable weights fit the teacher more closely at this budget" if results["whole run"] <
      results["fused blocks"] else "   the fused blocks alone do as well at this budget")
