"""Figures of `reffuse experiments` (reffuse.experiments.run), drawn from its JSON so they can be redrawn from the
committed reports/experiments/smollm2/experiments.json (and smollm2_regions/region-*/) without measuring again.

- fusion intensity (the paper's Table 4 as a plot): KL to the pre-fusion model and perplexity against the number
  of sequential FFN steps left in the span, for plain fusion (fold, last) and calibrated fusion; KL with its 95%
  interval over held-out windows as error bars (here and in the next figure);
- removal vs fusion (the paper's Fig 6): quality against decode latency, fusion and FFN removal at equal depth
  reductions, the pre-fusion and original models as reference points;
- ablations: the last FFN of a run (Table 5) and reversed order vs fusion (Table 6);
- full-block parallelization (Table 7): KL after each greedy step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reffuse.experiments.findings import StudyResult, by_steps
from reffuse.experiments.study import ScoredVariant, fused_name, removed_name
from reffuse.plots import pyplot, save_figure
from reffuse.plots.removal import attention_scores_figure
from reffuse.stats import paired_difference

FOLD, LAST, CALIBRATED, REMOVAL, REFERENCE = "tab:blue", "tab:orange", "tab:green", "tab:red", "black"


def kl_error(scores: ScoredVariant) -> tuple[float, float]:
    """How far the 95% interval over held-out windows of a variant's mean KL reaches below and above it
    (reffuse.stats.paired_difference), for error bars; (0, 0) where the run kept no per-prediction values."""
    if scores.per_token is None:
        return 0.0, 0.0
    windows = scores.per_token.kl
    d = paired_difference(windows, [np.zeros(len(w)) for w in windows])
    low, high = d.windows_interval_95
    return max(d.mean - low, 0.0), max(high - d.mean, 0.0)


def _errors(scores: list[ScoredVariant]) -> np.ndarray:
    return np.array([kl_error(s) for s in scores]).T  # [2, n]: below, above


def _values(variants: list[ScoredVariant], measure: str) -> list[float]:
    """Each variant's KL or perplexity (`measure`)."""
    return [s.kl if measure == "kl" else s.perplexity for s in variants]


def _span_text(result: StudyResult) -> str:
    first, last = result.span
    return f"{result.model_name}, span {first}-{last}"


def fusion_intensity_figure(result: StudyResult):
    """KL (log scale) and perplexity vs sequential FFN steps in the span, plain (fold, last) and calibrated."""
    plt = pyplot()
    rows = by_steps(result)
    length = result.span[1] - result.span[0] + 1
    steps = [r.steps for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for variants, colour, label in [([r.fold for r in rows], FOLD, "plain fusion, norm fold"),
                                    ([r.last for r in rows], LAST, "plain fusion, norm last"),
                                    ([r.calibrated for r in rows], CALIBRATED, "calibrated fusion (fold)")]:
        left.errorbar(steps, [s.kl for s in variants], yerr=_errors(variants), marker="o", capsize=3, color=colour,
                      label=label)
        right.plot([length] + steps, [result.pre_fusion.perplexity] + [s.perplexity for s in variants],
                   marker="o", color=colour, label=label)
    right.axhline(result.pre_fusion.perplexity, color=REFERENCE, linestyle="--", linewidth=0.8,
                  label="pre-fusion (attention removed)")
    right.axhline(result.original.perplexity, color=REFERENCE, linestyle=":", linewidth=0.8, label="original")
    left.set_yscale("log")
    left.set_ylabel("KL(pre-fusion || fused), nats (log scale)\nbars: 95% interval over held-out windows", fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("held-out perplexity (log scale)")
    for ax in (left, right):
        ax.set_xlabel(f"sequential FFN steps left of {length} (fewer = more fused)")
        ax.set_xticks([length] + steps)
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.suptitle(f"Fusion intensity: {_span_text(result)} fused into fewer groups")
    fig.tight_layout()
    return fig


def removal_vs_fusion_figure(result: StudyResult):
    """Quality vs decode latency: fusion (plain, calibrated) and FFN removal at equal depth reductions."""
    plt = pyplot()
    decode = result.decode
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.9))
    fused = sorted(result.intensity, key=lambda r: r.depth_reduction)
    removed = sorted(result.removal.rows, key=lambda r: r.depth_reduction)
    fused_ms = [decode[fused_name(r.steps)].ms_per_token for r in fused]
    removed_ms = [decode[removed_name(r.depth_reduction)].ms_per_token for r in removed]
    base_ms = decode["pre-fusion"].ms_per_token
    plain, calibrated, removal = [r.fold for r in fused], [r.calibrated for r in fused], [r.scores for r in removed]
    for ax, measure, label in [(left, "kl", "KL(pre-fusion || model), nats (log scale)"),
                               (right, "perplexity", "held-out perplexity (log scale)")]:
        for xs, variants, marker, colour, name in [(fused_ms, plain, "o", FOLD, "plain fusion"),
                                                   (fused_ms, calibrated, "^", CALIBRATED, "calibrated fusion"),
                                                   (removed_ms, removal, "s", REMOVAL, "FFN removal")]:
            ax.errorbar(xs, _values(variants, measure), yerr=_errors(variants) if measure == "kl" else None,
                        fmt=marker, capsize=3, color=colour, label=name)
        for xs, rows, ys, colour, below in [(fused_ms, fused, _values(plain, measure), FOLD, 3),
                                             (removed_ms, removed, _values(removal, measure), REMOVAL, -9)]:
            for ms, r, value in zip(xs, rows, ys):
                ax.annotate(f"-{r.depth_reduction}", (ms, value), textcoords="offset points", xytext=(4, below),
                            fontsize=7, color=colour)
        ax.set_xlabel("decode latency, ms per token (measured in one run)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    right.scatter([base_ms], [result.pre_fusion.perplexity], color=REFERENCE, marker="D", zorder=3,
                  label="pre-fusion")
    right.scatter([decode["original"].ms_per_token], [result.original.perplexity], color=REFERENCE,
                  marker="*", s=70, zorder=3, label="original")
    left.axvline(base_ms, color=REFERENCE, linestyle="--", linewidth=0.8, label="pre-fusion latency")
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.suptitle(f"FFN removal vs fusion at equal depth reduction (labels: FFN steps saved), {_span_text(result)}")
    fig.tight_layout()
    return fig


def ablations_figure(result: StudyResult):
    """Left: fusing with or without the run's last FFN. Right: reversed order vs fusion, per span."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = result.last_ffn
    short = {"leave out the last FFN": "without the last FFN", "leave out the first FFN": "without the first FFN",
             "the whole run, last FFN included": "the whole run"}
    labels = [f"{r.group[0]}-{r.group[1]}\n{short.get(r.label, r.label)}" for r in rows]
    left.bar(range(len(rows)), [r.scores.kl for r in rows], yerr=_errors([r.scores for r in rows]), capsize=3,
             color=[FOLD, LAST, REMOVAL][:len(rows)])
    left.set_xticks(range(len(rows)), labels, fontsize=7)
    left.set_ylabel("KL(pre-fusion || fused), nats")
    left.set_title("fused as one group: with or without the last FFN")
    spans = result.reversed
    x = range(len(spans))
    right.bar([i - 0.2 for i in x], [r.fused.kl for r in spans], width=0.4, color=FOLD, label="fused",
              yerr=_errors([r.fused for r in spans]), capsize=3)
    right.bar([i + 0.2 for i in x], [r.reversed.kl for r in spans], width=0.4, color=LAST,
              label="sequential, reversed order", yerr=_errors([r.reversed for r in spans]), capsize=3)
    right.set_xticks(list(x), [f"{r.span[0]}-{r.span[1]}" for r in spans])
    right.set_xlabel("span of attention-free blocks")
    right.set_ylabel("KL(pre-fusion || variant), nats")
    right.set_title("reversed order vs fusion")
    right.legend(fontsize=7)
    fig.suptitle(f"Ablations, {result.model_name}")
    fig.tight_layout()
    return fig


def full_block_figure(result: StudyResult):
    """Left: KL after each greedy step of full-block parallelization, against fusing 4 attention-free FFNs.
    Right: every eligible window alone, its M_max against its KL (does M predict the damage?)."""
    plt = pyplot()
    full = result.full_block
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r.steps for r in full.rows]
    left.plot(steps, [r.scores.kl for r in full.rows], marker="o", color=REMOVAL,
              label=f"windows of {full.window} whole blocks in parallel (greedy)")
    for r in full.rows:
        left.annotate(r.windows_text.split(",")[-1], (r.steps, r.scores.kl), textcoords="offset points",
                      xytext=(4, -10), fontsize=7)
    four = [r.fused.kl for r in result.reversed if r.length == full.window]
    if four:
        left.axhline(min(four), color=FOLD, linestyle="--", linewidth=0.9,
                     label=f"fusing {full.window} attention-free FFNs (best span)")
    left.set_yscale("log")
    left.set_xticks(steps)
    left.set_xlabel("greedy steps (windows parallelized, cumulative)")
    left.set_ylabel("KL(pre-fusion || model), nats (log scale)")
    left.set_title("greedy selection, cumulative")
    left.legend(fontsize=7)
    single = full.single_windows
    right.scatter([w.max for w in single], [w.kl for w in single], color=REMOVAL, s=14)
    for w in single:
        right.annotate(f"{w.first}-{w.last}", (w.max, w.kl), textcoords="offset points", xytext=(3, 2), fontsize=6)
    right.set_yscale("log")
    right.set_xlabel("M_max of the window (cosine distance)")
    right.set_ylabel("KL(pre-fusion || model), nats (log scale)")
    rho = full.rank_correlation_max_kl
    right.set_title("each window alone" + (f" (rank correlation {rho:.2f})" if rho is not None else ""))
    fig.suptitle(f"Full-block parallelization, {result.model_name}")
    fig.tight_layout()
    return fig


def write_experiment_figures(result: StudyResult, folder) -> list[Path]:
    """Every figure of the report into `folder`, under the names the report links."""
    folder, removal = Path(folder), result.attention_removal
    figures = {"fusion_intensity.png": fusion_intensity_figure(result),
               "removal_vs_fusion.png": removal_vs_fusion_figure(result),
               "ablations.png": ablations_figure(result),
               "attention_scores.png": attention_scores_figure(
                   removal.scores, removal.blocks, removal.rule, removal.joint_kl,
                   f"Attention removal scores, {result.model_name}")}
    if result.full_block.rows:
        figures["full_block.png"] = full_block_figure(result)
    return [save_figure(fig, folder / name) for name, fig in figures.items()]
