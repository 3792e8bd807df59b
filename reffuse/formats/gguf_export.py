"""Writing a reffuse model as a GGUF file that llama.cpp runs, with `gguf`'s own writer.

- A plain Llama (every block with attention, one FFN width, nothing fused) is written as architecture `llama`.
- A model with attention-free or fused blocks is written as `deci`, llama.cpp's architecture for the
  Nemotron-NAS models that FFN Fusion produced: per-layer arrays `deci.attention.head_count`,
  `deci.attention.head_count_kv` and `deci.feed_forward_length`, 0 where a block has no attention or no FFN, so
  a fused block is simply a block with a wide FFN.
- q/k rows are permuted to llama.cpp's interleaved RoPE layout (`gguf.rope_rows_to_interleaved`), the inverse of
  what loading undoes; names are llama.cpp's (`blk.3.ffn_gate.weight`).
- The tokenizer goes with it (tokens, merges, token types, bos/eos, its pre-tokenizer and chat template), since
  llama.cpp loads no model without one; and `reffuse.blocks` records the layout (fused_from included), which
  llama.cpp ignores and reffuse reads back, so that its own export reloads exactly.

Tensors are F32 (exact), F16, or Q8_0 (llama.cpp's 8-bit blocks, quantized by `gguf`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reffuse.core.layout import as_layout
from reffuse.core.model import Model
from reffuse.errors import ReffuseError
from reffuse.files import partial_name, share
from reffuse.formats.checkpoint import is_plain_llama, model_to_tensors
from reffuse.formats.gguf import GGUF_TO_HF, LAYOUT_KEY, rope_rows_to_interleaved
from reffuse.optional import require

TENSOR_TYPES = ("f32", "f16", "q8_0")
HF_TO_GGUF = {hf: gguf_name for gguf_name, hf in GGUF_TO_HF.items()}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def gguf_name(hf: str) -> str:
    """The llama.cpp name of an HF Llama tensor name."""
    parts = hf.split(".")
    if hf.startswith("model.layers."):
        template = HF_TO_GGUF["model.layers.{i}." + ".".join(parts[3:])]
        return template.format(i=int(parts[2]))
    return HF_TO_GGUF[hf]


def _tokenizer_metadata(writer, tokenizer) -> None:
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
    writer.add_tokenizer_pre(tokenizer.pre or "gpt2")
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


def save_gguf(model: Model, path, tokenizer, tensor_type: str = "f32") -> Path:
    """Write `model` (with `tokenizer`) as a GGUF file llama.cpp runs; all or nothing (a temporary file renamed)."""
    gguf = require("gguf", "real", "writing a GGUF file")
    if tensor_type not in TENSOR_TYPES:
        raise ReffuseError(f"tensor type {tensor_type!r} is not one reffuse writes: {', '.join(TENSOR_TYPES)}")
    if tokenizer is None:
        raise ReffuseError("llama.cpp loads no GGUF without a tokenizer: give the model's (a synthetic model has "
                           "none to give)")
    path, cfg, blocks = Path(path), model.config, as_layout(model).blocks
    arch = "llama" if is_plain_llama(model) else "deci"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    writer = gguf.GGUFWriter(str(temporary), arch)
    writer.add_name(cfg.name)
    writer.add_block_count(len(blocks))
    writer.add_context_length(cfg.max_positions or 2048)
    writer.add_embedding_length(cfg.dim)
    if arch == "llama":
        writer.add_feed_forward_length(blocks[0].ffn_width)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
    else:
        writer.add_feed_forward_length([b.ffn_width for b in blocks])
        writer.add_head_count([cfg.n_heads if b.attention else 0 for b in blocks])
        writer.add_head_count_kv([cfg.n_kv_heads if b.attention else 0 for b in blocks])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[tensor_type])
    writer.add_string(LAYOUT_KEY, json.dumps([b.to_json() for b in blocks]))
    _tokenizer_metadata(writer, tokenizer)
    heads = {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}
    for name, array in model_to_tensors(model).items():
        array = np.asarray(array, dtype=np.float32)
        projection = name.split(".")[-2] if name.endswith("_proj.weight") else None
        if projection in heads:
            array = rope_rows_to_interleaved(array, heads[projection])
        if tensor_type == "f16" and array.ndim == 2:
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        elif tensor_type == "q8_0" and array.ndim == 2 and array.shape[1] % 32 == 0:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), quantized, raw_shape=quantized.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # norms stay F32, as llama.cpp's converter keeps them
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
