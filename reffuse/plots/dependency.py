"""Figures of the dependency analysis (the paper's §3, App. B and Fig. 11), drawn from what `reffuse analyze`
records (reffuse.method.analysis.Analysis), so that `reffuse figures` can redraw them from a committed
analysis.json.

- dependency heatmap: M[i, j] on a log2 colour scale 2^-9 .. 2^-1 (the paper's Fig 3), blue weak, red strong,
  "dropped block (i)" across and "measured block (j)" down, the attention-free (removed) region in a dotted box;
- per-block metrics: cosdist(X, f(X)), ||h(X)|| / ||X||, cosdist(h(X), X) (the paper's Fig 11);
- window statistics: M_max and M_sum of every window, the greedy choices marked (the paper's Fig 7b).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from reffuse.core.layout import contiguous_ranges
from reffuse.method.analysis import Analysis
from reffuse.method.metrics import GreedyStep, WindowRow
from reffuse.method.metrics import matrix_from_json
from reffuse.plots import pyplot, save_figure
from reffuse.plots.layout import layout_figure

LOG2_RANGE = (-9, -1)  # the paper's colour bar: 2^-9 .. 2^-1
WEAK, STRONG, EXCLUDED = "tab:blue", "tab:red", "0.75"


def dependency_heatmap(matrix, title: str, attention_removed=(), ax=None, groups=()):
    """M (nested lists with None, or an array) as the paper draws it; returns the figure.

    attention_removed: the blocks without attention, each contiguous range boxed with a dotted line.
    groups: fusion groups (first, last), each boxed with a solid line."""
    plt = pyplot()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    M = matrix_from_json(matrix) if isinstance(matrix, list) else np.asarray(matrix, dtype=np.float64)
    lo, hi = 2.0 ** LOG2_RANGE[0], 2.0 ** LOG2_RANGE[1]
    image = np.clip(M.T, lo, hi)  # [j, i]: measured block down, dropped block across; NaN stays blank
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.2, 5.2))
    else:
        fig = ax.figure
    cmap = plt.get_cmap("coolwarm").with_extremes(bad="white")  # NaN (undefined entries) left blank
    shown = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, norm=LogNorm(lo, hi), origin="upper",
                      interpolation="nearest")
    ticks = [2.0 ** k for k in range(LOG2_RANGE[0], LOG2_RANGE[1] + 1)]
    bar = fig.colorbar(shown, ax=ax, ticks=ticks, extend="both")
    bar.ax.set_yticklabels([f"$2^{{{k}}}$" for k in range(LOG2_RANGE[0], LOG2_RANGE[1] + 1)])
    bar.set_label("M[i, j], cosine distance (log2 scale)")
    for first, last in contiguous_ranges(attention_removed):
        ax.add_patch(Rectangle((first - 0.5, first - 0.5), last - first + 1, last - first + 1, fill=False,
                               linestyle=":", linewidth=1.6, edgecolor="black",
                               label="attention-free blocks" if first == min(attention_removed) else None))
    for k, (first, last) in enumerate(groups):
        ax.add_patch(Rectangle((first - 0.5, first - 0.5), last - first + 1, last - first + 1, fill=False,
                               linestyle="-", linewidth=1.8, edgecolor="black",
                               label="planned fusion groups" if k == 0 else None))
    if len(attention_removed) or len(groups):
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("dropped block (i)")
    ax.set_ylabel("measured block (j)")
    ax.set_title(title)
    return fig


def block_metrics_figure(per_block, title: str, attention_free=()):
    """The three per-block metrics against the block index; attention-free blocks shaded. per_block: the
    analysis' BlockMetrics, or the Dependency measured (reffuse.method.metrics): both name the metrics alike."""
    plt = pyplot()
    # the first blocks of a trained model turn and grow the stream far more than the rest: log scales keep the
    # rest readable; cosdist(h, X) stays near 1 and is drawn linearly
    panels = [("cos_dist_x_fx", "cosdist(X, f(X))", "log"), ("norm_ratio", "||h(X)|| / ||X||", "log"),
              ("cos_dist_h_x", "cosdist(h(X), X)", "linear")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, label, scale) in zip(axes, panels):
        values = np.array([np.nan if v is None else v for v in getattr(per_block, key)], dtype=np.float64)
        blocks = np.arange(len(values))
        for first, last in contiguous_ranges(attention_free):
            ax.axvspan(first - 0.5, last + 0.5, color="0.88", zorder=0)
        ax.plot(blocks, values, "o-", markersize=3, color=STRONG)
        ax.set_yscale(scale)
        ax.set_xlabel("block")
        ax.set_ylabel(label + " (mean over tokens" + (", log scale)" if scale == "log" else ")"))
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if len(attention_free):
        axes[0].axvspan(np.nan, np.nan, color="0.88", label="attention-free blocks")
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def window_figure(windows: Sequence[WindowRow], greedy_steps: Sequence[GreedyStep], title: str, window: int,
                  eligible=None):
    """M_max and M_sum per window start, the greedy choices marked with their step number; windows the greedy
    selection could not take (eligible[b] False for one of their blocks) in grey."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.4), sharex=True)
    starts = np.array([w.first for w in windows])
    chosen = {s.first: s.step for s in greedy_steps}
    excluded = [eligible is not None and not all(eligible[w.first:w.last + 1]) for w in windows]
    colours = [STRONG if s in chosen else EXCLUDED if out else WEAK for s, out in zip(starts, excluded)]
    for ax, key, label in [(axes[0], "max", "M_max"), (axes[1], "sum", "M_sum")]:
        values = np.array([getattr(w, key) for w in windows], dtype=np.float64)
        ax.bar(starts, values, color=colours, width=0.8)
        for start, step in chosen.items():
            value = values[list(starts).index(start)]
            ax.annotate(str(step), (start, value), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(f"{label} (cosine distance)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].bar([np.nan], [np.nan], color=STRONG, label="greedy choice (step number)")
    axes[0].bar([np.nan], [np.nan], color=WEAK, label="other windows")
    if any(excluded):
        axes[0].bar([np.nan], [np.nan], color=EXCLUDED, label="not eligible for the greedy selection")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel(f"first block of the window of {window}")
    axes[0].set_title(title)
    fig.tight_layout()
    return fig


def write_analysis_figures(analysis: Analysis, folder) -> list[Path]:
    """Every figure of an analysis into `folder`; returns the paths written."""
    folder = Path(folder)
    model = analysis.model.name
    attention_free = analysis.attention_free_blocks()
    tokens = analysis.tokens.measured
    paths = []
    for granularity, matrix in analysis.dependency.by_granularity().items():
        what = "blocks" if granularity == "block" else "FFN sub-blocks"
        fig = dependency_heatmap(matrix, f"{model}: dependency between {what} ({tokens} tokens)", attention_free)
        paths.append(save_figure(fig, folder / f"dependency_{granularity}.png"))
    fig = block_metrics_figure(analysis.per_block, f"{model}: per-block metrics ({tokens} tokens)",
                               attention_free)
    paths.append(save_figure(fig, folder / "block_metrics.png"))
    windows, greedy = analysis.windows, analysis.greedy
    eligible = None
    if greedy.blocks == "full":
        eligible = [block.attention and block.ffn_width > 0 for block in analysis.model.layout]
    fig = window_figure(windows.rows, greedy.steps,
                        f"{model}: window statistics ({windows.granularity} level), greedy choices",
                        windows.length, eligible)
    paths.append(save_figure(fig, folder / "windows.png"))
    fig = layout_figure({model: analysis.model.layout}, f"{model}: block layout")
    paths.append(save_figure(fig, folder / "layout.png"))
    return paths
