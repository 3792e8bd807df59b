"""The pipeline's outcome (`reffuse demo`): quality and speed of the original, attention-removed and fused models.

Drawn from the demo's result (reffuse.experiments.demo_result.DemoResult): its quality rows (perplexity, KL to the
original on held-out text; a synthetic model has none) and its speed rows (decode tokens/s, all models timed in one
run).
"""

from __future__ import annotations

from pathlib import Path

from reffuse.core.layout import blocks_from_json, format_groups
from reffuse.experiments.demo_result import CALIBRATED, FUSED, HEALED, ORIGINAL, REMOVED, DemoResult
from reffuse.plots import pyplot, save_figure
from reffuse.speed.timing import ratio_text

COLOURS = {ORIGINAL: "black", REMOVED: "tab:red", FUSED: "tab:blue", CALIBRATED: "tab:green", HEALED: "tab:purple"}


def _labelled_bars(ax, names, heights, labels) -> None:
    bars = ax.bar(range(len(names)), heights, color=[COLOURS.get(n, "0.5") for n in names])
    for bar, label in zip(bars, labels):
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)


def pipeline_summary_figure(result: DemoResult):
    """Left: KL to the original (bars) with perplexity written on them. Right: decode tokens/s."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if result.quality is not None:
        quality = result.quality.models
        names = [n for n in quality if n != ORIGINAL]
        _labelled_bars(left, names, [quality[n].kl_vs_original for n in names],
                       [f"ppl {quality[n].perplexity:.4g}" for n in names])
        left.set_ylabel("KL(original || model), nats")
        left.set_title(f"held-out quality (original perplexity {quality[ORIGINAL].perplexity:.4g})")
    else:
        left.axis("off")
        left.text(0.5, 0.5, "quality left out: a synthetic model has random\nweights and reads random ids, so its "
                  "perplexity\nand KL measure nothing", ha="center", va="center", fontsize=9)
    decode = result.speed.decode
    _labelled_bars(right, list(decode), [d.tokens_per_second for d in decode.values()],
                   [f"{d.tokens_per_second:.1f}/s\n{ratio_text(d.speedup, d.speedup_interval_95)}"
                    for d in decode.values()])
    right.set_ylabel("decode tokens per second")
    right.set_title("decode with the KV cache; on each bar: tokens/s, and the speedup over the original\n"
                    "(the ratio of median times, with its 95% interval)")
    fig.suptitle(f"Attention removal and FFN Fusion on {result.model_name}")
    fig.tight_layout()
    return fig


def write_demo_figures(result: DemoResult, folder: Path) -> list[Path]:
    """The demo's figures, drawn from its result, written to `folder`."""
    from reffuse.plots.dependency import dependency_heatmap
    from reffuse.plots.layout import layout_figure
    from reffuse.plots.removal import attention_scores_figure

    name = result.model_name
    layouts = {f"{name} as loaded": result.layout_before, REMOVED: result.layout_removed,
               f"fused ({result.norm}): {format_groups(result.groups)}": result.layout_after}
    figures = {"layout.png": layout_figure({label: blocks_from_json(rows, f"the demo's layout {label}")
                                            for label, rows in layouts.items()},
                                           "Block layout before and after fusion"),
               "quality_speed.png": pipeline_summary_figure(result)}
    removal = result.attention_removal
    if removal and removal.scores:
        figures["attention_scores.png"] = attention_scores_figure(
            removal.scores, removal.blocks, removal.rule, removal.joint_kl, f"Attention removal scores, {name}")
    dependency = result.ffn_dependency
    matrix = dependency.matrix
    measured = 1 + max(i for i, row in enumerate(matrix) if any(v is not None for v in row[i + 1:]))
    matrix = [row[:measured + 1] for row in matrix[:measured + 1]]  # blocks 0..measured (the rest not run)
    figures["ffn_dependency.png"] = dependency_heatmap(
        matrix, f"{name}: FFN-level dependency, attention removed ({dependency.tokens} tokens)",
        result.attention_free_blocks(), groups=result.groups)
    return [save_figure(fig, folder / file) for file, fig in figures.items()]
