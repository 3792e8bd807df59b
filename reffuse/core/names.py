"""A model's weights by their Hugging Face Llama names, and a model with some of them replaced.

Blocks are numbered as the model holds them (as `save_model` numbers them): in a fused model, block i is the i-th
block of the fused model, not a layer of the model it came from. The tied LM head has no name of its own: it is
`model.embed_tokens.weight`. A sub-block replaced by a linear map has DeciLM's names (`self_attn.linear_attn`,
`mlp.linear_mlp`); biases are `*.bias` beside their weights, where the model has them.
"""

from __future__ import annotations

import dataclasses

from reffuse.core.model import FFN, Attention, Linear, Model
from reffuse.errors import ReffuseError

ATTENTION_NAMES = {"norm_gain": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
                   "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
                   "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
                   "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.o_proj.bias"}
FFN_NAMES = {"norm_gain": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
             "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
LINEAR_ATTENTION_NAMES = {"norm_gain": "input_layernorm.weight", "weight": "self_attn.linear_attn.weight"}
LINEAR_FFN_NAMES = {"norm_gain": "post_attention_layernorm.weight", "weight": "mlp.linear_mlp.weight"}
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def block_prefix(i: int) -> str:
    return f"model.layers.{i}."


def part_names(part, attention: bool) -> dict:
    """field -> HF name (after the block prefix) for a sub-block: attention's or the FFN's, or a linear map's."""
    if isinstance(part, Linear):
        return LINEAR_ATTENTION_NAMES if attention else LINEAR_FFN_NAMES
    return ATTENTION_NAMES if attention else FFN_NAMES


def named_weights(model: Model) -> dict:
    """HF name -> the model's own array (no copy, on its device), in the order HF lists them."""
    weights = {EMBED: model.embed}
    for i, block in enumerate(model.blocks):
        for part, attention in ((block.attention, True), (block.ffn, False)):
            if part is not None:
                weights.update({block_prefix(i) + hf: getattr(part, field)
                                for field, hf in part_names(part, attention).items()
                                if getattr(part, field) is not None})
    weights[FINAL_NORM] = model.norm_gain
    if not model.config.tie_embeddings:
        weights[LM_HEAD] = model.lm_head
    return weights


def with_weights(model: Model, replacements: dict) -> Model:
    """The model with the arrays named in `replacements` swapped in (same shapes); every other array is shared."""
    unknown = sorted(set(replacements) - set(named_weights(model)))
    if unknown:
        raise ReffuseError(f"no weight named {unknown[0]} in {model.config.name} ({len(unknown)} unknown names)")

    def part(sub, prefix, attention):
        names = part_names(sub, attention)
        if sub is None or not any(prefix + hf in replacements for hf in names.values()):
            return sub
        cls = Linear if isinstance(sub, Linear) else Attention if attention else FFN
        fields = {field: replacements.get(prefix + hf, getattr(sub, field)) for field, hf in names.items()}
        return dataclasses.replace(sub, **fields) if cls is Linear else cls(**fields)

    blocks = [dataclasses.replace(b, attention=part(b.attention, block_prefix(i), True),
                                  ffn=part(b.ffn, block_prefix(i), False))
              for i, b in enumerate(model.blocks)]
    embed = replacements.get(EMBED, model.embed)
    lm_head = embed if model.config.tie_embeddings else replacements.get(LM_HEAD, model.lm_head)
    replaced = dataclasses.replace(model, embed=embed, blocks=blocks,
                                   norm_gain=replacements.get(FINAL_NORM, model.norm_gain), lm_head=lm_head)
    return replaced.kernels.arrange(replaced)  # on FAST, a changed attention's q, k, v are copied into one array
