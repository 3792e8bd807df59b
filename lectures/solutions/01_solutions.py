"""Solutions to the exercises of lecture 01 (the Llama block). Run: python lectures/solutions/01_solutions.py"""

import numpy as np

import reffuse
from reffuse import load_tokenizer, rms_norm

model = reffuse.load_model("smollm2")
cfg = model.config
tokenizer = load_tokenizer("smollm2")
ids = np.array(tokenizer.encode("The capital of France is Paris. The capital of Italy is"))
x = model.embed[ids].astype(np.float64)                              # [T, d]

# 1. rms(x) = ||x|| / sqrt(d), so x / rms(x) ⊙ g = x / ||x|| ⊙ (sqrt(d) g): the paper's s is sqrt(d) g.
g = model.blocks[0].attention.norm_gain.astype(np.float64)
ours = rms_norm(x, g, 0.0)
papers = x / np.linalg.norm(x, axis=-1, keepdims=True) * (np.sqrt(cfg.dim) * g)
print(f"1. max |rms_norm(x, g, 0) - x/||x|| ⊙ sqrt(d) g| = {np.abs(ours - papers).max():.1e}")
assert np.allclose(ours, papers, rtol=1e-12, atol=1e-12)

# 2. Pair i turns by theta^(-2i/h) radians per token: pair 0 fastest (1 rad per token, a turn in 2π ≈ 6.3
#    tokens); the slowest, i = h/2 - 1, needs 2π / theta^(-(h-2)/h) tokens for one turn.
h, theta = cfg.head_dim, cfg.rope_theta
rates = theta ** (-np.arange(0, h, 2) / h)                          # radians per token, [h/2]
slowest_turn = 2 * np.pi / rates[-1]
print(f"2. fastest pair (0, {h // 2}): {rates[0]:.0f} rad/token; slowest pair ({h // 2 - 1}, {h - 1}): one turn "
      f"every {slowest_turn:,.0f} tokens")
assert rates.argmax() == 0 and 400_000 < slowest_turn < 600_000

# 3. Causality of the whole model: a change at the last position moves only the last row of the logits.
logits = reffuse.forward(model, ids)
changed_ids = ids.copy()
changed_ids[-1] = (ids[-1] + 1) % cfg.vocab_size
changed = reffuse.forward(model, changed_ids)
earlier = np.abs(changed[:-1] - logits[:-1]).max()
last = np.abs(changed[-1] - logits[-1]).max()
print(f"3. earlier rows moved by {earlier:.1e}, the last row by {last:.2f}")
assert earlier < 1e-4 * np.abs(logits).max() and last > 0.1   # float32 rounding vs a real change

# 4. The cache in float64: cached and uncached differ only in the order of additions, now at 1e-16 precision.
model64 = reffuse.load_model("smollm2", dtype="float64")
cache = reffuse.KVCache(model64, max_tokens=len(ids))
steps = [reffuse.forward(model64, ids[:8], cache=cache)]
steps += [reffuse.forward(model64, ids[t:t + 1], cache=cache) for t in range(8, len(ids))]
err = np.abs(np.concatenate(steps) - reffuse.forward(model64, ids)).max()
print(f"4. float64: max |cached - uncached| = {err:.1e}")
assert err < 1e-9

# 5. Multiply-adds per token at context length S:
#    projections q, k, v, o: d·(n_heads + 2 n_kv + n_heads)·h; scores and weighted sum: 2·n_heads·h·S;
#    FFN: 3·d·dh. Attention's S-dependent part equals the FFN when S = 3 d dh / (2 n_heads h).
d, dh = cfg.dim, model.blocks[0].ffn.width
projections = d * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * h
ffn = 3 * d * dh
S_equal = 3 * d * dh / (2 * cfg.n_heads * h)
print(f"5. per token: projections {projections:,}, FFN {ffn:,}, scores + weighted sum 2·{cfg.n_heads}·{h}·S; "
      f"attention's context part equals the FFN at S = {S_equal:.0f} tokens")
assert ffn == 3 * 576 * 1536
