"""Removing sub-blocks: attention removal (standing in for Puzzle) and FFN removal (the paper's baseline).

FFN Fusion needs runs of attention-free blocks. The paper gets them from Puzzle, a neural architecture search
that removes about half of Llama-405B's attention layers (the paper's §4). reffuse stands in for Puzzle with
the simplest score of the same kind: the damage that removing one sub-block alone does to the model's output,

    score(i) = mean over calibration tokens t of KL( p_base(· | t) || p_without_i(· | t) )    (nats)

where p is the next-token distribution. Attention removal then drops the blocks with the lowest scores:
`cheapest(scores, count)` takes the N cheapest anywhere; `cheapest(scores, count, contiguous=True)` takes the
window of N consecutive blocks with the least SUMMED score. A sum of single-removal scores ignores how
removals interact (removing several attentions together usually hurts more than the sum says), so
`kl_from_base` of the chosen set, measured jointly, is what `reffuse fuse` and the experiments report beside it.

FFN removal is the paper's baseline against fusion (§4.2, "Removal vs fusion"): drop the least important
FFNs, by the same kind of score, inside a region (the attention-free run), and compare at equal depth reduction.
A block left with neither attention nor FFN is a no-op (DeciLM's "dummy" layer) and costs nothing.

Scores are computed on calibration text, never on the held-out text used to evaluate the result. Scoring
caches the base model's residual stream and re-runs only the blocks from the removed one on (reffuse.evaluation.prefix).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.core.layout import attention_free_runs, attention_layers, format_layers
from reffuse.core.model import Block, Model
from reffuse.evaluation.prefix import Prefix, cache_prefix, kl_from_base


def check_layers(model: Model, layers, what: str) -> list[int]:
    """Sorted, distinct block indices, each in range; `what` names them in errors ("attention to remove")."""
    n, checked = len(model.blocks), set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ReffuseError(f"{what}: {layer!r} is not a block index")
        if not 0 <= layer < n:
            raise ReffuseError(f"{what}: block {layer} is out of range: the model has blocks 0..{n - 1}")
        checked.add(int(layer))
    return sorted(checked)


def drop_attention(model: Model, blocks) -> Model:
    """A new model without the attention of `blocks` (each must have one); weights are shared, not copied."""
    layers = check_layers(model, blocks, "attention to remove")
    for layer in layers:
        if model.blocks[layer].attention is None:
            raise ReffuseError(f"block {layer} has no attention to remove; blocks with attention: "
                               f"{format_layers(attention_layers(model))}")
    new = list(model.blocks)
    for layer in layers:
        new[layer] = Block(None, new[layer].ffn, new[layer].fused_from)
    return dataclasses.replace(model, blocks=new)


def drop_ffns(model: Model, blocks) -> Model:
    """A new model without the FFN of `blocks` (each must have one and be unfused)."""
    layers = check_layers(model, blocks, "FFNs to remove")
    for layer in layers:
        if model.blocks[layer].ffn is None:
            raise ReffuseError(f"block {layer} has no FFN to remove")
    new = list(model.blocks)
    for layer in layers:
        new[layer] = Block(new[layer].attention, None, new[layer].fused_from)
    return dataclasses.replace(model, blocks=new)


def removal_scores(prefix: Prefix, replacements: dict[int, Block]) -> dict[int, float]:
    """For each block i: the mean KL(base || base with block i replaced by replacements[i]) over the prefix tokens.

    Only blocks i.. run again for candidate i: the stream entering block i is the base model's.
    """
    base, scores = prefix.model, {}
    for layer in sorted(replacements):
        blocks = list(base.blocks)
        blocks[layer] = replacements[layer]
        variant = dataclasses.replace(base, blocks=blocks)
        scores[layer] = kl_from_base(prefix, variant, layer)
    return scores


def attention_scores(model: Model, windows, layers=None, prefix: Prefix | None = None,
                     progress=None) -> dict[int, float]:
    """KL damage of removing each block's attention alone (blocks `layers`, default: all with attention)."""
    return _sub_block_scores(model, windows, "attention", layers, prefix, progress)


def ffn_scores(model: Model, windows, layers=None, prefix: Prefix | None = None, progress=None) -> dict[int, float]:
    """KL damage of removing each block's FFN alone (blocks `layers`, default: all with an FFN)."""
    return _sub_block_scores(model, windows, "ffn", layers, prefix, progress)


def _sub_block_scores(model: Model, windows, sub_block: str, layers, prefix: Prefix | None,
                      progress) -> dict[int, float]:
    """Each block's score with its `sub_block` ("attention" or "ffn") removed alone, one block at a time."""
    name = "attention" if sub_block == "attention" else "FFN"
    if layers is None:
        layers = [i for i, b in enumerate(model.blocks) if getattr(b, sub_block) is not None]
    layers = check_layers(model, layers, f"{'attention' if sub_block == 'attention' else 'FFNs'} to score")
    prefix = prefix or cache_prefix(model, windows)
    scores = {}
    for layer in layers:
        block = model.blocks[layer]
        if getattr(block, sub_block) is None:
            raise ReffuseError(f"block {layer} has no {name} to score")
        without = Block(None, block.ffn, block.fused_from) if sub_block == "attention" else \
            Block(block.attention, None, block.fused_from)
        scores.update(removal_scores(prefix, {layer: without}))
        if progress is not None:
            progress(1)
    return scores


def cheapest(scores: dict[int, float], count: int, contiguous: bool = False) -> list[int]:
    """The `count` blocks with the lowest scores; with contiguous=True, the window of `count` consecutive
    blocks (all of them scored) with the least summed score. Ties go to the earlier block."""
    _check_count(scores, count)
    if not contiguous:
        return sorted(sorted(scores, key=lambda layer: (scores[layer], layer))[:count])
    return cheapest_windows(scores, count, 1)[0]


def _check_count(scores: dict[int, float], count: int) -> None:
    if count < 1:
        raise ReffuseError(f"count {count} must be at least 1")
    if count > len(scores):
        raise ReffuseError(f"cannot take {count} blocks: only {len(scores)} are candidates "
                           f"({format_layers(scores)})")


def cheapest_windows(scores: dict[int, float], count: int, windows: int) -> list[list[int]]:
    """The `windows` windows of `count` consecutive blocks (all of them scored) with the least summed scores,
    cheapest first; they may overlap. Ties go to the earlier window."""
    _check_count(scores, count)
    ranked = sorted((sum(scores[i] for i in range(first, first + count)), first) for first in sorted(scores)
                    if all(i in scores for i in range(first, first + count)))
    if not ranked:
        raise ReffuseError(f"no {count} consecutive blocks are all candidates ({format_layers(scores)}): "
                           "ask for fewer, or drop the contiguity requirement")
    if windows > len(ranked):
        raise ReffuseError(f"{windows} windows of {count} consecutive blocks were asked for; there are "
                           f"{len(ranked)}: ask for fewer")
    return [list(range(first, first + count)) for _, first in ranked[:windows]]


def default_attention_removal(model: Model) -> list[int]:
    """Blocks n/2-1 .. 3n/4-1, a contiguous region just past the middle, where the paper's fusion regions lie too
    (Ultra: blocks 66-114 of 126); for SmolLM2's 30 blocks, 14-21."""
    n = len(model.blocks)
    return list(range(n // 2 - 1, 3 * n // 4))


def default_groups(model: Model) -> list[tuple[int, int]]:
    """The longest attention-free run, without its last block when it has three or more."""
    runs = attention_free_runs(model)
    if not runs:
        raise ReffuseError(f"{model.config.name} has no run of attention-free blocks to fuse: "
                           "remove attention first (--drop-attention FIRST-LAST)")
    first, last = max(runs, key=lambda run: run[1] - run[0])
    return [(first, last - 1 if last - first >= 2 else last)]
