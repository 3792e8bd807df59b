"""Nemotron-NAS (DeciLM) folders: the format of the released FFN-Fusion models (Llama-Nemotron Super and Ultra),
which vLLM, TensorRT-LLM and llama.cpp read.

config.json has `model_type: "nemotron-nas"`, `architectures: ["DeciLMForCausalLM"]` and one entry per block:

    block_configs[i] = {"attention": {"no_op": bool, "n_heads_in_group": H / H_kv, "replace_with_linear": false,
                                      "sparsify": null, "window_length": null, "num_sink_tokens": null, ...},
                        "ffn": {"no_op": bool, "ffn_mult": m, "replace_with_linear": false, "sparsify": null}}

The FFN width is not stored but derived: int(2 * m * hidden / 3), rounded up to a multiple of 256 (the rule those
engines share). A width that is not such a multiple is written padded with zero rows of gate and up and zero
columns of down: silu(0) * 0 = 0, so the padding adds exactly nothing. A fused run stands, as in Ultra, as one
wide block followed by blocks with both sub-blocks `no_op`, so that the layer count is the original model's.
Tensors keep HF Llama's names. `reffuse_blocks` records reffuse's own layout, so that its exports read back to the
same model, padding removed; a folder without it loads as written.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from reffuse.core.layout import BlockLayout, as_layout, blocks_from_json
from reffuse.core.model import FFN, Block, Model
from reffuse.errors import ReffuseError

MODEL_TYPE = "nemotron-nas"
WIDTH_MULTIPLE = 256
UNSUPPORTED = {"attention": ("replace_with_linear", "sparsify", "window_length", "num_sink_tokens"),
               "ffn": ("replace_with_linear", "sparsify")}


def width_from_mult(ffn_mult: float, hidden: int) -> int:
    """The FFN width a Nemotron-NAS block of ffn_mult has: int(2 * m * hidden / 3), rounded up to 256."""
    width = int(2 * ffn_mult * hidden / 3)
    return math.ceil(width / WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def mult_for_width(width: int, hidden: int) -> tuple[float, int]:
    """The ffn_mult that stands for `width`, and the (padded) width it gives."""
    padded = math.ceil(width / WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    mult = padded * 3 / (2 * hidden)
    if width_from_mult(mult, hidden) != padded:
        raise ReffuseError(f"no ffn_mult gives an FFN width of {padded} at hidden size {hidden}")
    return mult, padded


def padded_ffn(ffn: FFN, width: int) -> FFN:
    """`ffn` with zero rows of gate and up and zero columns of down up to `width` (the same function)."""
    extra = width - ffn.width
    if extra == 0:
        return ffn
    return FFN(ffn.norm_gain, np.concatenate([ffn.gate, np.zeros((extra, ffn.gate.shape[1]), ffn.gate.dtype)]),
               np.concatenate([ffn.up, np.zeros((extra, ffn.up.shape[1]), ffn.up.dtype)]),
               np.concatenate([ffn.down, np.zeros((ffn.down.shape[0], extra), ffn.down.dtype)], axis=1))


def nemotron_blocks(model: Model) -> tuple[list[dict], list[Block]]:
    """block_configs and the blocks to write: padded FFNs, and no-op blocks after each fused one."""
    cfg, configs, blocks = model.config, [], []
    for block, layout in zip(model.blocks, as_layout(model).blocks):
        attention = {"no_op": block.attention is None, "replace_with_linear": False, "sparsify": None,
                     "n_heads_in_group": cfg.n_heads // cfg.n_kv_heads, "window_length": None,
                     "num_sink_tokens": None, "use_prefill_window_in_sink_attention": False, "unshifted_sink": False}
        ffn = {"no_op": block.ffn is None, "replace_with_linear": False, "sparsify": None, "ffn_mult": None}
        padded = block.ffn
        if block.ffn is not None:
            ffn["ffn_mult"], width = mult_for_width(block.ffn.width, cfg.dim)
            padded = padded_ffn(block.ffn, width)
        configs.append({"attention": attention, "ffn": ffn})
        blocks.append(Block(block.attention, padded, block.fused_from))
        for _ in layout.fused_from[1:]:  # the layers a fused block replaced: both sub-blocks no_op, as in Ultra
            configs.append({"attention": dict(attention, no_op=True), "ffn": dict(ffn, no_op=True, ffn_mult=None)})
            blocks.append(Block(None, None))
    return configs, blocks


def nemotron_config(model: Model, block_configs: list[dict]) -> dict:
    cfg = model.config
    config = {"architectures": ["DeciLMForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": cfg.dim,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "num_hidden_layers": len(block_configs), "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "torch_dtype": str(model.dtype), "block_configs": block_configs, "name": cfg.name,
              "reffuse_blocks": [b.to_json() for b in as_layout(model).blocks]}
    if cfg.max_positions is not None:
        config["max_position_embeddings"] = cfg.max_positions
    return config


def heads_in_group(configs) -> int | None:
    """n_heads_in_group of the first block with attention (blocks_from_nemotron refuses any that differ)."""
    return next((c.get("attention", {}).get("n_heads_in_group") for c in configs
                 if not c.get("attention", {}).get("no_op")), None)


def heads_in_group_kv(raw: dict, n_heads: int) -> int:
    """The key/value heads of a Nemotron-NAS config: num_key_value_heads, else n_heads / n_heads_in_group."""
    if raw.get("num_key_value_heads") is not None:
        return raw["num_key_value_heads"]
    group = heads_in_group(raw.get("block_configs") or [])
    return n_heads // int(group) if group else n_heads


def blocks_from_nemotron(raw: dict, source: str) -> tuple[BlockLayout, ...]:
    """The block layout a Nemotron-NAS config.json describes (refusing what reffuse does not compute, by name)."""
    configs = raw.get("block_configs")
    if not isinstance(configs, list) or not configs:
        raise ReffuseError(f"{source}: a {MODEL_TYPE} config.json needs block_configs, one entry per block")
    blocks, first_group = [], heads_in_group(configs)
    for i, entry in enumerate(configs):
        for part, keys in UNSUPPORTED.items():
            for key in keys:
                if entry.get(part, {}).get(key):
                    raise ReffuseError(f"{source}: block {i}'s {part} has {key} = {entry[part][key]!r}, which reffuse "
                                       "does not compute")
        attention, ffn = entry.get("attention", {}), entry.get("ffn", {})
        group = attention.get("n_heads_in_group")
        if not attention.get("no_op") and group != first_group:
            raise ReffuseError(f"{source}: block {i}'s attention has n_heads_in_group = {group!r}, another than block "
                               f"0's {first_group!r}: reffuse takes one key/value head count for all blocks")
        width = 0 if ffn.get("no_op") else width_from_mult(float(ffn["ffn_mult"]), int(raw["hidden_size"]))
        blocks.append(BlockLayout(not attention.get("no_op", False), width))
    return tuple(blocks)


def reffuse_layout(raw: dict, source: str):
    """The layout reffuse recorded in its own export (None for a folder it did not write)."""
    rows = raw.get("reffuse_blocks")
    return None if rows is None else blocks_from_json(rows, f"{source}: reffuse_blocks")


def as_recorded(model: Model, recorded) -> Model:
    """A model read from reffuse's own export, back in the layout it had: no-op blocks dropped, padding removed."""
    kept = [b for b in model.blocks if b.attention is not None or b.ffn is not None]
    if len(kept) != len(recorded):
        raise ReffuseError(f"reffuse_blocks lists {len(recorded)} blocks, the folder holds {len(kept)}")
    blocks = []
    for block, layout in zip(kept, recorded):
        ffn = block.ffn
        if ffn is not None and ffn.width != layout.ffn_width:
            w = layout.ffn_width
            if np.any(ffn.gate[w:]) or np.any(ffn.up[w:]) or np.any(ffn.down[:, w:]):
                raise ReffuseError("the padding of an FFN is not zero: the folder is not reffuse's export as written")
            ffn = FFN(ffn.norm_gain, ffn.gate[:w], ffn.up[:w], np.ascontiguousarray(ffn.down[:, :w]))
        blocks.append(Block(block.attention, ffn, layout.fused_from))
    return dataclasses.replace(model, blocks=blocks)

