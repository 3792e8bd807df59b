"""Loading a Llama GGUF file (llama.cpp's format) into a reffuse Model, every tensor dequantized to float32.

A GGUF file holds metadata (key -> value: the architecture, sizes, the tokenizer) and tensors, each in its own
type (F32, F16, or a block quantization such as Q4_1 or Q8_0). llama.cpp's `gguf` package reads both and
dequantizes. What this module adds:

- the config from the metadata keys `llama.*`, or `deci.*` with per-layer head counts and FFN widths (0 where a
  block has no attention or no FFN), the architecture llama.cpp gives Nemotron-NAS and reffuse's fused exports;
- the tensor names mapped to HF Llama's (`blk.3.ffn_gate.weight` -> `model.layers.3.mlp.gate_proj.weight`);
- the q/k row permutation undone (`rope_rows_to_rotate_half`): llama.cpp's converter reorders the rows of
  W_q and W_k so that its interleaved RoPE gives the same result as HF's rotate-half RoPE on the original
  rows. reffuse rotates halves, like HF, so it needs the original rows back;
- tied embeddings: a file without `output.weight` uses the token embedding as the LM head;
- errors that name the file and the tensor for truncated or corrupt files and unsupported tensor types.
Every loader ends in checkpoint.model_from_tensors, which checks all names and shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from reffuse.core.layout import BlockLayout, blocks_from_json
from reffuse.formats.checkpoint import check_config, model_from_tensors
from reffuse.errors import ReffuseError
from reffuse.progress import Progress
from reffuse.core.model import Config, Model, cast
from reffuse.optional import require

ARCHITECTURES = ("llama", "deci")  # deci: llama.cpp's name for Nemotron-NAS (attention-free and fused blocks)
LAYOUT_KEY = "reffuse.blocks"      # reffuse's own exports record the layout, fused_from included

# GGUF tensor name -> HF Llama name; `{i}` is the block index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str:
    """The HF Llama name of a GGUF tensor; a name with no HF counterpart is returned as it is."""
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match:
        template = GGUF_TO_HF.get(f"blk.{{i}}.{match.group(2)}")
        return template.format(i=int(match.group(1))) if template else gguf_name
    return GGUF_TO_HF.get(gguf_name, gguf_name)


# ---------------------------------------------------------------------------------------------------------------
# The q/k row permutation


def rope_rows_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows for interleaved RoPE -> rows for rotate-half RoPE (HF's).

    Within each head of head_dim rows, rotate-half RoPE rotates the pair of rows (i, i + head_dim/2) and
    interleaved RoPE rotates (2i, 2i+1). llama.cpp's converter moves row i to 2i and row i + head_dim/2 to
    2i + 1, so that its interleaved RoPE rotates the same pairs. This moves them back:
    row 2i -> i and row 2i+1 -> i + head_dim/2, in every head. w [n_heads*head_dim, d] -> same shape.
    n_heads is the number of heads the rows belong to: query heads for W_q, key/value heads for W_k.
    """
    out, d = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, half, 2, d).swapaxes(1, 2).reshape(out, d)  # [head, i, pair] -> [head, pair, i]


def rope_rows_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (what its converter applies to HF weights); the inverse of
    rope_rows_to_rotate_half. w [n_heads*head_dim, d] -> same shape."""
    out, d = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, 2, half, d).swapaxes(1, 2).reshape(out, d)  # [head, pair, i] -> [head, i, pair]


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


def open_gguf(path) -> "gguf.GGUFReader":  # noqa: F821 (gguf is imported lazily)
    """A gguf.GGUFReader for `path`, or a ReffuseError that says what is wrong with the file."""
    gguf = require("gguf", "real", "reading a GGUF file")
    path = Path(path)
    if not path.is_file():
        raise ReffuseError(f"{path}: no such file")
    try:
        return _checked_reader(gguf)(path)
    except ReffuseError:
        raise
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ... for malformed files
        raise ReffuseError(f"{path} could not be read as a GGUF file ({type(e).__name__}: {e}); the file is "
                           f"truncated, corrupt or not a GGUF file ({path.stat().st_size} bytes)") from None


def _checked_reader(gguf):
    """GGUFReader that names the tensor whose data a truncated file cuts off.

    The plain reader fails with a bare reshape error there; this checks each tensor's extent first
    (ReaderField.parts of a tensor-info field: name length, name, n_dims, dims, type, offset).
    """
    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block_size
                end = int(start_offs) + int(offset[0]) + n_bytes
                if end > len(self.data):
                    raise ReffuseError(
                        f"{self.data.filename} is truncated: tensor {bytes(name).decode(errors='replace')} "
                        f"({qtype.name}, {n_bytes} bytes) ends at byte {end}, but the file has {len(self.data)}")
            super()._build_tensors(start_offs, fields)
    return CheckedReader


def metadata_value(reader, key: str, default=None):
    """A metadata value as Python: str, int, float, bool, or a list of them; `default` if the key is absent."""
    gguf = require("gguf", "real", "reading a GGUF file")
    field = reader.fields.get(key)
    if field is None:
        return default

    def scalar(part, kind):
        if kind != gguf.GGUFValueType.STRING:
            return part[0].item()
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError as e:
            where = getattr(getattr(reader, "data", None), "filename", "the GGUF file")
            raise ReffuseError(f"{where}: metadata {key} is not valid UTF-8 text "
                               f"(byte {e.start}): the file is corrupt or was written wrongly") from None

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def config_from_gguf(reader, path) -> tuple[Config, tuple[BlockLayout, ...]]:
    """Config and per-block layout from the metadata of a `llama` GGUF, or of a `deci` one (llama.cpp's
    Nemotron-NAS architecture: per-layer head counts and FFN widths, 0 where a sub-block is absent)."""
    architecture = metadata_value(reader, "general.architecture")
    if architecture not in ARCHITECTURES:
        raise ReffuseError(f"{path}: general.architecture is {architecture!r}; reffuse loads Llama-architecture "
                           f"models ({' or '.join(map(repr, ARCHITECTURES))})")

    def raw(name, default=None):
        value = metadata_value(reader, f"{architecture}.{name}", default)
        if value is None:
            raise ReffuseError(f"{path}: metadata key {architecture}.{name} is missing")
        return value

    def key(name, default=None):
        value = raw(name, default)
        if isinstance(value, list):  # per-layer values where reffuse takes one: the nonzero ones must agree
            present = {v for v in value if v}
            if len(present) != 1:
                raise ReffuseError(f"{path}: {architecture}.{name} differs between layers ({value[:4]} ...), "
                                   "which reffuse does not load from GGUF")
            value = present.pop()
        return value

    if key("expert_count", 0):
        raise ReffuseError(f"{path}: a mixture-of-experts model ({architecture}.expert_count = "
                           f"{key('expert_count')}) is not supported")
    scaling = metadata_value(reader, f"{architecture}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ReffuseError(f"{path}: RoPE scaling ({scaling}) is not supported (plain RoPE only)")
    vocab = metadata_value(reader, f"{architecture}.vocab_size")
    if vocab is None:  # files without the key: the tokenizer's length, else the embedding's rows
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens.data) if tokens else int(embed.shape[1]) if embed is not None else key("vocab_size")
    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    if n_heads < 1:
        raise ReffuseError(f"{path}: {architecture}.attention.head_count is {n_heads}: it must be at least 1")
    head_dim = int(key("attention.key_length", dim // n_heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ReffuseError(f"{path}: RoPE on {key('rope.dimension_count')} of {head_dim} head dimensions (partial "
                           "rotary) is not supported")
    config = Config(vocab_size=int(vocab), dim=dim, n_heads=n_heads,
                    n_kv_heads=int(key("attention.head_count_kv", n_heads)), head_dim=head_dim,
                    rope_theta=float(key("rope.freq_base", 10000.0)),
                    norm_eps=float(key("attention.layer_norm_rms_epsilon")),
                    tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
                    name=Path(path).stem, max_positions=int(key("context_length", 0)) or None)
    n_blocks = int(key("block_count"))
    heads, widths = raw("attention.head_count"), raw("feed_forward_length")  # per layer, or one for all
    heads = heads if isinstance(heads, list) else [heads] * n_blocks
    widths = widths if isinstance(widths, list) else [widths] * n_blocks
    if len(heads) != n_blocks or len(widths) != n_blocks:
        raise ReffuseError(f"{path}: the per-layer head counts and FFN widths must list {n_blocks} blocks")
    blocks = tuple(BlockLayout(bool(h), int(w)) for h, w in zip(heads, widths))
    recorded = metadata_value(reader, LAYOUT_KEY)
    if recorded is not None:  # reffuse's own export: the layout with fused_from, checked against the arrays
        exact = blocks_from_json(json.loads(recorded), f"{path}: {LAYOUT_KEY}")
        if [(b.attention, b.ffn_width) for b in exact] != [(b.attention, b.ffn_width) for b in blocks]:
            raise ReffuseError(f"{path}: {LAYOUT_KEY} disagrees with the per-layer head counts and FFN widths")
        blocks = exact
    return check_config(config, str(path)), blocks


def dequantize(tensor, path) -> np.ndarray:
    """One tensor as float32 in numpy's (HF's) order: (out, in) for a weight matrix."""
    gguf = require("gguf", "real", "reading a GGUF file")
    qtype = tensor.tensor_type
    if qtype == gguf.GGMLQuantizationType.F64:
        values = np.asarray(tensor.data, dtype=np.float64)
    else:
        try:
            values = gguf.quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise ReffuseError(f"{path}: tensor {tensor.name} has type {qtype.name}, which reffuse cannot "
                               "dequantize (F32, F16, F64 and llama.cpp's block quantizations load)") from None
    values = np.asarray(values, dtype=np.float32).reshape(tuple(reversed([int(n) for n in tensor.shape])))
    if not np.isfinite(values).all():
        raise ReffuseError(f"{path}: tensor {tensor.name} ({qtype.name}) holds non-finite values: "
                           "the file is corrupt")
    return values


def load_gguf(path, dtype="float32", reader=None) -> Model:
    """A Model from a Llama GGUF file: config from its metadata, every tensor dequantized to float32.

    reader: the file already opened with open_gguf (parsing its metadata takes seconds; do it once).
    """
    path = Path(path)
    reader = reader or open_gguf(path)
    config, blocks = config_from_gguf(reader, path)
    tensors = {}
    with Progress(f"dequantizing {path.name}", len(reader.tensors), "tensors") as bar:
        for tensor in reader.tensors:
            name, values = hf_name(tensor.name), dequantize(tensor, path)
            heads = (config.n_heads if name.endswith("q_proj.weight") else
                     config.n_kv_heads if name.endswith("k_proj.weight") else None)
            if heads and values.shape[0] == heads * config.head_dim:  # a misshaped one is reported below
                values = rope_rows_to_rotate_half(values, heads)
            tensors[name] = values
            bar.update()
    return cast(model_from_tensors(config, blocks, tensors, str(path)), dtype)
