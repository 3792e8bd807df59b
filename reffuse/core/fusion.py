"""FFN Fusion: a run of attention-free blocks becomes one wide SwiGLU (Theorem 3.1).

Theorem 3.1: Σ_k FFN_k(u) = FFN*(u) exactly, where FFN* stacks the blocks along the hidden dimension:

    W_gate* = [W_gate^1; ...; W_gate^n]    [Σ dh_k, d]   rows (hidden units) stacked
    W_up*   = [W_up^1;   ...; W_up^n]      [Σ dh_k, d]
    W_down* = [W_down^1, ..., W_down^n]    [d, Σ dh_k]   columns (hidden units) concatenated

It holds because silu and ⊙ act on each hidden unit on its own. Widths may differ.

What the FFNs read is a choice (the paper's eq. 5 takes η2 from the run's last block; §5.5 notes that a norm's
diagonal gain can be pushed into the module that follows it):
- norm="fold": η_k(x) = u ⊙ g_k with u = x / rms(x), and u ⊙ g_k @ W^T = u @ (W diag(g_k))^T, so each block's
  gain g_k is folded into its own gate/up input columns and the fused block normalises with unit gain.
  The fused model then equals the parallel form x + Σ_k FFN_k(η_k(x)) exactly.
- norm="last": the paper's choice, every FFN reads the last block's η. The other blocks' gains are dropped.
"""

from __future__ import annotations

import dataclasses

from reffuse.core.backend import array_module
from reffuse.core.layout import check_groups, fused_layers, steps
from reffuse.core.model import FFN, Block, Model
from reffuse.errors import ReffuseError

NORM_MODES = ("fold", "last")


def fuse_ffns(ffns: list[FFN], norm: str = "fold") -> FFN:
    """One wide FFN equal to the sum of `ffns` (Theorem 3.1), reading the input as `norm` says."""
    if norm not in NORM_MODES:
        raise ReffuseError(f"norm={norm!r} is not a fusion norm mode: use one of {', '.join(NORM_MODES)}")
    xp = array_module(ffns[0].gate)
    if norm == "fold":
        gate = xp.concatenate([f.gate * f.norm_gain for f in ffns], axis=0)  # [Σ dh, d], gain g_k scales input columns
        up = xp.concatenate([f.up * f.norm_gain for f in ffns], axis=0)      # [Σ dh, d]
        gain = xp.ones_like(ffns[0].norm_gain)
    else:
        gate = xp.concatenate([f.gate for f in ffns], axis=0)           # [Σ dh, d]
        up = xp.concatenate([f.up for f in ffns], axis=0)               # [Σ dh, d]
        gain = ffns[-1].norm_gain.copy()
    down = xp.concatenate([f.down for f in ffns], axis=1)               # [d, Σ dh]
    return FFN(norm_gain=gain, gate=gate, up=up, down=down)


def fuse(model: Model, groups, norm: str = "fold") -> Model:
    """A new model in which each run (first, last) of attention-free blocks is one fused block.

    Blocks are renumbered consecutively; a fused block stands where its run began and records the layers of the
    unfused model it replaces. The original model is left untouched.
    """
    if norm not in NORM_MODES:
        raise ReffuseError(f"norm={norm!r} is not a fusion norm mode: use one of {', '.join(NORM_MODES)}")
    blocks = []
    for first, last in steps(len(model.blocks), check_groups(model, groups)):
        if first == last:
            blocks.append(model.blocks[first])  # shared, not copied: fused models never write to weights
        else:
            ffn = fuse_ffns([b.ffn for b in model.blocks[first:last + 1]], norm)
            blocks.append(Block(attention=None, ffn=ffn, fused_from=fused_layers(model, first, last)))
    return dataclasses.replace(model, blocks=blocks)


def with_last_norm(model: Model, groups) -> Model:
    """A copy in which every block of each run reads the run's last FFN norm: the parallel form that
    norm="last" fusion equals exactly (useful to separate the fusion step from the norm choice)."""
    runs = check_groups(model, groups)
    blocks = list(model.blocks)
    for first, last in runs:
        gain = model.blocks[last].ffn.norm_gain
        for i in range(first, last):
            b = blocks[i]
            blocks[i] = Block(b.attention, FFN(gain, b.ffn.gate, b.ffn.up, b.ffn.down), b.fused_from)
    return dataclasses.replace(model, blocks=blocks)

