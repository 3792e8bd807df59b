"""Solutions to the exercises of lecture 03 (dependency metrics). Run: python lectures/solutions/03_solutions.py"""

import json
from pathlib import Path

import numpy as np

import reffuse
from reffuse.method import metrics
from reffuse.method.analysis import Analysis
from reffuse import calibration_windows, drop_attention, load_tokenizer, propose_groups

model = reffuse.load_model("smollm2")
tokenizer = load_tokenizer("smollm2")
two_windows = list(calibration_windows(tokenizer, window=32, n_tokens=64))    # the lecture's window, and the next

# 1. M[i, j] is defined for j > i only; a "global sink" is a measured block j that depends on many earlier ones.
first = metrics.dependency(model, two_windows[:1], granularities=("block",))
M = first.matrices["block"]
assert np.all(np.isnan(M[np.tril_indices(len(M))]))
dependence_on_earlier = np.array([np.nanmean(M[:j, j]) for j in range(1, len(M))])   # [29], j = 1..29
sink = 1 + int(np.argmax(dependence_on_earlier))
print(f"1. M is NaN on and below the diagonal; block {sink} depends most on earlier blocks "
      f"(mean M[:, {sink}] = {dependence_on_earlier[sink - 1]:.3f})")

# 2. With the first token measured, ||h|| / ||X|| changes: the sink token sits at a huge norm that its updates
#    barely move, so its ratio is tiny in the middle blocks and it pulls the mean down (or, in the first blocks
#    that create it, far up).
with_sink = metrics.dependency(model, two_windows[:1], exclude_sink=False, granularities=("block",))
change = with_sink.norm_ratio - first.norm_ratio
print("2. ||h||/||X|| with minus without the sink token, blocks 0..29:", np.round(change, 3))
assert np.abs(change).max() > 1e-3

# 3. Noise between two windows of 32 tokens.
second = metrics.dependency(model, two_windows[1:], granularities=("block",)).matrices["block"]
both = np.isfinite(M) & np.isfinite(second)
r = np.corrcoef(np.log2(M[both]), np.log2(second[both]))[0, 1]
print(f"3. correlation of log2 M between two windows of 32 tokens: {r:.3f}")
assert r > 0.5

# 4. Greedy with windows of 3 on the committed 512-token matrix.
analysis_path = Path(__file__).resolve().parents[2] / "reports" / "analysis" / "smollm2" / "analysis.json"
analysis = Analysis.from_json(json.loads(analysis_path.read_text()))
M_512 = analysis.dependency.block
threes = metrics.greedy_windows(M_512, window=3, eligible=reffuse.full_blocks(model), max_steps=3)
fours = metrics.greedy_windows(M_512, window=4, eligible=reffuse.full_blocks(model), max_steps=3)
print("4. windows of 3:", [(s.first, s.last) for s in threes], " windows of 4:", [(s.first, s.last) for s in fours])
assert len(threes) == 3

# 5. Another attention-free region: 20-27.
for region in (range(14, 22), range(20, 28)):
    removed = drop_attention(model, region)
    ffn_M = metrics.dependency(removed, two_windows[:1], granularities=("ffn",)).matrices["ffn"]
    n = len(region)
    inside = ffn_M[region.start:region.stop, region.start:region.stop][np.triu(np.ones((n, n), dtype=bool), k=1)]
    plan = propose_groups(removed, ffn_M, max_group_size=4)
    print(f"5. attention removed in {region.start}-{region.stop - 1}: median FFN-level M inside "
          f"{np.median(inside):.3f}, proposed groups {plan.groups}")
    assert plan.groups
