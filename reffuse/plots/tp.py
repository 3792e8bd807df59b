"""All-reduces under tensor parallelism (the paper's Fig 2 in numbers): count and time per forward, sequential vs fused.

Drawn from `reffuse tp --json` results, one group of bars per run (model and rank count). Three panels: the
all-reduces one forward makes; the time of one prefill forward; the time of one decode step. A time bar is split
into the part spent in all-reduces (communication and waiting for other ranks) and the rest (computation).
"""

from __future__ import annotations

import numpy as np

from reffuse.plots import pyplot
from reffuse.speed.tp_result import TpResult

SEQUENTIAL, FUSED = "tab:blue", "tab:orange"


def run_label(result: TpResult) -> str:
    """"tiny\nN=2 mpi" from a `reffuse tp` result (the model name up to its first " (", "." or "-")."""
    model = result.model.split(" (")[0].split(".")[0].split("-")[0]
    return f"{model}\nN={result.ranks} {result.allreduce}"


def allreduce_figure(results: list[TpResult], title: str = "All-reduces per forward under tensor parallelism"):
    """results: `reffuse tp` results. Bars: sequential vs fused for each run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    x = np.arange(len(results))
    width = 0.38
    labels = [run_label(r) for r in results]
    for offset, name, colour in ((-width / 2, "sequential", SEQUENTIAL), (width / 2, "fused", FUSED)):
        variants = [r.variants()[name] for r in results]
        counts = [v.prefill.allreduce_count for v in variants]
        bars = axes[0].bar(x + offset, counts, width, color=colour, edgecolor="black", linewidth=0.3, label=name)
        axes[0].bar_label(bars, fontsize=7)
        for ax, phase in ((axes[1], "prefill"), (axes[2], "decode")):
            records = [v.prefill if phase == "prefill" else v.decode for v in variants]
            total = np.array([np.nan if rec is None else 1e3 * rec.seconds for rec in records])
            allreduce = np.array([np.nan if rec is None else 1e3 * rec.allreduce_seconds for rec in records])
            ax.bar(x + offset, allreduce, width, color=colour, edgecolor="black", linewidth=0.3,
                   label=f"{name}: all-reduce")
            ax.bar(x + offset, total - allreduce, width, bottom=allreduce, color=colour, alpha=0.35,
                   edgecolor="black", linewidth=0.3, label=f"{name}: rest")
    axes[0].set_ylabel("all-reduces per forward")
    axes[0].set_title("syncs per forward")
    tokens = {r.tokens for r in results}
    axes[1].set_title(f"prefill ({tokens.pop()} tokens), one forward" if len(tokens) == 1 else "prefill, one forward")
    axes[2].set_title("decode, one token per forward")
    for ax in axes[1:]:
        ax.set_ylabel("time per forward (ms)")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlabel("run (model, ranks, all-reduce)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room above the tallest bar for its label
    axes[0].legend(fontsize=7, loc="upper right")
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)  # below, over no bar
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
