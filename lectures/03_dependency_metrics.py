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
# # Lecture 03 — Which blocks depend on which? Dependency metrics on SmolLM2
#
# Running blocks in parallel (eq. 5) is exact only when no block of the group needs the output of another. The
# paper measures how much they do with the **block-wise dependency matrix** (the paper's §3):
#
# * $h^j(X) = f_j(x_j) - x_j$ is block $j$'s **contribution**, its update of the residual stream;
# * $\tilde h^j_i(X)$ is block $j$'s contribution when block $i$ is **skipped** ($x_{i+1} = x_i$);
# * $M_{ij} = \mathrm{CosineDist}\big(h^j(X), \tilde h^j_i(X)\big)$ for $j > i$: how much block $j$'s update
#   changes direction when block $i$ is not there. Small means $j$ barely notices $i$.
#
# The paper does not say how it averages over tokens; `reffuse.method.metrics` takes the cosine distance per token and
# then the mean, leaves out the first token (the *attention sink*, see its docstring), and records these choices
# in its `DEFINITIONS`. We compute $M$ for SmolLM2, read the heatmap the way the paper does, look at the
# per-block metrics of §5.5, run the greedy window selection of App. B, and then ask the question that matters:
# **does $M$ predict what running blocks in parallel costs?**
#
# Measuring $M$ costs $m(m-1)/2$ block evaluations per sequence. To stay fast we compute it live on one window of
# 32 tokens, and compare with the committed analysis on 512 tokens (`reffuse analyze`, in `reports/`).
# Runs in about ten seconds once SmolLM2 is in the cache.

# %%
import json

import numpy as np

import reffuse
from reffuse.method import metrics
from reffuse.method.analysis import Analysis
from reffuse import (cache_prefix, calibration_windows, drop_attention, held_out_windows, inside_dependency,
                     kl_from_base, load_tokenizer, propose_groups)
from reffuse.plots import show
from reffuse.plots.dependency import block_metrics_figure, dependency_heatmap, window_figure

REPORTS = reffuse.checkout_root() / "reports"




for name, text in metrics.DEFINITIONS.items():
    print(f"{name:16s} {text}")

# %% [markdown]
# ## 1. The matrix, live, on 32 tokens
#
# Text for measuring comes from the *calibration* plays (Macbeth first); the *held-out* texts (eight other plays
# and the Sonnets) are kept for judging results (`reffuse.formats.corpus` fixes the split).

# %%
model = reffuse.load_model("smollm2")
tokenizer = load_tokenizer("smollm2")
calibration = calibration_windows(tokenizer, window=32, n_tokens=32)       # one window of 32 token ids
print(calibration.describe())

measured = metrics.dependency(model, list(calibration), granularities=("block",))
M = measured.matrices["block"]                                             # [30, 30], NaN where j <= i
print(f"{measured.tokens_measured} tokens measured, {measured.block_evaluations} block evaluations")
show(dependency_heatmap(M, f"SmolLM2: dependency between blocks ({measured.tokens_measured} tokens)"))

# %% [markdown]
# How to read it (the paper's Fig. 3 layout): a column is the block that was **dropped** ($i$), a row the block
# that was **measured** ($j$), so only the lower triangle holds values. Blue is weak dependency ($2^{-9}$), red
# strong ($2^{-1}$).
#
# * A **red column** is a block everyone after it depends on. As in the paper's models, the earliest blocks are
#   such blocks: dropping them changes what every later block does.
# * A **red band just below the diagonal** is a block relying on its immediate predecessor.
# * Blue stretches away from the diagonal are groups of blocks that hardly depend on each other — candidates for
#   running in parallel.
#
# The average dependency *on* each dropped block, i.e. how much the rest of the model relies on it:

# %%
reliance = np.nanmean(M[:-1], axis=1)                                       # mean over j > i, for i = 0..28
order = np.argsort(reliance)[::-1]
print("most relied-on blocks:", [(int(i), round(float(reliance[i]), 3)) for i in order[:5]])
print("least relied-on blocks:", [(int(i), round(float(reliance[i]), 3)) for i in order[-5:]])

# %% [markdown]
# ## 2. Is 32 tokens enough? The committed analysis on 512 tokens
#
# `reffuse analyze --model smollm2` measures the same matrix on 512 calibration tokens; its JSON is committed.
# If the live matrix shows the same structure, the two should be strongly correlated (on a log scale, as the
# heatmap is drawn):

# %%
analysis_path = REPORTS / "analysis" / "smollm2" / "analysis.json"       # reffuse analyze --model smollm2
analysis = Analysis.from_json(json.loads(analysis_path.read_text()))
M_512 = analysis.dependency.block                                         # [30, 30], NaN where j <= i
print(f"{analysis_path}: {analysis.tokens.measured} tokens measured")

both = np.isfinite(M) & np.isfinite(M_512)
r = np.corrcoef(np.log2(M[both]), np.log2(M_512[both]))[0, 1]
print(f"correlation of log2 M, 32 vs {analysis.tokens.measured} tokens: {r:.3f}")

# %% [markdown]
# ## 3. Per-block metrics (the paper's §5.5, Fig. 11)
#
# Three numbers per block, on the unmodified model: how much the block turns the token's direction,
# cosdist$(X, f(X))$; how large its update is next to the stream, $\lVert h(X)\rVert / \lVert X\rVert$; and the
# angle between update and stream, cosdist$(h(X), X)$ — the paper reports ≈ 0.95 everywhere, i.e. updates nearly
# orthogonal to the stream. The paper's fusion regions are low on the first two.

# %%
show(block_metrics_figure(measured, f"SmolLM2: per-block metrics ({measured.tokens_measured} tokens)"))
print("cosdist(h(X), X), blocks 1..29: median %.2f" % np.median(measured.cos_dist_h_x[1:]))

# %% [markdown]
# ## 4. Windows and the greedy selection (App. B)
#
# For full-block parallelization the paper slides a window of 4 blocks along the model and summarises the
# $4\times4$ submatrix by its largest entry $M_{\max}$ and its sum $M_{\text{sum}}$. The greedy selection takes
# the window with the lowest $M_{\max}$ (ties by $M_{\text{sum}}$), removes overlapping windows, and repeats.
# We use the 512-token matrix here, since the selection is sensitive to noise: `reffuse analyze` ran both on it,
# `metrics.window_statistics(M_512, window=4)` and `metrics.greedy_windows(M_512, window=4,
# eligible=reffuse.full_blocks(model))`, and its analysis records what they found.

# %%
windows, steps = analysis.windows.rows, analysis.greedy.steps
for s in steps[:4]:
    print(f"step {s.step}: blocks {s.first}-{s.last}  M_max {s.max:.3f}  M_sum {s.sum:.3f}")
show(window_figure(windows, steps, "SmolLM2: window statistics (512 tokens), greedy choices", 4))

# %% [markdown]
# ## 5. After attention removal: the FFN-level matrix
#
# FFN Fusion works on runs of attention-free blocks. Lecture 04 chooses which attention to remove; here we take
# blocks 14–21 (the region `reffuse tp` uses) and measure the dependency between their FFNs only
# (`granularities=("ffn",)`: only FFN sub-blocks are skipped and measured). Then `reffuse.method.planning` proposes
# groups: inside the run, without its last block, at most 4 per group, cut where the dependency crossing the cut
# is largest.

# %%
removed = drop_attention(model, range(14, 22))
ffn_level = metrics.dependency(removed, list(calibration), granularities=("ffn",)).matrices["ffn"]
inside = ffn_level[14:22, 14:22][np.triu(np.ones((8, 8), dtype=bool), k=1)]
print(f"FFN-level M inside blocks 14-21: median {np.median(inside):.3f}; "
      f"elsewhere: median {np.nanmedian(ffn_level):.3f}")
plan = propose_groups(removed, ffn_level, max_group_size=4)
print("proposed groups:", plan.groups)
show(dependency_heatmap(ffn_level, "SmolLM2, attention removed in 14-21: FFN-level dependency", range(14, 22)))

# %% [markdown]
# ## 6. What does M predict?
#
# The metric is only useful if it predicts the damage. For every pair of neighbouring blocks of the run, and for
# every window of 4, we run them in parallel (`reffuse.fuse`, exact for the parallel form) and measure the KL
# divergence from the sequential attention-removed model on **held-out** text (the opening of two held-out plays),
# scoring only the blocks that changed (`reffuse.evaluation.prefix` caches the stream before them). Then we
# compare the rank order of the damage with the rank order of the dependency left inside the group,
# $\sum_{i<j} M_{ij}$.

# %%
held_out = held_out_windows(tokenizer, window=64, n_tokens=128)
prefix = cache_prefix(removed, list(held_out))


def rank(values):
    return np.argsort(np.argsort(values))


for size in (2, 4):
    groups = [(first, first + size - 1) for first in range(14, 22 - size + 1)]
    predicted = [inside_dependency(ffn_level, a, b) for a, b in groups]
    damage = [kl_from_base(prefix, reffuse.fuse(removed, [(a, b)]), a) for a, b in groups]
    spearman = np.corrcoef(rank(predicted), rank(damage))[0, 1]
    print(f"groups of {size}: Spearman rank correlation of dependency inside vs KL = {spearman:+.2f}")
    for (a, b), p, d in zip(groups, predicted, damage):
        print(f"   blocks {a}-{b}: Σ M inside {p:.3f}   KL {d:.4f} nats/token")

# %% [markdown]
# At this small scale the answer is sobering, and the numbers above are what this run found: the dependency left
# inside a group predicts the damage of parallelizing it only weakly. The damage grows towards the end of the run,
# where the blocks' updates are larger relative to the stream — and $M$, a cosine distance, ignores magnitudes by
# design. That is why the paper also looks at $\lVert h(X)\rVert / \lVert X\rVert$ (§5.5), why it chooses fusion
# regions by eye rather than by a threshold on $M$, and why lecture 04 measures the damage directly. reffuse's
# planner does the same: `reffuse fuse --plan auto` fuses each neighbouring pair alone, scores its KL on
# calibration text, and cuts the run at the costliest pairs (`reffuse.method.planning`). Over the four
# attention-removal regions of the committed experiments that "neighbour damage" ranks the damage of every group
# better than $M$ does, by a margin whose 95% interval excludes zero (`reffuse.method.predictors`).

# %% [markdown]
# ## Exercises
#
# 1. **Row or column?** Check on `M` that $M_{ij}$ is NaN for $j \le i$, and find the block $j$ whose
#    contribution depends most, on average, on all earlier blocks (a "global sink" in the paper's words).
# 2. **The attention sink.** Recompute the live matrix with `exclude_sink=False` and compare the per-block
#    $\lVert h(X)\rVert / \lVert X\rVert$ with and without the first token. Why does the first token distort it?
# 3. **Noise.** Split the 512-token picture into halves: compute the live matrix on a second window of 32
#    calibration tokens and report the correlation of log2 M between the two windows.
# 4. **Greedy by hand.** Apply the greedy selection with a window of 3 to `M_512` and list the first three
#    windows. Do they overlap the paper-style choice with windows of 4?
# 5. **Another region.** Remove attention in blocks 20–27 instead, propose groups of at most 4, and compare the
#    median FFN-level dependency inside the run with blocks 14–21.
#
# Solutions: `lectures/solutions/03_solutions.py` (run it: `python lectures/solutions/03_solutions.py`).
#
# **Graded: one entry of M.** Write `dependency_entry` in `lectures/exercises/student.py`;
# `python -m pytest lectures/exercises/test_03_dependency_metrics.py` grades every entry against
# `reffuse.method.metrics.dependency` (`docs/course.md`).
