"""Saving and loading models as HF-like folders: `config.json` + safetensors, HF Llama tensor names, no pickle.

A reffuse folder's config.json has HF Llama's keys plus `blocks`, one entry per block:
    {"attention": true|false, "ffn_width": int (0 = no FFN), "fused_from": [original layer indices],
     and where set: "kv_heads": int, "linear_attention": true, "linear_ffn": true}
A block without attention has no attention tensors; a fused block stands where its run began.
HF folders load too: Llama, Qwen2, Mistral and Nemotron-NAS; their config.json is read, and each of its keys
checked, by reffuse.formats.hf_config. This module holds the tensors: their names and shapes, safetensors read
(F16, BF16, F32, F64) and written, and whole folders saved and loaded.
A plain model is written so that transformers loads it as it is (save_model): as Llama, Qwen2 or Mistral.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.config import Config
from reffuse.core.layout import BlockLayout
from reffuse.errors import ReffuseError
from reffuse.files import read_json
from reffuse.core import names
from reffuse.core.model import FFN, Attention, Block, Linear, Model, cast, has_heads, to_device
from reffuse.formats.hf_config import FORMAT_VERSION, config_from_json, read_config
from reffuse.formats.nemotron_nas import MODEL_TYPE, as_recorded, nemotron_blocks, nemotron_config, reffuse_layout
from reffuse.optional import require
from reffuse.outputs import staged_folder

WEIGHTS_FILE = "model.safetensors"


def block_tensor_shapes(config: Config, block: BlockLayout, prefix: str) -> dict[str, tuple]:
    """The name and shape of every tensor of one block (names after `prefix`, e.g. "model.layers.3.")."""
    d, hd, shapes = config.dim, config.head_dim, {}
    if block.linear_attention:
        shapes.update({prefix + names.LINEAR_ATTENTION_NAMES["norm_gain"]: (d,),
                       prefix + names.LINEAR_ATTENTION_NAMES["weight"]: (d, d)})
    elif block.attention:
        q, kv = config.n_heads * hd, (block.kv_heads or config.n_kv_heads) * hd
        wanted = {"norm_gain": (d,), "q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q)}
        if config.qkv_bias:
            wanted.update(q_bias=(q,), k_bias=(kv,), v_bias=(kv,))
        if config.o_bias:
            wanted["o_bias"] = (d,)
        shapes.update({prefix + names.ATTENTION_NAMES[field]: shape for field, shape in wanted.items()})
    if block.linear_ffn:
        shapes.update({prefix + names.LINEAR_FFN_NAMES["norm_gain"]: (d,),
                       prefix + names.LINEAR_FFN_NAMES["weight"]: (d, d)})
    elif block.ffn_width:
        w = block.ffn_width
        wanted = {"norm_gain": (d,), "gate": (w, d), "up": (w, d), "down": (d, w)}
        shapes.update({prefix + names.FFN_NAMES[field]: shape for field, shape in wanted.items()})
    return shapes


def tensor_shapes(config: Config, blocks) -> dict[str, tuple]:
    """The name and shape of every tensor a model with this config and block layout has."""
    shapes = {names.EMBED: (config.vocab_size, config.dim), names.FINAL_NORM: (config.dim,)}
    for i, block in enumerate(blocks):
        shapes.update(block_tensor_shapes(config, block, names.block_prefix(i)))
    if not config.tie_embeddings:
        shapes[names.LM_HEAD] = (config.vocab_size, config.dim)
    return shapes


def model_to_tensors(model: Model) -> dict[str, np.ndarray]:
    """HF Llama names -> NumPy arrays."""
    return {name: np.ascontiguousarray(to_numpy(t)) for name, t in names.named_weights(model).items()}


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

    def part(cls, field_names, prefix):
        return cls(**{field: tensors.get(prefix + hf) for field, hf in field_names.items() if prefix + hf in tensors})

    model_blocks = []
    for i, block in enumerate(blocks):
        prefix = names.block_prefix(i)
        attention = ffn = None
        if block.linear_attention:
            attention = part(Linear, names.LINEAR_ATTENTION_NAMES, prefix)
        elif block.attention:
            attention = part(Attention, names.ATTENTION_NAMES, prefix)
        if block.linear_ffn:
            ffn = part(Linear, names.LINEAR_FFN_NAMES, prefix)
        elif block.ffn_width:
            ffn = part(FFN, names.FFN_NAMES, prefix)
        model_blocks.append(Block(attention, ffn, block.fused_from))
    embed = tensors[names.EMBED]
    lm_head = embed if config.tie_embeddings else tensors[names.LM_HEAD]
    return Model(config, embed, model_blocks, tensors[names.FINAL_NORM], lm_head)


def is_model_folder(folder) -> bool:
    """A folder that save_model or save_nemotron_nas wrote (its config.json says so): one they may replace."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
        return raw.get("format") == "reffuse" or "reffuse_blocks" in raw
    except (OSError, ValueError, AttributeError):
        return False


def is_plain_llama(model: Model) -> bool:
    """Every block with attention (heads, the model's key/value heads) and one SwiGLU FFN width, nothing fused:
    what transformers' Llama and llama.cpp's `llama` architecture hold."""
    blocks = model.layout().blocks
    return (all(b.has_heads and b.kv_heads is None and not b.linear_ffn and not b.fused_from for b in blocks)
            and len({b.ffn_width for b in blocks}) == 1 and blocks[0].ffn_width > 0)


def hf_model_type(model: Model) -> str | None:
    """The transformers class family that holds a model as it is: qwen2 (q/k/v biases and no o bias), mistral
    (a sliding window), llama (any biases, as attention_bias with zeros where one is absent); None for a model
    none holds (not a plain Llama, RoPE by per-frequency factors, a sliding window with an o bias)."""
    cfg = model.config
    if not is_plain_llama(model) or (cfg.rope_scaling is not None and cfg.rope_scaling.kind == "factors"):
        return None
    if cfg.qkv_bias and not cfg.o_bias:
        return "qwen2"
    if cfg.attention_window is not None:
        return None if cfg.o_bias or cfg.qkv_bias else "mistral"
    return "llama"


HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _rope_json(cfg: Config) -> dict:
    """RoPE as config.json holds it, in the keys transformers 4 writes and transformers 5 still reads."""
    rope = {"rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope["rope_scaling"] = cfg.rope_scaling.to_json()
    return rope


def write_model_files(model: Model, folder: Path) -> None:
    """config.json and model.safetensors, written into the existing folder `folder`."""
    save_file = require("safetensors.numpy", "real", "saving a model").save_file
    cfg = model.config
    hf_type = hf_model_type(model)
    plain, model_type = hf_type is not None, hf_type or "llama"
    config = {
        "format": "reffuse", "format_version": FORMAT_VERSION,
        "architectures": [HF_ARCHITECTURES[model_type]], "model_type": model_type, "name": cfg.name,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, **_rope_json(cfg),
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "torch_dtype": str(model.dtype), "num_hidden_layers": len(model.blocks),
        "attention_bias": cfg.qkv_bias or cfg.o_bias, "mlp_bias": False,
        "blocks": [b.to_json() for b in model.layout().blocks],
    }
    if cfg.max_positions is not None:
        config["max_position_embeddings"] = cfg.max_positions
    if cfg.attention_window is not None:
        config["sliding_window"] = cfg.attention_window
    if model_type == "qwen2":  # transformers' Qwen2 has q/k/v biases and no o bias by construction
        del config["attention_bias"], config["mlp_bias"]
        if cfg.attention_window is not None:
            config.update(use_sliding_window=True, max_window_layers=0)
    tensors = model_to_tensors(model)
    if model_type == "llama" and (cfg.qkv_bias or cfg.o_bias):  # attention_bias: all four, zeros where absent
        tensors = _with_zero_biases(model, tensors)
    if plain:  # with these keys transformers' from_pretrained loads it as it is
        config["intermediate_size"] = model.layout().blocks[0].ffn_width
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})  # transformers reads "pt"


def _with_zero_biases(model: Model, tensors: dict) -> dict:
    """tensors with a zero bias for each of q, k, v and o that the model lacks (they add exactly nothing)."""
    tensors = dict(tensors)
    for i, block in enumerate(model.blocks):
        if not has_heads(block.attention):
            continue
        prefix = names.block_prefix(i)
        for field in ("q", "k", "v"):
            tensors.setdefault(prefix + names.ATTENTION_NAMES[f"{field}_bias"],
                               np.zeros(getattr(block.attention, field).shape[0], model.dtype))
        tensors.setdefault(prefix + names.ATTENTION_NAMES["o_bias"], np.zeros(model.config.dim, model.dtype))
    return tensors


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
        tensors = model_to_tensors(written)
        if model.config.qkv_bias or model.config.o_bias:  # DeciLM's attention_bias: all four, zeros where absent
            tensors = _with_zero_biases(written, tensors)
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(staging)
    return folder


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


# The weight dtypes a model loads from; integer, boolean or complex tensors are no model's weights.
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    safe_open = require("safetensors", "real", "loading a model folder").safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            wrong = {name: dtype for name, dtype in dtypes.items() if dtype not in WEIGHT_DTYPES}
            if wrong:
                name = next(iter(wrong))
                raise ReffuseError(f"{path}: tensor {name} is {wrong[name]}, not a float type reffuse loads weights "
                                   f"from ({', '.join(WEIGHT_DTYPES)}; {len(wrong)} such tensors): the file is "
                                   "not a model's weights, or was converted wrongly")
            bfloat16 = [name for name, dtype in dtypes.items() if dtype == "BF16"]
            tensors = {name: f.get_tensor(name) for name in f.keys() if name not in bfloat16}
        return tensors | _read_bfloat16(path, bfloat16)
    except ReffuseError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ReffuseError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}); "
                           "the file may be truncated or of another format") from None


def _regular_files(paths: list[Path]) -> list[Path]:
    """`paths`, refusing any that is not a regular file (a pipe would block the read forever)."""
    for path in paths:
        if not path.is_file():
            raise ReffuseError(f"{path} is not a regular file (a folder, pipe or device): weights are read from "
                               "plain files only; replace it with the file itself")
    return paths


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those its model.safetensors.index.json lists (an HF sharded checkpoint, all
    of which must be there), else every *.safetensors in it."""
    index_path = folder / "model.safetensors.index.json"
    if not index_path.exists():
        return _regular_files(sorted(folder.glob("*.safetensors")))
    _regular_files([index_path])
    index = read_json(index_path, "download the checkpoint's index again")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ReffuseError(f"{index_path} is not a valid safetensors index (it needs a weight_map of tensor -> file)")
    shards = sorted(set(map(str, weight_map.values())))
    if any(Path(name).name != name for name in shards):
        raise ReffuseError(f"{index_path} names weight files outside its folder ({shards[:3]}): refused")
    missing = [name for name in shards if not (folder / name).exists()]
    if missing:
        more = " ..." if len(missing) > 3 else ""
        raise ReffuseError(f"{folder} is incomplete: {len(missing)} of the {len(shards)} weight files listed in "
                           f"{index_path.name} are missing ({', '.join(missing[:3])}{more}); download them into "
                           "the folder")
    return _regular_files([folder / name for name in shards])


def load_folder(folder, dtype="float32") -> Model:
    """Load a folder written by save_model, or an HF Llama checkpoint folder (config.json + *.safetensors)."""
    folder = Path(folder)
    raw = read_config(folder)
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

