"""Writing a reffuse model as a GGUF file that llama.cpp runs, with `gguf`'s own writer.

- A plain Llama (every block with attention of the model's heads, one FFN width, nothing fused) is written as
  architecture `llama`.
- Any other model is written as `deci`, llama.cpp's architecture for the Nemotron-NAS models that FFN Fusion
  produced: per-layer arrays `deci.attention.head_count`, `deci.attention.head_count_kv` and
  `deci.feed_forward_length`, 0 where a block has no attention or no FFN, key/value heads 0 under query heads
  for a linear attention (its map is the block's attn_output), so a fused block is simply a block with a wide
  FFN and blocks may have their own key/value heads. llama.cpp's deci graph has no linear FFN: refused.
- llama.cpp's deci graph skips to the next layer before keeping the attention output of a layer whose FFN
  width is 0, so a block that keeps attention and has no FFN would lose its attention there. Such a block is
  written with an all-zero FFN of STAND_IN_FFN_WIDTH units instead, which adds exactly nothing (down is zero),
  and the plan says so; reffuse reads the block back without it.
- q/k rows (and their biases) are permuted to llama.cpp's interleaved RoPE layout
  (`gguf.rope_rows_to_interleaved`), the inverse of what loading undoes; names are llama.cpp's
  (`blk.3.ffn_gate.weight`). RoPE scaling is written as llama.cpp's `rope_freqs` factors (and, exactly, as
  reffuse's own metadata).
- The tokenizer goes with it (tokens, merges, token types, bos/eos, its pre-tokenizer and chat template) and
  must have the model's vocabulary size; without one the file says so (`tokenizer.ggml.model` "none") and
  llama.cpp reads token ids only. `reffuse.blocks` records the layout (fused_from included), which llama.cpp
  ignores and reffuse reads back, so that its own export reloads exactly.

Tensors are F32 (exact), F16, or Q8_0 (llama.cpp's 8-bit blocks, quantized by `gguf`): matrices whose rows are
not a whole number of Q8_0 blocks (32 values) stay F32, and the plan lists them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reffuse.core import names
from reffuse.core.layout import as_layout, format_layers
from reffuse.core.model import FFN, Block, Model
from reffuse.core.rope import rope_frequencies
from reffuse.errors import ReffuseError
from reffuse.files import partial_name, share
from reffuse.formats.checkpoint import is_plain_llama, model_to_tensors
from reffuse.formats.gguf import (GGUF_TO_HF, KV_HEADS_KEY, LAYOUT_KEY, ROPE_FREQS, ROPE_SCALING_KEY,
                                  rope_rows_to_interleaved)
from reffuse.optional import require

TENSOR_TYPES = ("f32", "f16", "q8_0")
HF_TO_GGUF = {hf: gguf_name for gguf_name, hf in GGUF_TO_HF.items()}
HF_TO_GGUF["model.layers.{i}." + names.LINEAR_ATTENTION_NAMES["weight"]] = "blk.{i}.attn_output.weight"
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3
Q8_0_BLOCK = 32
STAND_IN_FFN_WIDTH = Q8_0_BLOCK  # the narrowest FFN a Q8_0 export quantizes like any other


@dataclass(frozen=True)
class GgufPlan:
    """What save_gguf writes for a model, decided before any byte is: the architecture, the blocks given a zero
    FFN in place of an absent one, and the matrices a Q8_0 export leaves in F32."""
    architecture: str
    stand_in_ffns: tuple[int, ...]
    unquantized: tuple[str, ...]

    def notes(self) -> list[str]:
        """One line for each thing the file holds other than the model as it is."""
        notes = []
        if self.stand_in_ffns:
            several = len(self.stand_in_ffns) > 1
            notes.append(f"block{'s' if several else ''} {format_layers(self.stand_in_ffns)} "
                         f"{'keep' if several else 'keeps'} attention and {'have' if several else 'has'} no FFN: "
                         f"written with an all-zero FFN of {STAND_IN_FFN_WIDTH} units, "
                         "which adds nothing, because llama.cpp's deci graph drops the attention output of a layer "
                         "without FFN (reffuse reads the file back without it)")
        if self.unquantized:
            notes.append(f"{len(self.unquantized)} matri{'ces' if len(self.unquantized) > 1 else 'x'} left F32, "
                         f"not Q8_0 (rows not a multiple of {Q8_0_BLOCK} values): "
                         f"{', '.join(self.unquantized[:3])}{' ...' if len(self.unquantized) > 3 else ''}")
        return notes


def plan_gguf(model: Model, tensor_type: str = "f32") -> GgufPlan:
    """How `model` goes into a GGUF file (see GgufPlan); refuses what llama.cpp's graphs cannot hold."""
    if tensor_type not in TENSOR_TYPES:
        raise ReffuseError(f"tensor type {tensor_type!r} is not one reffuse writes: {', '.join(TENSOR_TYPES)}")
    layout, cfg = as_layout(model), model.config
    linear_ffns = [i for i, b in enumerate(layout.blocks) if b.linear_ffn]
    if linear_ffns:
        several = len(linear_ffns) > 1
        raise ReffuseError(f"block{'s' if several else ''} {format_layers(linear_ffns)} of {cfg.name} "
                           f"replace{'' if several else 's'} the FFN by a linear map, which llama.cpp's deci graph "
                           "does not compute: export it as --format nemotron-nas")
    if (cfg.qkv_bias or cfg.o_bias) and cfg.n_heads * cfg.head_dim != cfg.dim:
        raise ReffuseError(f"{cfg.name} has attention biases and n_heads x head_dim = {cfg.n_heads * cfg.head_dim} "
                           f"other than its width {cfg.dim}: llama.cpp's llama and deci graphs take biases of the "
                           "model's width only")
    architecture = "llama" if is_plain_llama(model) else "deci"
    stand_in = tuple(i for i, b in enumerate(layout.blocks) if b.attention and not b.has_ffn) \
        if architecture == "deci" else ()
    unquantized = ()
    if tensor_type == "q8_0":
        matrices = {n: a.shape for n, a in names.named_weights(model).items() if a.ndim == 2}
        unquantized = tuple(gguf_name(n) for n, shape in matrices.items() if shape[1] % Q8_0_BLOCK)
        if len(unquantized) == len(matrices):
            raise ReffuseError(f"no matrix of {cfg.name} has rows of a multiple of {Q8_0_BLOCK} values (its width "
                               f"is {cfg.dim}): Q8_0 can hold none of them; export it as f32 or f16")
    return GgufPlan(architecture, stand_in, unquantized)


def with_stand_in_ffns(model: Model, blocks) -> Model:
    """The model with an all-zero FFN of STAND_IN_FFN_WIDTH units in each of `blocks` (which have none): the same
    function, since down is zero."""
    d, dtype = model.config.dim, model.dtype
    width = STAND_IN_FFN_WIDTH
    stand_in = FFN(np.ones(d, dtype), np.zeros((width, d), dtype), np.zeros((width, d), dtype),
                   np.zeros((d, width), dtype))
    return dataclasses.replace(model, blocks=[Block(b.attention, stand_in, b.fused_from) if i in blocks else b
                                              for i, b in enumerate(model.blocks)])


def gguf_name(hf: str) -> str:
    """The llama.cpp name of an HF Llama tensor name."""
    parts = hf.split(".")
    if hf.startswith("model.layers."):
        template = HF_TO_GGUF["model.layers.{i}." + ".".join(parts[3:])]
        return template.format(i=int(parts[2]))
    return HF_TO_GGUF[hf]


def _tokenizer_metadata(writer, tokenizer) -> None:
    if tokenizer is None:  # llama.cpp's vocabulary-less models: token ids in, logits out
        writer.add_tokenizer_model("none")
        return
    backend = json.loads(tokenizer.backend.to_str())
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        if 0 <= index < len(tokens):
            tokens[index] = token
    if any(t is None for t in tokens):
        raise ReffuseError(f"the tokenizer ({tokenizer.source}) has gaps in its ids: it cannot be written to GGUF")
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    special = set(tokenizer.special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre or "default")  # llama.cpp knows GPT-2's split as "default"
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens])
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def save_gguf(model: Model, path, tokenizer, tensor_type: str = "f32", stand_in_ffns: bool = True) -> Path:
    """Write `model` (with `tokenizer`, or None for token ids only) as a GGUF file llama.cpp runs, as plan_gguf
    plans it; all or nothing (a temporary file renamed). stand_in_ffns=False writes a block that keeps attention
    and has no FFN as it is (0 FFN units), the form llama.cpp's deci graph computes wrongly: a reproduction."""
    gguf = require("gguf", "real", "writing a GGUF file")
    plan = plan_gguf(model, tensor_type)
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise ReffuseError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but "
                           f"{model.config.name} has {model.config.vocab_size}: llama.cpp would read ids of another "
                           "vocabulary; give the model's own tokenizer")
    path, cfg, blocks = Path(path), model.config, as_layout(model).blocks
    written = with_stand_in_ffns(model, plan.stand_in_ffns if stand_in_ffns else ())
    written_blocks = as_layout(written).blocks
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    writer = gguf.GGUFWriter(str(temporary), plan.architecture)
    writer.add_name(cfg.name)
    writer.add_block_count(len(blocks))
    writer.add_context_length(cfg.max_positions or 2048)
    writer.add_embedding_length(cfg.dim)
    if plan.architecture == "llama":
        writer.add_feed_forward_length(blocks[0].ffn_width)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
    else:
        writer.add_feed_forward_length([b.ffn_width for b in written_blocks])
        writer.add_head_count([cfg.n_heads if b.attention else 0 for b in blocks])
        writer.add_head_count_kv([as_layout(model).kv_heads(i) for i in range(len(blocks))])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[tensor_type])
    writer.add_string(LAYOUT_KEY, json.dumps([b.to_json() for b in blocks]))
    writer.add_uint32(KV_HEADS_KEY, cfg.n_kv_heads)
    if cfg.rope_scaling is not None:  # llama.cpp divides frequency i by rope_freqs[i]
        writer.add_string(ROPE_SCALING_KEY, json.dumps(cfg.rope_scaling.to_json()))
        factors = rope_frequencies(cfg.head_dim, cfg.rope_theta) / rope_frequencies(cfg.head_dim, cfg.rope_theta,
                                                                                       cfg.rope_scaling)
        writer.add_tensor(ROPE_FREQS, factors.astype(np.float32))
    _tokenizer_metadata(writer, tokenizer)
    for name, array in model_to_tensors(written).items():
        array = np.asarray(array, dtype=np.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            array = rope_rows_to_interleaved(array, cfg.n_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            array = rope_rows_to_interleaved(array, array.shape[0] // cfg.head_dim)  # this block's kv heads
        if tensor_type == "f16" and array.ndim == 2:
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        elif tensor_type == "q8_0" and array.ndim == 2 and array.shape[1] % Q8_0_BLOCK == 0:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), quantized, raw_shape=quantized.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # norms and biases stay F32, as llama.cpp's converter keeps them
            writer.add_tensor(gguf_name(name), array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        share(temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
