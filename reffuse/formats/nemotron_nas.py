"""Nemotron-NAS (DeciLM) folders: the format of the released FFN-Fusion models (Llama-Nemotron Super and Ultra),
which vLLM, TensorRT-LLM and llama.cpp read.

config.json has `model_type: "nemotron-nas"`, `architectures: ["DeciLMForCausalLM"]` and one entry per block:

    block_configs[i] = {"attention": {"no_op": bool, "n_heads_in_group": H / H_kv, "replace_with_linear": false,
                                      "sparsify": null, "window_length": null, "num_sink_tokens": null, ...},
                        "ffn": {"no_op": bool, "ffn_mult": m, "replace_with_linear": false, "sparsify": null}}

Blocks differ in their key/value heads (num_attention_heads / n_heads_in_group) and FFN widths, and a sub-block
may be one d x d linear map (`replace_with_linear`: tensors `self_attn.linear_attn.weight`, `mlp.linear_mlp.weight`).
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
from reffuse.core.model import FFN, Block, Linear, Model, has_heads
from reffuse.errors import ReffuseError

MODEL_TYPE = "nemotron-nas"
WIDTH_MULTIPLE = 256
# block_configs keys reffuse reads, and those it refuses by name when they are set (to anything but false/null)
READ = {"attention": ("no_op", "replace_with_linear", "n_heads_in_group"),
        "ffn": ("no_op", "replace_with_linear", "ffn_mult")}
UNSUPPORTED = {"attention": ("sparsify", "window_length", "num_sink_tokens", "use_prefill_window_in_sink_attention",
                             "unshifted_sink"),
               "ffn": ("sparsify",)}


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
        kv = block.attention.k.shape[0] // cfg.head_dim if has_heads(block.attention) else cfg.n_kv_heads
        linear_attention = isinstance(block.attention, Linear)
        attention = {"no_op": block.attention is None, "replace_with_linear": linear_attention, "sparsify": None,
                     "n_heads_in_group": None if linear_attention else cfg.n_heads // kv, "window_length": None,
                     "num_sink_tokens": None, "use_prefill_window_in_sink_attention": False, "unshifted_sink": False}
        ffn = {"no_op": block.ffn is None, "replace_with_linear": isinstance(block.ffn, Linear), "sparsify": None,
               "ffn_mult": None}
        padded = block.ffn
        if isinstance(block.ffn, FFN):
            ffn["ffn_mult"], width = mult_for_width(block.ffn.width, cfg.dim)
            padded = padded_ffn(block.ffn, width)
        configs.append({"attention": attention, "ffn": ffn})
        blocks.append(Block(block.attention, padded, block.fused_from))
        for _ in layout.fused_from[1:]:  # the layers a fused block replaced: both sub-blocks no_op, as in Ultra
            configs.append({"attention": dict(attention, no_op=True, replace_with_linear=False),
                            "ffn": dict(ffn, no_op=True, ffn_mult=None)})
            blocks.append(Block(None, None))
    return configs, blocks


def nemotron_config(model: Model, block_configs: list[dict]) -> dict:
    cfg = model.config
    config = {"architectures": ["DeciLMForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": cfg.dim,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "num_hidden_layers": len(block_configs), "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "attention_bias": cfg.qkv_bias or cfg.o_bias, "mlp_bias": False,
              "torch_dtype": str(model.dtype), "block_configs": block_configs, "name": cfg.name,
              "reffuse_blocks": [b.to_json() for b in as_layout(model).blocks]}
    if cfg.rope_scaling is not None:
        config["rope_scaling"] = cfg.rope_scaling.to_json()
    if cfg.max_positions is not None:
        config["max_position_embeddings"] = cfg.max_positions
    if cfg.attention_window is not None:
        config["sliding_window"] = cfg.attention_window
    return config


def _entries(raw: dict, source: str) -> list[tuple[dict, dict]]:
    """(attention, ffn) of every block_configs entry, each checked to be an object of keys reffuse knows, and
    what reffuse does not compute refused by name."""
    if raw.get("parallel_blocks"):
        raise ReffuseError(f"{source}: config.json has parallel_blocks, which reffuse does not read (it would compute "
                           "those blocks one after another, not side by side): remove them or use DeciLM's own code")
    configs = raw.get("block_configs")
    if not isinstance(configs, list) or not configs:
        raise ReffuseError(f"{source}: a {MODEL_TYPE} config.json needs block_configs, one entry per block")
    entries = []
    for i, entry in enumerate(configs):
        if not isinstance(entry, dict):
            raise ReffuseError(f"{source}: block_configs[{i}] is {entry!r}, not an object with attention and ffn")
        if entry.get("parallel_blocks"):
            raise ReffuseError(f"{source}: block {i} has parallel_blocks, which reffuse does not read (it would "
                               "compute them one after another, not side by side)")
        other = sorted(k for k, v in entry.items() if k not in ("attention", "ffn", "parallel_blocks") and v)
        if other:
            raise ReffuseError(f"{source}: block {i} has {other[0]!r}, which reffuse does not compute")
        parts = []
        for part in ("attention", "ffn"):
            value = entry.get(part, {})
            if not isinstance(value, dict):
                raise ReffuseError(f"{source}: block {i}'s {part} is {value!r}, not an object")
            for key, setting in value.items():
                if key not in READ[part] and setting:
                    raise ReffuseError(f"{source}: block {i}'s {part} has {key} = {setting!r}, which reffuse does "
                                       "not compute")
            for key in ("no_op", "replace_with_linear"):
                if value.get(key) not in (None, True, False):
                    raise ReffuseError(f"{source}: block {i}'s {part} has {key} = {value[key]!r}: true or false")
            parts.append(value)
        entries.append(tuple(parts))
    return entries


def _group(attention: dict, i: int, n_heads: int, source: str) -> int:
    """The n_heads_in_group of a block with heads, checked: an integer >= 1 that divides num_attention_heads."""
    group = attention.get("n_heads_in_group")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or n_heads % group:
        raise ReffuseError(f"{source}: block {i}'s attention has n_heads_in_group = {group!r}: it must be an integer "
                           f">= 1 that divides num_attention_heads ({n_heads})")
    return group


def _has_heads(attention: dict) -> bool:
    return not attention.get("no_op") and not attention.get("replace_with_linear")


def heads_in_group_kv(raw: dict, n_heads: int, source: str) -> int:
    """The model's key/value heads: num_key_value_heads, else n_heads / the first block's n_heads_in_group.
    num_key_value_heads that no block has, while every block has the same, contradicts them: refused."""
    groups = [_group(a, i, n_heads, source) for i, (a, _) in enumerate(_entries(raw, source)) if _has_heads(a)]
    given = raw.get("num_key_value_heads")
    if given is None:
        return n_heads // groups[0] if groups else n_heads
    if len(set(groups)) == 1 and (isinstance(given, bool) or not isinstance(given, int) or given < 1
                                  or n_heads // groups[0] != given):
        raise ReffuseError(f"{source}: num_key_value_heads is {given!r}, but every block's n_heads_in_group is "
                           f"{groups[0]}, which gives {n_heads // groups[0]}: the head counts contradict each other")
    return given


def blocks_from_nemotron(raw: dict, source: str, n_kv_heads: int) -> tuple[BlockLayout, ...]:
    """The block layout a Nemotron-NAS config.json describes: per block, attention with its own key/value heads
    (n_kv_heads is the model's), a linear map or none, and an FFN of its own width, a linear map or none."""
    n_heads, hidden, blocks = raw["num_attention_heads"], raw["hidden_size"], []
    for i, (attention, ffn) in enumerate(_entries(raw, source)):
        kv = n_heads // _group(attention, i, n_heads, source) if _has_heads(attention) else None
        width = 0
        if not ffn.get("no_op") and not ffn.get("replace_with_linear"):
            mult = ffn.get("ffn_mult")
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult <= 0:
                raise ReffuseError(f"{source}: block {i}'s ffn has ffn_mult = {mult!r}: a number > 0")
            width = width_from_mult(float(mult), int(hidden))
        blocks.append(BlockLayout(not attention.get("no_op", False), width,
                                  kv_heads=None if kv in (None, n_kv_heads) else kv,
                                  linear_attention=bool(attention.get("replace_with_linear")) and
                                  not attention.get("no_op"),
                                  linear_ffn=bool(ffn.get("replace_with_linear")) and not ffn.get("no_op")))
    return tuple(blocks)


def reffuse_layout(raw: dict, source: str):
    """The layout reffuse recorded in its own export (None for a folder it did not write)."""
    rows = raw.get("reffuse_blocks")
    return None if rows is None else blocks_from_json(rows, f"{source}: reffuse_blocks")


def as_recorded(model: Model, recorded) -> Model:
    """A model read from reffuse's own export, back in the layout it had: the no-op blocks written after each
    fused block dropped, padding removed."""
    kept, position = [], 0
    for layout in recorded:
        if position >= len(model.blocks):
            break
        kept.append(model.blocks[position])
        fill = model.blocks[position + 1:position + max(len(layout.fused_from), 1)]
        if any(b.attention is not None or b.ffn is not None for b in fill):
            raise ReffuseError("reffuse_blocks does not match the blocks the folder holds: it is not reffuse's "
                               "export as written (remove reffuse_blocks to load the folder as it is)")
        position += max(len(layout.fused_from), 1)
    if len(kept) != len(recorded) or position != len(model.blocks):
        raise ReffuseError(f"reffuse_blocks lists {len(recorded)} blocks standing for {position} layers, the folder "
                           f"holds {len(model.blocks)}")
    return unpadded(dataclasses.replace(model, blocks=kept), recorded)


def unpadded(model: Model, recorded) -> Model:
    """The model's blocks in the recorded layout: each FFN cut back to its recorded width, and an FFN that stands
    in for an absent one (an engine's workaround) removed, after checking that what goes adds exactly nothing
    (zero rows of gate and up, or zero columns of down); fused_from as recorded."""
    blocks = []
    for i, (block, layout) in enumerate(zip(model.blocks, recorded)):
        ffn = block.ffn
        if isinstance(ffn, FFN) and ffn.width != layout.ffn_width and not layout.linear_ffn:
            w = layout.ffn_width
            if (np.any(ffn.gate[w:]) or np.any(ffn.up[w:])) and np.any(ffn.down[:, w:]):
                raise ReffuseError(f"block {i}'s FFN is wider than recorded ({ffn.width}, not {w}) and the extra "
                                   "units are not zero: the file is not reffuse's export as written")
            ffn = None if w == 0 else FFN(ffn.norm_gain, ffn.gate[:w], ffn.up[:w],
                                          np.ascontiguousarray(ffn.down[:, :w]))
        blocks.append(Block(block.attention, ffn, layout.fused_from))
    return dataclasses.replace(model, blocks=blocks)
