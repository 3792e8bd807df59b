"""Model layouts the cost model knows by name: SmolLM2, tiny, Llama-3.1-405B and the paper's Ultra-253B before and
after fusion, or the layout of any model reffuse can load."""

from __future__ import annotations

import dataclasses
import os

from reffuse.core.layout import BlockLayout, Layout, attention_free_runs, check_groups, fuse_layout
from reffuse.core.model import Model
from reffuse.core.tiny import build_tiny
from reffuse.errors import ReffuseError


# ---------------------------------------------------------------------------------------------------------------
# Layouts (reffuse.core.layout): what the cost model needs to know about a model


def layout_from_model(model: Model, fusion_groups=None, name: str | None = None) -> Layout:
    """The layout of a reffuse Model (fused or not), with the runs its fused variant fuses: by default, each
    attention-free run of 3 or more blocks without its last block (the paper leaves a run's last FFN alone, §4)."""
    layout = dataclasses.replace(model.layout(), name=name or model.config.name)
    groups = default_fusion_groups(layout) if fusion_groups is None else fusion_groups
    return dataclasses.replace(layout, fusion_groups=tuple(check_groups(layout, groups)))


def default_fusion_groups(layout: Layout) -> tuple[tuple[int, int], ...]:
    """Each attention-free run of at least 3 blocks, without its last block."""
    return tuple((first, last - 1) for first, last in attention_free_runs(layout) if last - first >= 2)


# ---------------------------------------------------------------------------------------------------------------
# Model presets


def _blocks(runs) -> tuple[BlockLayout, ...]:
    """Blocks from runs (count, attention, FFN width)."""
    return tuple(BlockLayout(attention, width) for count, attention, width in runs for _ in range(count))


def smollm2_layout() -> Layout:
    """SmolLM2-135M (the GGUF reffuse runs): 30 full blocks, d 576, FFN 1536, 9 heads / 3 kv."""
    return Layout("smollm2", dim=576, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152, tie_embeddings=True,
                  blocks=_blocks([(30, True, 1536)]), source="SmolLM2-135M-Instruct GGUF metadata")


def llama_405b_layout() -> Layout:
    """Llama-3.1-405B: 126 full blocks, d 16384, FFN 53248, 128 query heads / 8 kv heads of 128, vocab 128256."""
    return Layout("llama-3.1-405b", dim=16384, n_heads=128, n_kv_heads=8, head_dim=128, vocab_size=128256,
                  tie_embeddings=False, blocks=_blocks([(126, True, 53248)]),
                  source="meta-llama/Llama-3.1-405B config.json (the parent of Ultra-253B, the paper's §4)")


def deci_ffn_width(ffn_mult: float, dim: int = 16384) -> int:
    """DeciLM's FFN width for a multiplier: int(2/3 · mult · d) rounded up to a multiple of 256 (4.875 -> 53248)."""
    width = int(2 * ffn_mult * dim / 3)
    return -(-width // 256) * 256


# The four fusion groups of Ultra-253B (the paper's §4) and the width of each fused FFN, as ffn_mult in the
# released config (huggingface.co/nvidia/Llama-3_1-Nemotron-Ultra-253B-v1, config.json, block_configs).
ULTRA_FUSION_GROUPS = ((66, 73), (74, 85), (86, 100), (101, 114))
ULTRA_FUSED_MULTS = (36.5625, 39.0, 31.40625, 27.5625)

# Each group's per-layer multipliers before fusion. ASSUMPTION: the paper does not publish them. These are the
# most nearly equal split, among DeciLM's multipliers (multiples of 0.4875 up to 4.875), that sums to the
# released fused width exactly; the order within a group is ours. The cost model depends only on the sums.
ULTRA_GROUP_MULTS = (
    (2.4375,) + (4.875,) * 7,                # 66..73,   8 layers -> 36.5625
    (2.4375,) * 8 + (4.875,) * 4,            # 74..85,  12 layers -> 39.0
    (1.95,) * 11 + (2.4375,) * 4,            # 86..100, 15 layers -> 31.40625 (by width: 343040)
    (1.95,) * 14,                            # 101..114, 14 layers -> 27.5625 (by width: 301056)
)

# Layers 0..65 and 115..125 of the pre-fusion model as runs (count, attention, ffn_mult), read off the released
# config's 162 block_configs: dropping its 82 placeholder blocks (attention and FFN both no_op) leaves 80 blocks,
# of which 66 precede the first fused FFN (so the attention-free run starts at layer 66, as the paper says),
# then the 4 fused FFNs, then 10 more. One placeholder must stand for a layer of the paper's 126 whose attention
# and FFN were both removed; ASSUMPTION: the lone placeholder among the last layers (released block 154), which
# makes layer 118 empty. An empty block costs nothing here, so this choice changes no number.
ULTRA_HEAD_RUNS = [(1, True, 0.4875), (1, True, 0.975), (6, True, 1.4625), (4, True, 1.95), (2, True, 4.875),
                   (3, True, 4.875), (3, True, 4.875), (1, True, 2.4375), (3, True, 1.95), (1, False, 1.95),
                   (1, True, 4.875), (1, False, 4.875), (17, True, 4.875), (3, True, 3.4125), (1, True, 2.925),
                   (3, True, 2.4375), (2, False, 2.4375), (1, True, 2.4375), (7, False, 2.4375), (1, True, 2.4375),
                   (1, True, 2.925), (1, True, 4.875), (1, False, 4.875), (1, True, 4.875)]       # layers 0..65
ULTRA_TAIL_RUNS = [(1, False, 1.95), (1, True, 1.95), (1, True, 2.4375), (1, False, None), (2, True, 2.4375),
                   (1, True, 3.4125), (3, True, 4.875), (1, True, 2.4375)]                         # layers 115..125


def ultra_prefusion_layout() -> Layout:
    """The paper's 253B PreFusion model (126 blocks), reconstructed from the released fused config."""
    def runs(spec):
        return [(count, attention, deci_ffn_width(mult) if mult else 0) for count, attention, mult in spec]

    middle = [(1, False, deci_ffn_width(m)) for group in ULTRA_GROUP_MULTS for m in group]         # layers 66..114
    blocks = _blocks(runs(ULTRA_HEAD_RUNS)) + _blocks(middle) + _blocks(runs(ULTRA_TAIL_RUNS))
    return Layout("ultra-253b-prefusion", dim=16384, n_heads=128, n_kv_heads=8, head_dim=128, vocab_size=128256,
                  tie_embeddings=False, blocks=blocks, fusion_groups=ULTRA_FUSION_GROUPS,
                  source="huggingface.co/nvidia/Llama-3_1-Nemotron-Ultra-253B-v1 config.json, un-fused into the "
                         "paper's 126 layers (the paper's §4)",
                  assumptions=(
                      "Every attention that Puzzle kept has 128 query heads and 8 kv heads (n_heads_in_group 16 "
                      "in every active block of the released config).",
                      "Layers 0..65 and 115..125 are the released config's blocks in order, placeholders "
                      "dropped; layer 118 is taken to be a block with attention and FFN both removed.",
                      "The per-layer FFN widths inside each fused group are not published: we use the most nearly "
                      "equal split into DeciLM widths that sums to the released fused width exactly ("
                      + ", ".join(f"{len(g)} layers -> {m}" for g, m in zip(ULTRA_GROUP_MULTS, ULTRA_FUSED_MULTS))
                      + ").",
                      "Parameter count: the layout gives ~250.2e9, ~1% under the published '253B'; the "
                      "released config's shapes give the same count, so the gap is in the name, not the layout.",
                  ))


def ultra_fused_layout() -> Layout:
    """Ultra-253B after FFN Fusion: the pre-fusion layout with [66,73], [74,85], [86,100], [101,114] fused."""
    prefusion = ultra_prefusion_layout()
    return dataclasses.replace(fuse_layout(prefusion), name="ultra-253b-fused",
                               source="ultra-253b-prefusion with the paper's four groups fused (the paper's §4); "
                                      "the fused widths are the released config's")


def tiny_layout() -> Layout:
    """reffuse's synthetic tiny model; its fused variant fuses the attention-free run without its last block."""
    return layout_from_model(build_tiny(), name="tiny")


MODEL_PRESETS = {
    "tiny": tiny_layout,
    "smollm2": smollm2_layout,
    "llama-3.1-405b": llama_405b_layout,
    "ultra-253b-prefusion": ultra_prefusion_layout,
    "ultra-253b-fused": ultra_fused_layout,
}


def get_layout(name: str, fusion_groups=None) -> Layout:
    """A preset layout by name, or the layout of any model `reffuse.load_model` knows (a name or a folder)."""
    if name in MODEL_PRESETS:
        layout = MODEL_PRESETS[name]()
        if fusion_groups is not None:
            layout = dataclasses.replace(layout, fusion_groups=tuple(check_groups(layout, fusion_groups)))
        return layout
    from reffuse.formats.registry import NAMED_MODELS, load_model  # loads lazily: presets need no weights

    if name in NAMED_MODELS or os.path.isdir(name):
        return layout_from_model(load_model(name), fusion_groups, name=name)
    raise ReffuseError(f"unknown model {name!r} for the cost model: use one of {', '.join(MODEL_PRESETS)}, "
                       "a model name reffuse can load, or the folder of a saved model")
