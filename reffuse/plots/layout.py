"""The block layout (the paper's Fig 9): per block, whether it has attention and how wide its FFN is.

Drawn from a model's blocks (`reffuse.layout(model).blocks`, reffuse.core.layout.BlockLayout), one panel per
model, so a layout before and after fusion can be compared.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reffuse.core.layout import BlockLayout
from reffuse.plots import pyplot

ATTENTION, NO_ATTENTION, FUSED = "tab:red", "0.8", "tab:purple"


def layout_figure(layouts: dict[str, Sequence[BlockLayout]], title: str):
    """layouts: label -> the blocks of a model. Bars are FFN widths, coloured by whether the block has attention
    (purple: a fused block)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(layouts), 1, figsize=(9, 2.4 * len(layouts) + 0.6), squeeze=False)
    for ax, (label, blocks) in zip(axes[:, 0], layouts.items()):
        widths = np.array([b.ffn_width for b in blocks])
        colours = [FUSED if len(b.fused_from) > 1 else ATTENTION if b.attention else NO_ATTENTION for b in blocks]
        ax.bar(np.arange(len(blocks)), widths, color=colours, width=0.8, edgecolor="black", linewidth=0.3)
        ax.set_ylabel("FFN width (hidden units)")
        ax.set_xlabel("block")
        ax.set_title(label)
        ax.set_xlim(-0.7, len(blocks) - 0.3)
        for colour, name in [(ATTENTION, "attention + FFN"), (NO_ATTENTION, "FFN only (attention removed)"),
                             (FUSED, "fused FFNs")]:
            if colour in colours:
                ax.bar([np.nan], [np.nan], color=colour, edgecolor="black", linewidth=0.3, label=name)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    return fig
