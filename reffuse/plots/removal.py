"""Attention removal (reffuse.method.removal): each block's single-removal score, the blocks chosen marked.

Drawn from the attention removal that `reffuse demo` and `experiments` record
(reffuse.method.pipeline.choose_attention_removal): the scores, the blocks chosen, the rule and the joint KL.
"""

from __future__ import annotations

from reffuse.plots import pyplot

CHOSEN, KEPT = "tab:red", "0.6"


def attention_scores_figure(scores: dict, removed, rule: str, joint_kl: float, title: str):
    """Bars of KL(base || without block i's attention) per block (`scores`: block, or its text, -> KL), log scale;
    the `removed` blocks in red."""
    plt = pyplot()
    scores = {int(k): v for k, v in scores.items()}
    blocks = sorted(scores)
    chosen = set(removed)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    colours = [CHOSEN if b in chosen else KEPT for b in blocks]
    ax.bar(blocks, [scores[b] for b in blocks], color=colours, width=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("KL when removed alone (nats, log scale)")
    ax.set_xticks(blocks)
    ax.tick_params(axis="x", labelsize=7)
    ax.bar([float("nan")], [float("nan")], color=CHOSEN,
           label=f"removed ({rule}); jointly {joint_kl:.3g} nats")
    ax.bar([float("nan")], [float("nan")], color=KEPT, label="kept")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    return fig
