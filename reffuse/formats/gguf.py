"""Loading a Llama GGUF file (llama.cpp's format) into a reffuse Model, every tensor dequantized to float32.

A GGUF file holds metadata (key -> value: the architecture, sizes, the tokenizer) and tensors, each in its own
type (F32, F16, or a block quantization such as Q4_1 or Q8_0). llama.cpp's `gguf` package reads both and
dequantizes. What this module adds:

- the config from the metadata keys `llama.*`, `qwen2.*`, or `deci.*` with per-layer head counts and FFN widths
  (0 where a block has no attention or no FFN; key/value heads 0 with query heads kept: a linear attention),
  the architecture llama.cpp gives Nemotron-NAS and reffuse's fused exports; RoPE scaling `linear`, or
  per-frequency factors (the `rope_freqs` tensor, how llama.cpp holds Llama-3's scaling);
- the tensor names mapped to HF Llama's (`blk.3.ffn_gate.weight` -> `model.layers.3.mlp.gate_proj.weight`);
- the q/k row permutation undone (`rope_rows_to_rotate_half`) for `llama` and `deci`: llama.cpp's converter
  reorders the rows of W_q and W_k (and their biases) so that its interleaved RoPE gives the same result as HF's
  rotate-half RoPE on the original rows. reffuse rotates halves, like HF, so it needs the original rows back.
  `qwen2` files rotate halves (llama.cpp's NEOX RoPE) and keep HF's rows;
- tied embeddings: a file without `output.weight` uses the token embedding as the LM head;
- block quantizations (Q4_0 ... Q8_0, the K-quants Q4_K, Q5_K, Q6_K) dequantized by `gguf`; integer tensors refused;
- the file's own structure checked before any tensor is read: offsets aligned, in bounds, not overlapping;
  metadata of the types the format gives them;
- errors that name the file and the tensor for truncated or corrupt files and unsupported tensor types.
Every loader ends in checkpoint.model_from_tensors, which checks all names and shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from reffuse.core import names
from reffuse.core.layout import BlockLayout, blocks_from_json
from reffuse.formats.checkpoint import model_from_tensors
from reffuse.formats.hf_config import check_config, rope_from_json
from reffuse.formats.nemotron_nas import unpadded
from reffuse.errors import ReffuseError
from reffuse.progress import Progress
from reffuse.core.config import Config, RopeScaling
from reffuse.core.model import Model, cast
from reffuse.optional import require

ARCHITECTURES = ("llama", "deci", "qwen2")  # deci: llama.cpp's name for Nemotron-NAS (per-block structure)
INTERLEAVED_ROPE = ("llama", "deci")        # architectures whose q/k rows llama.cpp's converter permutes
LAYOUT_KEY = "reffuse.blocks"      # reffuse's own exports record the layout, fused_from included
ROPE_SCALING_KEY = "reffuse.rope_scaling"  # and their RoPE scaling as HF writes it (rope_freqs holds it rounded)
ROPE_FREQS = "rope_freqs.weight"
KV_HEADS_KEY = "reffuse.head_count_kv"     # and the model's own key/value head count (blocks may have others)

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
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
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
    if w.ndim == 1:  # a bias: its rows move with the weight's
        return rope_rows_to_rotate_half(w[:, None], n_heads)[:, 0]
    out, d = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, half, 2, d).swapaxes(1, 2).reshape(out, d)  # [head, i, pair] -> [head, pair, i]


def rope_rows_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (what its converter applies to HF weights); the inverse of
    rope_rows_to_rotate_half. w [n_heads*head_dim, d] -> same shape."""
    if w.ndim == 1:
        return rope_rows_to_interleaved(w[:, None], n_heads)[:, 0]
    out, d = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, 2, half, d).swapaxes(1, 2).reshape(out, d)  # [head, pair, i] -> [head, i, pair]


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


def open_gguf(path) -> "gguf.GGUFReader":  # noqa: F821 (gguf is imported lazily)
    """A gguf.GGUFReader for `path`, or a ReffuseError that says what is wrong with the file."""
    gguf = require("gguf", "real", "reading a GGUF file")
    path = Path(path)
    if not path.exists():
        raise ReffuseError(f"{path}: no such file")
    if not path.is_file():
        raise ReffuseError(f"{path} is not a regular file (a folder, pipe or device): give the .gguf file itself")
    try:
        return _checked_reader(gguf)(path)
    except ReffuseError:
        raise
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ... for malformed files
        raise ReffuseError(f"{path} could not be read as a GGUF file ({type(e).__name__}: {e}); the file is "
                           f"truncated, corrupt or not a GGUF file ({path.stat().st_size} bytes)") from None


def _checked_reader(gguf):
    """GGUFReader that checks each tensor's place in the file before reading it: a known type, rows of whole
    quantization blocks, an offset aligned to general.alignment, data inside the file (naming the tensor a
    truncated file cuts off) and overlapping no other tensor's data.

    The plain reader fails with a bare reshape error on a truncated file and reads overlapping or misaligned
    tensors as if nothing were wrong (ReaderField.parts of a tensor-info field: name length, name, n_dims, dims,
    type, offset).
    """
    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            extents, where = [], self.data.filename
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                name = bytes(name).decode(errors="replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise ReffuseError(f"{where}: tensor {name} has type number {int(raw_type[0])}, which no GGUF "
                                       "type has: the file is corrupt") from None
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
                dims = dims.astype(np.int64)
                if dims.size == 0 or (dims < 1).any() or dims[0] % block_size:
                    raise ReffuseError(f"{where}: tensor {name} has dimensions {dims.tolist()}, which {qtype.name} "
                                       f"(blocks of {block_size}) cannot hold: the file is corrupt")
                n_bytes = int(np.prod(dims)) * type_size // block_size
                start = int(offset[0])
                if start % self.alignment:
                    raise ReffuseError(f"{where}: tensor {name} starts at offset {start}, not a multiple of the "
                                       f"file's alignment {self.alignment}: the file is corrupt")
                end = int(start_offs) + start + n_bytes
                if end > len(self.data):
                    raise ReffuseError(
                        f"{where} is truncated: tensor {name} ({qtype.name}, {n_bytes} bytes) ends at byte {end}, "
                        f"but the file has {len(self.data)}")
                extents.append((start, start + n_bytes, name))
            extents.sort()
            for (_, end, first), (start, _, second) in zip(extents, extents[1:]):
                if start < end:
                    raise ReffuseError(f"{where}: tensors {first} and {second} overlap (bytes {start}..{end} of the "
                                       "data): the file is corrupt or was written wrongly")
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


def _typed(value, kind: str, key: str, path) -> object:
    """A metadata value checked to be of `kind` ("integer", "number", "text", or "integers": one or per layer)."""
    def is_integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    ok = {"integer": is_integer(value),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "text": isinstance(value, str),
          "integers": is_integer(value) or (isinstance(value, list) and all(map(is_integer, value)))}[kind]
    if not ok:
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        raise ReffuseError(f"{path}: metadata {key} is {shown}, not {'an' if kind == 'integer' else 'a'} {kind} "
                           "value as the format gives it: the file is corrupt or was written wrongly")
    return value


def _json_metadata(reader, key: str, path):
    """reffuse's own JSON metadata (None if absent), checked to parse."""
    text = metadata_value(reader, key)
    if text is None:
        return None
    try:
        return json.loads(_typed(text, "text", key, path))
    except (json.JSONDecodeError, RecursionError):
        raise ReffuseError(f"{path}: metadata {key} is not valid JSON: the file is corrupt or was written "
                           "wrongly; export the model again") from None


def rope_scaling_from_gguf(reader, architecture: str, head_dim: int, path) -> RopeScaling | None:
    """The RoPE scaling of a GGUF: reffuse's own record, else `rope_freqs` (per-frequency factors), else the
    metadata's `linear` scaling; any other scaling type refused by name."""
    kind = _typed(metadata_value(reader, f"{architecture}.rope.scaling.type", "none"), "text",
                  f"{architecture}.rope.scaling.type", path)
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if kind not in ("none", "linear"):
        raise ReffuseError(f"{path}: {architecture}.rope.scaling.type is {kind!r}, which reffuse does not compute "
                           "(it computes linear and llama.cpp's rope_freqs factors)")
    recorded = _json_metadata(reader, ROPE_SCALING_KEY, path)
    if recorded is not None:
        return rope_from_json({"rope_scaling": recorded}, f"{path}: {ROPE_SCALING_KEY}")[1]
    if freqs is not None:
        factors = dequantize(freqs, path).astype(np.float64).ravel()
        if factors.size != head_dim // 2:
            raise ReffuseError(f"{path}: {ROPE_FREQS} has {factors.size} factors; RoPE on head_dim {head_dim} "
                               f"needs {head_dim // 2}")
        return RopeScaling("factors", factors=tuple(float(f) for f in factors))
    if kind == "linear":
        factor = _typed(metadata_value(reader, f"{architecture}.rope.scaling.factor"), "number",
                        f"{architecture}.rope.scaling.factor", path)
        return RopeScaling("linear", float(factor))
    return None


def config_from_gguf(reader, path) -> tuple[Config, tuple[BlockLayout, ...]]:
    """Config and per-block layout from the metadata of a `llama` or `qwen2` GGUF, or of a `deci` one (llama.cpp's
    Nemotron-NAS architecture: per-layer head counts and FFN widths, 0 where a sub-block is absent, key/value heads
    0 under query heads for a linear attention)."""
    architecture = metadata_value(reader, "general.architecture")
    if architecture not in ARCHITECTURES:
        raise ReffuseError(f"{path}: general.architecture is {architecture!r}; reffuse loads Llama-architecture "
                           f"models ({', '.join(map(repr, ARCHITECTURES))})")

    def value(name, kind, default=None):
        key = f"{architecture}.{name}"
        found = metadata_value(reader, key, default)
        if found is None:
            raise ReffuseError(f"{path}: metadata key {key} is missing")
        return _typed(found, kind, key, path)

    n_blocks = value("block_count", "integer")

    def per_layer(name, default=None):
        found = value(name, "integers", default)
        found = found if isinstance(found, list) else [found] * n_blocks
        if len(found) != n_blocks:
            raise ReffuseError(f"{path}: {architecture}.{name} lists {len(found)} layers, the model has {n_blocks}")
        return found

    if value("expert_count", "integer", 0):
        raise ReffuseError(f"{path}: a mixture-of-experts model ({architecture}.expert_count = "
                           f"{value('expert_count', 'integer')}) is not supported")
    tensor_names = {t.name for t in reader.tensors}
    vocab = metadata_value(reader, f"{architecture}.vocab_size")
    if vocab is None:  # files without the key: the tokenizer's length, else the embedding's rows
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens.data) if tokens else int(embed.shape[1]) if embed is not None else value("vocab_size",
                                                                                                     "integer")
    vocab = _typed(vocab, "integer", f"{architecture}.vocab_size", path)
    dim = value("embedding_length", "integer")
    heads, kv_heads = per_layer("attention.head_count"), per_layer("attention.head_count_kv",
                                                                   value("attention.head_count", "integers"))
    query_heads = {h for h in heads if h}
    if len(query_heads) > 1:
        raise ReffuseError(f"{path}: {architecture}.attention.head_count differs between layers "
                           f"({sorted(query_heads)}): reffuse takes one query head count for all blocks")
    recorded_kv = metadata_value(reader, KV_HEADS_KEY)
    # a model without attention anywhere: any head count computes the same; reffuse's own export records its own
    n_heads = query_heads.pop() if query_heads else _typed(recorded_kv or 1, "integer", KV_HEADS_KEY, path)
    if n_heads < 1:
        raise ReffuseError(f"{path}: {architecture}.attention.head_count is {n_heads}: it must be at least 1")
    head_dim = value("attention.key_length", "integer", dim // n_heads)
    if value("attention.value_length", "integer", head_dim) != head_dim:
        raise ReffuseError(f"{path}: keys of {head_dim} and values of {value('attention.value_length', 'integer')} "
                           "dimensions per head: reffuse takes one head_dim for both")
    if value("rope.dimension_count", "integer", head_dim) != head_dim:
        raise ReffuseError(f"{path}: RoPE on {value('rope.dimension_count', 'integer')} of {head_dim} head "
                           "dimensions (partial rotary) is not supported")
    model_kv = next((kv for h, kv in zip(heads, kv_heads) if h and kv), n_heads)
    if recorded_kv is not None:
        model_kv = _typed(recorded_kv, "integer", KV_HEADS_KEY, path)
    config = Config(vocab_size=vocab, dim=dim, n_heads=n_heads, n_kv_heads=model_kv, head_dim=head_dim,
                    rope_theta=float(value("rope.freq_base", "number", 10000.0)),
                    norm_eps=float(value("attention.layer_norm_rms_epsilon", "number")),
                    tie_embeddings="output.weight" not in tensor_names, name=Path(path).stem,
                    max_positions=value("context_length", "integer", 0) or None,
                    rope_scaling=rope_scaling_from_gguf(reader, architecture, head_dim, path),
                    qkv_bias=any(n.endswith("attn_q.bias") for n in tensor_names),
                    o_bias=any(n.endswith("attn_output.bias") for n in tensor_names))
    widths = per_layer("feed_forward_length")
    blocks = tuple(BlockLayout(bool(h), int(w), kv_heads=None if not h or not kv or kv == model_kv else int(kv),
                               linear_attention=bool(h) and not kv)
                   for h, kv, w in zip(heads, kv_heads, widths))
    return check_config(config, str(path)), blocks


def recorded_layout(reader, blocks, path):
    """The layout reffuse's own export recorded (fused_from included; None for another file), checked against
    the per-layer arrays: the same attention, each FFN at most as wide (an engine's workaround may stand a zero
    FFN in for an absent one)."""
    recorded = _json_metadata(reader, LAYOUT_KEY, path)
    if recorded is None:
        return None
    exact = blocks_from_json(recorded, f"{path}: {LAYOUT_KEY}")
    if len(exact) != len(blocks) or any(
            (e.attention, e.kv_heads, e.linear_attention) != (b.attention, b.kv_heads, b.linear_attention)
            or e.ffn_width > b.ffn_width for e, b in zip(exact, blocks)):
        raise ReffuseError(f"{path}: {LAYOUT_KEY} disagrees with the per-layer head counts and FFN widths")
    return exact


def dequantize(tensor, path) -> np.ndarray:
    """One tensor as float32 in numpy's (HF's) order: (out, in) for a weight matrix."""
    gguf = require("gguf", "real", "reading a GGUF file")
    qtype = tensor.tensor_type
    if qtype.name in ("I8", "I16", "I32", "I64"):
        raise ReffuseError(f"{path}: tensor {tensor.name} has type {qtype.name}, integers, not weights: reffuse "
                           "loads float (F32, F16, BF16, F64) and llama.cpp's block-quantized tensors")
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
    recorded = recorded_layout(reader, blocks, path)
    interleaved = metadata_value(reader, "general.architecture") in INTERLEAVED_ROPE
    tensors = {}
    with Progress(f"dequantizing {path.name}", len(reader.tensors), "tensors") as bar:
        for tensor in reader.tensors:
            bar.update()
            if tensor.name == ROPE_FREQS:  # read into the config's RoPE scaling
                continue
            name, values = hf_name(tensor.name), dequantize(tensor, path)
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
            if layer is not None and layer < len(blocks) and blocks[layer].linear_attention and \
                    name.endswith("o_proj.weight"):  # deci's linear attention is its attn_output alone
                name = names.block_prefix(layer) + names.LINEAR_ATTENTION_NAMES["weight"]
            heads = None
            if interleaved and name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = config.n_heads
            elif interleaved and name.endswith(("k_proj.weight", "k_proj.bias")) and layer < len(blocks):
                heads = blocks[layer].kv_heads or config.n_kv_heads
            if heads and values.shape[0] == heads * config.head_dim:  # a misshaped one is reported below
                values = rope_rows_to_rotate_half(values, heads)
            tensors[name] = values
    model = model_from_tensors(config, blocks, tensors, str(path))
    return cast(unpadded(model, recorded) if recorded is not None else model, dtype)
