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
# # Lecture 04 — From attention removal to fusion: what each step costs
#
# FFN Fusion is the last step of a pipeline (the paper's §4):
#
# 1. **Attention removal.** Puzzle, a neural architecture search, removes about half of Llama-405B's attention
#    layers, leaving a run of 50 consecutive attention-free blocks. reffuse stands in for Puzzle with the
#    simplest score of the same kind: the damage (KL divergence of the next-token distribution) of removing one
#    block's attention alone (`reffuse.method.removal`).
# 2. **Fusion.** Each attention-free run, *without its last FFN*, becomes one or a few wide FFNs.
# 3. **Recovery.** The paper distils the fused model for billions of tokens. reffuse offers something far
#    cheaper that the paper does not have: **calibrated fusion**, a closed-form refit of each fused
#    down-projection on calibration text (`reffuse.method.calibrate`).
#
# The paper's baseline for step 2 is **FFN removal**: reduce the depth by the same number of sequential steps by
# dropping the least important FFNs instead. We run every step on SmolLM2 with few tokens, so everything is
# measured live; quality is always judged on **held-out** text (other plays), and everything chosen or fitted uses
# **calibration** text (other plays). The committed `reffuse experiments` report repeats this at a larger scale,
# with decode latency measured; we read its findings at the end. Runs in about ten seconds.

# %%
import json

import reffuse
from reffuse import (attention_scores, cache_prefix, calibrated_fuse, calibration_windows, cheapest,
                     drop_attention, drop_ffns, ffn_scores, held_out_windows, load_tokenizer, score_variant)
from reffuse.experiments.findings import StudyResult
from reffuse.experiments.run import RegionSummary

REPORTS = reffuse.checkout_root() / "reports"

model = reffuse.load_model("smollm2")
tokenizer = load_tokenizer("smollm2")
calibration = list(calibration_windows(tokenizer, window=64, n_tokens=128))   # 2 windows of 64 token ids
held_out = list(held_out_windows(tokenizer, window=64, n_tokens=128))

# the original model's stream on the held-out windows, cached once: each variant below re-runs only the blocks
# from its first change on (reffuse.evaluation.prefix)
judge = cache_prefix(model, held_out)


def judged(variant, first):
    """KL(original || variant) in nats per token, perplexity and top-1 agreement, on held-out text."""
    s = score_variant(judge, variant, first)
    return f"KL {s.kl_from_base:.3f}  perplexity {s.perplexity:7.2f}  top-1 agreement {s.top1_agreement:.1%}"


print("original:", judged(model, 0))

# %% [markdown]
# ## 1. Which attention can go?
#
# Score every block's attention by the KL divergence its removal alone causes on calibration text (one window of
# 32 tokens here, to stay fast), then take the contiguous window of 8 blocks with the smallest summed score
# (fusion needs *consecutive* attention-free blocks). A sum of single-removal scores ignores interactions, so we
# then judge the chosen set jointly, on held-out text.

# %%
scoring = list(calibration_windows(tokenizer, window=32, n_tokens=32))
scores = attention_scores(model, scoring)                             # block -> KL nats/token, 30 entries
region = cheapest(scores, 8, contiguous=True)
first, last = region[0], region[-1]
print("attention removal scores:", {i: round(v, 3) for i, v in scores.items()})
print(f"cheapest contiguous 8: blocks {first}-{last}, summed single scores {sum(scores[i] for i in region):.3f}")
removed = drop_attention(model, region)
print("attention removed:", judged(removed, first))

# %% [markdown]
# Removing eight attention layers of a 30-layer, 135M-parameter model is not free: small models have little
# redundancy, and no training follows here (the paper distils after Puzzle). From now on the **attention-removed
# model is the reference** for what fusion adds, and we measure KL to it.
#
# ## 2. Fusion intensity
#
# The paper fuses its 49B model's 26 FFNs into 12, 6, 3 and finally 2 layers and watches accuracy fall step by
# step (Table 4). We do the same with the 7 FFNs of our run (the run without its last FFN): into 7 (nothing
# fused), 3, 2 and 1 layers.

# %%
base_removed = cache_prefix(removed, held_out)                        # judge against the attention-removed model


def kl_to_removed(variant, first_changed):
    return score_variant(base_removed, variant, first_changed, kl_only=True).kl_from_base


plans = {7: [], 3: [(first, first + 2), (first + 3, first + 4), (first + 5, last - 1)],
         2: [(first, first + 3), (first + 4, last - 1)], 1: [(first, last - 1)]}
for layers, groups in plans.items():
    print(f"7 FFNs as {layers} layer(s) {groups}: KL to the attention-removed model "
          f"{kl_to_removed(reffuse.fuse(removed, groups), first):.3f}")

# %% [markdown]
# The damage grows quickly with the group size. In a model this small each FFN's update is a large fraction of
# the residual stream (lecture 01), and the first-order error of running $k$ FFNs in parallel grows with the
# updates accumulated inside the group (the first-order view in `docs/paper.md`). The paper's 49B and 253B models
# have far smaller per-layer updates in their fusion regions (its Fig. 11), which is why it can fuse 8–15 FFNs per
# group.
#
# ## 3. The last FFN
#
# The paper leaves each run's last FFN out of the fused groups: its ablation (§4.2) finds the last FFN the most
# sensitive, since in the sequential run it reads the largest accumulated update, which fusion withholds from it.
# Compare a group of 3 that ends just before the run's last FFN with the same-sized group that includes it:

# %%
for label, group in [("ends before the last FFN", (last - 3, last - 1)), ("includes the last FFN", (last - 2, last))]:
    print(f"fuse {group[0]}-{group[1]} ({label}): KL to the attention-removed model "
          f"{kl_to_removed(reffuse.fuse(removed, [group]), group[0]):.3f}")

# %% [markdown]
# On 128 held-out tokens the two differ by little; the committed experiments (section 6) test the paper's
# finding with more text and both of the run's ends.
#
# ## 4. FFN removal vs fusion, at equal depth
#
# Fusing a group of $k$ FFNs saves $k-1$ sequential steps (and $k-1$ all-reduces under tensor parallelism). The
# paper's baseline saves the same by *removing* the least important FFNs of the run (by the same kind of KL score,
# on calibration text). Fusing three pairs saves 3 steps; so does removing 3 FFNs:

# %%
pairs = [(first, first + 1), (first + 2, first + 3), (first + 4, first + 5)]
ffn_importance = ffn_scores(removed, scoring, layers=range(first, last + 1))
dropped = cheapest(ffn_importance, len(pairs))
fused_pairs = reffuse.fuse(removed, pairs)
print(f"fusion of 3 pairs (saves 3 steps):    KL to the attention-removed model "
      f"{kl_to_removed(fused_pairs, first):.3f}")
print(f"removal of FFNs {dropped} (saves 3 steps): KL to the attention-removed model "
      f"{kl_to_removed(drop_ffns(removed, dropped), first):.3f}")

# %% [markdown]
# The paper found fusion *better* than removal at equal latency on its 49B model (Fig. 6). A 135M model without any
# training need not agree: when we wrote this lecture, removing the least important FFNs was ahead of plain
# fusion of pairs here. Small models' FFN updates are large (section 2), so parallel execution costs more, while
# some FFNs of the region contribute little and can go. The next step changes the picture.
#
# ## 5. Calibrated fusion
#
# Plain fusion replaces the run's sequential update by the parallel one and nothing corrects it. Calibration
# keeps the fused gate and up projections and refits only each fused down-projection $W^*$ by ridge least
# squares, so that on calibration text the fused block's update matches the sequential run's (the docstring of
# `reffuse.method.calibrate` has the equations). It is one linear solve per group — seconds, not GPU-days — and it is
# judged, like everything here, on held-out text it never saw. (With 128 calibration tokens and 3072 hidden units
# per pair, the fit can match its own text almost exactly; the ridge keeps the solution near plain fusion, and
# the held-out KL is the honest test.)

# %%
calibrated, fits = calibrated_fuse(removed, pairs, calibration)
for fit in fits:
    print(f"group {fit.group}: relative fit error on calibration text {fit.fit_error_plain:.2e} -> "
          f"{fit.fit_error_calibrated:.2e} ({fit.tokens} tokens)")
plain_kl, calibrated_kl = kl_to_removed(fused_pairs, first), kl_to_removed(calibrated, first)
print(f"held-out KL to the attention-removed model: plain {plain_kl:.3f}, calibrated {calibrated_kl:.3f} "
      f"({1 - calibrated_kl / plain_kl:.0%} of the fusion gap closed)")
print("calibrated, against the original:", judged(calibrated, first))

# %% [markdown]
# ## 6. At larger scale: the committed experiments
#
# `reffuse experiments` runs the paper's experiments (a)–(h), and three of reffuse's own (i)–(k), on SmolLM2 with
# more text, measures decode latency in the same run, and writes a report that says finding by finding whether the
# paper's observation held here. Every comparison is a paired difference over the same held-out predictions with
# 95% intervals, and counts only when they exclude 0. The main committed run judges region 1 on 16,384 held-out
# tokens; a second repeats the whole study on the four cheapest attention-removal regions, which overlap, on 2,048. The
# verdicts of each region:

# %%
regions = REPORTS / "experiments" / "smollm2_regions" / "regions.json"       # reffuse experiments --regions 4
summary = RegionSummary.from_json(json.loads(regions.read_text()))
print(f"{summary.command}\n")
for region in summary.regions:
    print(f"region {region.rank}, attention removed {region.attention_removed}: "
          + ", ".join(f"({finding}) {verdict}" for finding, verdict in region.verdicts.items()))
first = StudyResult.from_json(json.loads((REPORTS / "experiments" / "smollm2" / "experiments.json").read_text()))
print(f"\n{first.command}: region 1 on {first.texts.held_out.tokens} held-out tokens, in full:")
for verdict in first.verdicts:
    print(f"({verdict.finding}) {verdict.title}: {verdict.verdict}\n    here: {verdict.here}")

# %% [markdown]
# The reports, with every number and the rule behind each verdict, are `reports/experiments/smollm2/README.md`
# (the main run) and `reports/experiments/smollm2_regions/` (the table across regions, and `region-k/README.md`);
# `figures/removal_vs_fusion.png` is the paper's accuracy-vs-latency plot at this scale (the main run).

# %% [markdown]
# ## Exercises
#
# 1. **Scores vs joint damage.** For the chosen region, compare the sum of the single-removal scores with the KL
#    of removing all eight attentions together (on calibration text). Is removal damage additive?
# 2. **Fusion intensity.** Fuse the 7 FFNs as 4 layers (three pairs and one single FFN) and place the result in
#    section 2's table. Plot KL against the number of layers left.
# 3. **fold vs last.** Repeat section 2's first case with `norm="last"`. How much worse is it here?
# 4. **Reverse order.** The paper finds that running the run's FFNs in *reverse* order is about as good as fusing
#    them (Table 6). Build the reversed model (blocks of the group in reverse order) and compare its KL with
#    fusion's.
# 5. **The ridge.** Calibrate with `ridge` 1e-4, 1e-2 and 1 and compare held-out KL. Which way does a small
#    ridge fail, and why is the ridge chosen on calibration text only?
#
# Solutions: `lectures/solutions/04_solutions.py` (run it: `python lectures/solutions/04_solutions.py`).
