"""Solutions to the exercises of lecture 02 (Theorem 3.1). Run: python lectures/solutions/02_solutions.py"""

import dataclasses

import numpy as np

import reffuse
from reffuse import Block, FFN, forward, fuse_ffns, rms_norm, swiglu

tiny = reffuse.load_model("tiny", dtype="float64")
run = [b.ffn for b in tiny.blocks[4:9]]
wide = fuse_ffns(run, norm="last")
rng = np.random.default_rng(1)
d = tiny.config.dim
u = rms_norm(rng.standard_normal((16, d)), np.ones(d), tiny.config.norm_eps)   # [T, d]


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# 1. GeGLU. The proof only uses that the activation and ⊙ act on each hidden unit separately (elementwise),
#    so any elementwise activation works: GELU, ReLU, even a non-monotone one.
def gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def geglu(ffn, u):
    return (gelu(u @ ffn.gate.T) * (u @ ffn.up.T)) @ ffn.down.T   # [T, d] -> [T, d_h] -> [T, d]


err = relative_error(geglu(wide, u), sum(geglu(f, u) for f in run))
print(f"1. GeGLU: wide vs sum of five, relative error {err:.1e}")
assert err < 1e-13

# 2. Splitting the wide FFN along its hidden axis: gate/up rows and down columns of one slice form an FFN.
#    Summing the slices' outputs is the all-reduce of a row-parallel down projection (lecture 06).
bounds = np.cumsum([0, 200, 240, 200])
assert bounds[-1] == wide.width
slices = [FFN(wide.norm_gain, wide.gate[a:b], wide.up[a:b], wide.down[:, a:b]) for a, b in zip(bounds, bounds[1:])]
err = relative_error(sum(swiglu(s, u) for s in slices), swiglu(wide, u))
print(f"2. three unequal slices summed vs wide, relative error {err:.1e} (the sum is where the all-reduce goes)")
assert err < 1e-13

# 3. Error growth with n: float32 stays a small multiple of its epsilon; no systematic growth at n <= 5,
#    because the number of terms in the reduction grows only from ~100 to ~640.
for dtype in (np.float32, np.float64):
    errors = []
    for n in range(1, 6):
        run_d = [FFN(*(a.astype(dtype) for a in (f.norm_gain, f.gate, f.up, f.down))) for f in run[:n]]
        u_d = u.astype(dtype)
        errors.append(relative_error(swiglu(fuse_ffns(run_d, norm="last"), u_d), sum(swiglu(f, u_d) for f in run_d)))
    print(f"3. {np.dtype(dtype).name}: relative error for n = 1..5:", " ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < 50 * np.finfo(dtype).eps

# 4. With equal gains, dropping all but the last gain drops nothing: fold and last compute the same function.
shared_gain = tiny.blocks[8].ffn.norm_gain
blocks = list(tiny.blocks)
for i in range(4, 9):
    f = blocks[i].ffn
    blocks[i] = Block(None, FFN(shared_gain, f.gate, f.up, f.down))
same_gains = dataclasses.replace(tiny, blocks=blocks)
ids = rng.integers(0, tiny.config.vocab_size, 24)
fold = forward(reffuse.fuse(same_gains, [(4, 8)], norm="fold"), ids)
last = forward(reffuse.fuse(same_gains, [(4, 8)], norm="last"), ids)
err = relative_error(last, fold)
print(f"4. equal gains: last vs fold, relative error {err:.1e}")
assert err < 1e-12

# 5. Two blocks already differ: block 5 reads x + FFN_4(η(x)) sequentially but x in parallel. To first order
#    the gap is J_{FFN_5}(x) · FFN_4(x), large when the update FFN_4(x) is large relative to ||x||
#    (under RMSNorm the Jacobian scales as 1/||x||). Scaling block 4's down projection scales that update.
for scale in (0.1, 1.0):
    blocks = list(tiny.blocks)
    f = blocks[4].ffn
    blocks[4] = Block(None, FFN(f.norm_gain, f.gate, f.up, f.down * scale))
    scaled = dataclasses.replace(tiny, blocks=blocks)
    gap = relative_error(forward(scaled, ids, parallel_groups=[(4, 5)]), forward(scaled, ids))
    print(f"5. run (4, 5), block 4's update scaled by {scale}: parallel vs sequential gap {gap:.2e}")
    assert gap > 1e-6
