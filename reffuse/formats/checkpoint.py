"""Saving and loading models as HF-like folders: `config.json` + safetensors, HF Llama tensor names, no pickle.

A reffuse folder's config.json has HF Llama's keys plus `blocks`, one entry per block:
    {"attention": true|false, "ffn_width": int (0 = no FFN), "fused_from": [original layer indices] }
A block without attention has no attention tensors; a fused block stands where its run began.
A plain HF Llama folder (no `blocks`) loads too: every block then has attention and `intermediate_size` units.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.layout import BlockLayout, blocks_from_json
from reffuse.errors import ReffuseError
from reffuse.files import read_json, staged_folder
from reffuse.core.model import FFN, Attention, Block, Config, Model, cast, to_device
from reffuse.formats.nemotron_nas import (MODEL_TYPE, as_recorded, blocks_from_nemotron, heads_in_group_kv,
                                         nemotron_blocks, nemotron_config, reffuse_layout)
from reffuse.optional import require

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def tensor_shapes(config: Config, blocks) -> dict[str, tuple]:
    """The name and shape of every tensor a model with this config and block layout has."""
    d, hd = config.dim, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    for i, block in enumerate(blocks):
        prefix = f"model.layers.{i}"
        if block.attention:
            shapes[f"{prefix}.input_layernorm.weight"] = (d,)
            shapes[f"{prefix}.self_attn.q_proj.weight"] = (config.n_heads * hd, d)
            shapes[f"{prefix}.self_attn.k_proj.weight"] = (config.n_kv_heads * hd, d)
            shapes[f"{prefix}.self_attn.v_proj.weight"] = (config.n_kv_heads * hd, d)
            shapes[f"{prefix}.self_attn.o_proj.weight"] = (d, config.n_heads * hd)
        if block.ffn_width:
            width = block.ffn_width
            shapes[f"{prefix}.post_attention_layernorm.weight"] = (d,)
            shapes[f"{prefix}.mlp.gate_proj.weight"] = (width, d)
            shapes[f"{prefix}.mlp.up_proj.weight"] = (width, d)
            shapes[f"{prefix}.mlp.down_proj.weight"] = (d, width)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def model_to_tensors(model: Model) -> dict[str, np.ndarray]:
    """HF Llama names -> NumPy arrays."""
    tensors = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm_gain}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        if block.attention is not None:
            a = block.attention
            tensors[f"{prefix}.input_layernorm.weight"] = a.norm_gain
            for name in "qkvo":
                tensors[f"{prefix}.self_attn.{name}_proj.weight"] = getattr(a, name)
        if block.ffn is not None:
            f = block.ffn
            tensors[f"{prefix}.post_attention_layernorm.weight"] = f.norm_gain
            for name in ("gate", "up", "down"):
                tensors[f"{prefix}.mlp.{name}_proj.weight"] = getattr(f, name)
    if not model.config.tie_embeddings:
        tensors["lm_head.weight"] = model.lm_head
    return {name: np.ascontiguousarray(to_numpy(t)) for name, t in tensors.items()}


def model_from_tensors(config: Config, blocks, tensors: dict[str, np.ndarray], source: str) -> Model:
    """Build a Model from HF-named tensors after checking that names and shapes match exactly.

    `source` names the file or folder in error messages. Other loaders (GGUF, HF folders) end here too.
    """
    expected = tensor_shapes(config, blocks)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    misshaped = [f"{n} is {tuple(tensors[n].shape)}, expected {expected[n]}"
                 for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    if misshaped:
        problems.append("wrong shapes: " + "; ".join(misshaped[:5]))
    if problems:
        raise ReffuseError(f"{source} does not match its config ({len(blocks)} blocks): " + " | ".join(problems))

    model_blocks = []
    for i, block in enumerate(blocks):
        prefix = f"model.layers.{i}"
        attention = ffn = None
        if block.attention:
            attention = Attention(norm_gain=tensors[f"{prefix}.input_layernorm.weight"],
                                  **{n: tensors[f"{prefix}.self_attn.{n}_proj.weight"] for n in "qkvo"})
        if block.ffn_width:
            ffn = FFN(norm_gain=tensors[f"{prefix}.post_attention_layernorm.weight"],
                      **{n: tensors[f"{prefix}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")})
        model_blocks.append(Block(attention, ffn, block.fused_from))
    embed = tensors["model.embed_tokens.weight"]
    lm_head = embed if config.tie_embeddings else tensors["lm_head.weight"]
    return Model(config, embed, model_blocks, tensors["model.norm.weight"], lm_head)


def is_model_folder(folder) -> bool:
    """A folder that save_model or save_nemotron_nas wrote (its config.json says so): one they may replace."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
        return raw.get("format") == "reffuse" or "reffuse_blocks" in raw
    except (OSError, ValueError, AttributeError):
        return False


def is_plain_llama(model: Model) -> bool:
    """Every block with attention and one FFN width, nothing fused: what transformers' Llama and llama.cpp's
    `llama` architecture hold."""
    blocks = model.layout().blocks
    return all(b.attention and not b.fused_from for b in blocks) and len({b.ffn_width for b in blocks}) == 1


def write_model_files(model: Model, folder: Path) -> None:
    """config.json and model.safetensors, written into the existing folder `folder`."""
    save_file = require("safetensors.numpy", "real", "saving a model").save_file
    cfg = model.config
    config = {
        "format": "reffuse", "format_version": FORMAT_VERSION,
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "name": cfg.name,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "torch_dtype": str(model.dtype), "num_hidden_layers": len(model.blocks),
        "blocks": [b.to_json() for b in model.layout().blocks],
    }
    if cfg.max_positions is not None:
        config["max_position_embeddings"] = cfg.max_positions
    if is_plain_llama(model):  # with these keys transformers' LlamaForCausalLM.from_pretrained loads it as it is
        config.update(intermediate_size=model.layout().blocks[0].ffn_width, attention_bias=False, mlp_bias=False)
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(model_to_tensors(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})  # transformers reads "pt"


def save_model(model: Model, folder, overwrite: bool = False, tokenizer=None, files: dict | None = None) -> Path:
    """Write the model as a folder: config.json and model.safetensors, with the tokenizer's files when given
    and `files` (name -> text). All or nothing: the folder is built under a temporary name and renamed into
    place, so an interrupted save leaves the old folder (or none) and a finished one leaves no stale file.
    A folder holding another reffuse model is replaced only when `overwrite`; one holding anything else, never."""
    folder = Path(folder)
    with staged_folder(folder, overwrite, is_model_folder, "model") as staging:
        write_model_files(model, staging)
        if tokenizer is not None:
            tokenizer.save(staging)
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
    return folder


def save_nemotron_nas(model: Model, folder, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the model as a Nemotron-NAS (DeciLM) folder (reffuse.formats.nemotron_nas), all or nothing."""
    model = to_device(model, "cpu")
    block_configs, blocks = nemotron_blocks(model)
    written = dataclasses.replace(model, blocks=blocks)
    save_file = require("safetensors.numpy", "real", "saving a model").save_file
    folder = Path(folder)
    with staged_folder(folder, overwrite, is_model_folder, "model") as staging:
        (staging / "config.json").write_text(json.dumps(nemotron_config(model, block_configs), indent=1) + "\n")
        save_file(model_to_tensors(written), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(staging)
    return folder


def _read_config(folder: Path) -> dict:
    return read_json(folder / "config.json", "a model folder holds config.json and *.safetensors (write one with "
                     "reffuse.save_model)")


def _boolean(raw: dict, key: str, default: bool, source: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ReffuseError(f"{source}: config.json's {key} must be true or false, got {value!r}")
    return value


def check_config(config: Config, source: str) -> Config:
    """Refuse a config that would build a model that fails later or computes something else, naming the key."""
    problems = []
    for key in ("vocab_size", "dim", "n_heads", "n_kv_heads", "head_dim"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            problems.append(f"{key} must be a positive integer, got {value!r}")
    if not problems and config.n_heads % config.n_kv_heads:
        problems.append(f"n_kv_heads {config.n_kv_heads} does not divide n_heads {config.n_heads}")
    for key in ("norm_eps", "rope_theta"):
        value = getattr(config, key)
        if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
            problems.append(f"{key} must be a finite number > 0, got {value!r}")
    if not isinstance(config.tie_embeddings, (bool, np.bool_)):
        problems.append(f"tie_embeddings must be true or false, got {config.tie_embeddings!r}")
    if config.max_positions is not None and (isinstance(config.max_positions, bool) or config.max_positions < 1):
        problems.append(f"max_positions must be a positive integer, got {config.max_positions!r}")
    if problems:
        raise ReffuseError(f"{source}: " + "; ".join(problems))
    return config


def config_from_json(raw: dict, source: str) -> tuple[Config, tuple[BlockLayout, ...]]:
    """Config and per-block layout from a reffuse or HF Llama config.json, checked before any weight is read."""
    if not isinstance(raw, dict):
        raise ReffuseError(f"{source}: config.json must hold a JSON object")
    if raw.get("model_type", "llama") not in ("llama", MODEL_TYPE):
        raise ReffuseError(f"{source}: model_type {raw.get('model_type')!r} is not supported; reffuse loads "
                           f"Llama-architecture models (model_type 'llama' or {MODEL_TYPE!r})")
    if raw.get("format") == "reffuse" and raw.get("format_version") != FORMAT_VERSION:
        raise ReffuseError(f"{source}: format_version {raw.get('format_version')!r} is not one this reffuse reads "
                           f"({FORMAT_VERSION}): save the model again with this version, or upgrade reffuse")
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise ReffuseError(f"{source}: hidden_act {activation!r} is not supported: reffuse's FFN is SwiGLU (silu)")
    if raw.get("rope_scaling"):
        raise ReffuseError(f"{source}: rope_scaling {raw['rope_scaling']!r} is not supported (plain RoPE only)")

    def integer(key, default=None):
        value = raw.get(key, default)
        if value is None:
            raise KeyError(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReffuseError(f"{source}: config.json's {key} must be an integer, got {value!r}")
        return value

    def number(key, default):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReffuseError(f"{source}: config.json's {key} must be a number, got {value!r}")
        return float(value)

    try:
        n_heads, dim = integer("num_attention_heads"), integer("hidden_size")
        if raw.get("head_dim") is not None:
            head_dim = integer("head_dim")
        elif n_heads >= 1 and dim % n_heads == 0:
            head_dim = dim // n_heads
        else:
            raise ReffuseError(f"{source}: num_attention_heads {n_heads} does not divide hidden_size {dim} "
                               "(and no head_dim is given)")
        kv_default = heads_in_group_kv(raw, n_heads) if raw.get("model_type") == MODEL_TYPE else n_heads
        config = Config(vocab_size=integer("vocab_size"), dim=dim, n_heads=n_heads,
                        n_kv_heads=integer("num_key_value_heads", kv_default), head_dim=head_dim,
                        rope_theta=number("rope_theta", 10000.0), norm_eps=number("rms_norm_eps", 1e-5),
                        tie_embeddings=_boolean(raw, "tie_word_embeddings", False, source),
                        name=str(raw.get("name") or raw.get("_name_or_path") or source),
                        max_positions=raw.get("max_position_embeddings") and integer("max_position_embeddings"))
        layers = integer("num_hidden_layers")
        if raw.get("model_type") == MODEL_TYPE:
            blocks = blocks_from_nemotron(raw, source)
            if len(blocks) != layers:
                raise ReffuseError(f"{source}: num_hidden_layers is {layers} but block_configs lists {len(blocks)}")
        elif "blocks" in raw:
            blocks = blocks_from_json(raw["blocks"], source)
            if len(blocks) != layers:
                raise ReffuseError(f"{source}: num_hidden_layers is {layers} but blocks lists {len(blocks)}")
        else:
            blocks = (BlockLayout(True, integer("intermediate_size")),) * layers
    except KeyError as e:
        raise ReffuseError(f"{source}: config.json lacks the key {e.args[0]!r}") from None
    return check_config(config, source), blocks


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values, given as their uint16 bit patterns, as float32 (exactly).

    bfloat16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits); NumPy has no such dtype,
    so the bits are shifted into the high half of a uint32 and reinterpreted.
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _read_bfloat16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The BF16 tensors `names` of a safetensors file, read from its header's offsets, as float32."""
    with open(path, "rb") as f:
        header_bytes = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_bytes))
    tensors = {}
    for name in names:
        start, end = header[name]["data_offsets"]
        bits = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + header_bytes + start)
        tensors[name] = bfloat16_to_float32(bits).reshape(header[name]["shape"])
    return tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    safe_open = require("safetensors", "real", "loading a model folder").safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            bfloat16 = [name for name in f.keys() if f.get_slice(name).get_dtype() == "BF16"]
            tensors = {name: f.get_tensor(name) for name in f.keys() if name not in bfloat16}
        return tensors | _read_bfloat16(path, bfloat16)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ReffuseError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}); "
                           "the file may be truncated or of another format") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those its model.safetensors.index.json lists (an HF sharded checkpoint, all
    of which must be there), else every *.safetensors in it."""
    index_path = folder / "model.safetensors.index.json"
    if not index_path.is_file():
        return sorted(folder.glob("*.safetensors"))
    index = read_json(index_path, "download the checkpoint's index again")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ReffuseError(f"{index_path} is not a valid safetensors index (it needs a weight_map of tensor -> file)")
    shards = sorted(set(map(str, weight_map.values())))
    if any(Path(name).name != name for name in shards):
        raise ReffuseError(f"{index_path} names weight files outside its folder ({shards[:3]}): refused")
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise ReffuseError(f"{folder} is incomplete: {len(missing)} of the {len(shards)} weight files listed in "
                           f"{index_path.name} are missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})"
                           "; download them into the folder")
    return [folder / name for name in shards]


def load_folder(folder, dtype="float32") -> Model:
    """Load a folder written by save_model, or an HF Llama checkpoint folder (config.json + *.safetensors)."""
    folder = Path(folder)
    raw = _read_config(folder)
    config, blocks = config_from_json(raw, str(folder))
    files = weight_files(folder)
    if not files:
        pickled = " (reffuse reads no pickled *.bin / *.pt weights: save them as safetensors)" if any(
            folder.glob("*.bin")) or any(folder.glob("*.pt")) else ""
        raise ReffuseError(f"{folder} has config.json but no *.safetensors weights{pickled}")
    tensors = {}
    for path in files:
        tensors.update(_read_safetensors(path))
    bad = next((name for name, t in tensors.items() if t.dtype.kind == "f" and not np.isfinite(t).all()), None)
    if bad is not None:
        raise ReffuseError(f"{folder}: tensor {bad} holds non-finite values (NaN or inf): the weights are corrupt")
    if raw.get("format") != "reffuse":  # HF folders: tolerate what HF itself ignores
        tensors = {n: t for n, t in tensors.items() if not n.endswith("rotary_emb.inv_freq")}
        if config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
    model = model_from_tensors(config, blocks, tensors, str(folder))
    recorded = reffuse_layout(raw, str(folder)) if raw.get("model_type") == MODEL_TYPE else None
    return cast(as_recorded(model, recorded) if recorded is not None else model, dtype)

