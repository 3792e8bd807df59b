"""Saving and loading models as HF-like folders: `config.json` + safetensors, HF Llama tensor names, no pickle.

A reffuse folder's config.json has HF Llama's keys plus `blocks`, one entry per block:
    {"attention": true|false, "ffn_width": int (0 = no FFN), "fused_from": [original layer indices],
     and where set: "kv_heads": int, "linear_attention": true, "linear_ffn": true}
A block without attention has no attention tensors; a fused block stands where its run began.
HF folders load too: Llama, Qwen2 (q/k/v biases) and Mistral (a sliding window, computed exactly within it),
every block then with attention and `intermediate_size` units; and Nemotron-NAS folders (reffuse.formats.
nemotron_nas). RoPE is read from either schema: transformers 4's top-level rope_theta and rope_scaling, or
transformers 5's rope_parameters; scaling `linear` and `llama3` are computed. Every config.json key is read or
known not to change the arithmetic (READ_KEYS, ARITHMETIC_FREE_KEYS); any other is refused by name.
A plain model is written so that transformers loads it as it is (save_model): as Llama, Qwen2 or Mistral.
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
from reffuse.core import names
from reffuse.core.model import (FFN, ROPE_SCALINGS, Attention, Block, Config, Linear, Model, RopeScaling, cast,
                                has_heads, to_device)
from reffuse.formats.nemotron_nas import (MODEL_TYPE, as_recorded, blocks_from_nemotron, heads_in_group_kv,
                                         nemotron_blocks, nemotron_config, reffuse_layout)
from reffuse.optional import require

FORMAT_VERSION = 1
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


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if path.exists() and not path.is_file():
        raise ReffuseError(f"{path} is not a regular file (a folder, pipe or device): a model folder holds "
                           "config.json and *.safetensors as plain files")
    try:
        return read_json(path, "a model folder holds config.json and *.safetensors (write one with "
                         "reffuse.save_model)")
    except RecursionError:  # json nests by recursion: a hostile file can exhaust the stack
        raise ReffuseError(f"{path} nests its JSON values too deeply to be a model config: replace it with the "
                           "model's own config.json") from None


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
    if not problems and config.head_dim % 2:
        problems.append(f"head_dim {config.head_dim} is odd: RoPE rotates pairs of dimensions, so it must be even")
    for key in ("norm_eps", "rope_theta"):
        value = getattr(config, key)
        if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
            problems.append(f"{key} must be a finite number > 0, got {value!r}")
    if not isinstance(config.tie_embeddings, (bool, np.bool_)):
        problems.append(f"tie_embeddings must be true or false, got {config.tie_embeddings!r}")
    for key in ("max_positions", "attention_window"):
        value = getattr(config, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            problems.append(f"{key} must be a positive integer, got {value!r}")
    scaling = config.rope_scaling
    if scaling is not None:
        numbers = [scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, *scaling.factors]
        if scaling.kind not in ROPE_SCALINGS:
            problems.append(f"rope scaling {scaling.kind!r} is not one reffuse computes ({', '.join(ROPE_SCALINGS)})")
        elif not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in numbers):
            problems.append(f"the RoPE scaling factors must be finite numbers > 0, got {scaling}")
        elif scaling.kind == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
            problems.append("RoPE llama3 scaling needs high_freq_factor > low_freq_factor, got "
                            f"{scaling.high_freq_factor} and {scaling.low_freq_factor}")
        elif scaling.kind == "factors" and len(scaling.factors) != config.head_dim // 2:
            problems.append(f"RoPE frequency factors must be head_dim / 2 = {config.head_dim // 2}, got "
                            f"{len(scaling.factors)}")
    if problems:
        raise ReffuseError(f"{source}: " + "; ".join(problems))
    return config


MODEL_TYPES = ("llama", "qwen2", "mistral", MODEL_TYPE)

# Every config.json key is either read (READ_KEYS) or known to leave the forward pass's arithmetic alone
# (ARITHMETIC_FREE_KEYS, with the reason); any other key is refused by name, since it may change what the
# model computes and reffuse will not guess. tests/formats/test_transformers_families.py holds transformers'
# Llama, Qwen2 and Mistral configs against these two sets.
READ_KEYS = frozenset({
    "model_type", "format", "format_version", "name", "_name_or_path", "vocab_size", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "partial_rotary_factor", "attention_bias", "mlp_bias", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types", "blocks", "block_configs", "reffuse_blocks",
    "parallel_blocks"})
ARITHMETIC_FREE_KEYS = {
    "architectures": "the class name; model_type says the family",
    "transformers_version": "bookkeeping", "torch_dtype": "the stored dtype; reffuse loads in the dtype asked for",
    "dtype": "the stored dtype; reffuse loads in the dtype asked for",
    "initializer_range": "initialisation only", "use_cache": "a KV cache does not change the result",
    "pad_token_id": "a tokenizer setting", "bos_token_id": "a tokenizer setting", "eos_token_id": "a tokenizer setting",
    "attention_dropout": "dropout acts in training only; reffuse computes the evaluation-mode forward",
    "pretraining_tp": "slices of the same products, summed (transformers 4 only)",
    "chunk_size_feed_forward": "chunks of the same products",
    "output_hidden_states": "what transformers returns", "output_attentions": "what transformers returns",
    "return_dict": "what transformers returns", "is_encoder_decoder": "false for every decoder reffuse loads",
    "id2label": "classification heads only", "label2id": "classification heads only",
    "problem_type": "classification heads only", "auto_map": "where transformers finds remote code",
    "tokenizer_class": "a tokenizer setting"}


def check_keys(raw: dict, source: str) -> None:
    """Refuse a config.json key that is neither read nor known to leave the arithmetic alone."""
    unknown = sorted(set(raw) - READ_KEYS - set(ARITHMETIC_FREE_KEYS))
    if unknown:
        raise ReffuseError(f"{source}: config.json's key {unknown[0]!r} is not one reffuse reads, and it may change "
                           "what the model computes" + (f" ({len(unknown)} such keys: {', '.join(unknown[:5])})"
                                                        if len(unknown) > 1 else "")
                           + "; if it does not, remove it from config.json")


# rope_parameters / rope_scaling keys reffuse reads, per rope_type; attention_factor and partial_rotary_factor
# are read and refused unless 1 (no change).
ROPE_KEYS = {"default": set(), "linear": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
             "factors": {"factors"}}


def rope_from_json(raw: dict, source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and the RoPE scaling, from transformers 5's rope_parameters or transformers 4's top-level
    rope_theta and rope_scaling; each key that changes RoPE and that reffuse does not compute refused by name."""
    parameters, legacy = raw.get("rope_parameters"), raw.get("rope_scaling")
    if parameters is not None and legacy is not None:
        raise ReffuseError(f"{source}: config.json has both rope_parameters (transformers 5) and rope_scaling "
                           "(transformers 4): keep the one the model was saved with")
    spec, key = (parameters, "rope_parameters") if parameters is not None else (legacy or {}, "rope_scaling")
    if not isinstance(spec, dict):
        raise ReffuseError(f"{source}: config.json's {key} must be an object, got {spec!r}")
    if spec and all(isinstance(v, dict) for v in spec.values()):
        raise ReffuseError(f"{source}: config.json's {key} gives RoPE per kind of layer ({', '.join(spec)}), which "
                           "reffuse does not compute: it takes one RoPE for all layers")
    theta = spec.get("rope_theta", raw.get("rope_theta", 10000.0))
    if "rope_theta" in spec and raw.get("rope_theta") is not None and raw["rope_theta"] != spec["rope_theta"]:
        raise ReffuseError(f"{source}: config.json's rope_theta {raw['rope_theta']!r} and {key}'s "
                           f"{spec['rope_theta']!r} disagree: keep one")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ReffuseError(f"{source}: config.json's rope_theta must be a number, got {theta!r}")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in ROPE_KEYS:
        raise ReffuseError(f"{source}: config.json's {key} has rope_type {kind!r}, which reffuse does not compute "
                           f"(it computes {', '.join(ROPE_KEYS)})")
    for name, neutral in (("attention_factor", 1.0), ("partial_rotary_factor", 1.0)):
        value = spec.get(name, raw.get(name) if name == "partial_rotary_factor" else None)
        if value is not None and value != neutral:
            raise ReffuseError(f"{source}: config.json's {name} is {value!r}, which reffuse does not compute "
                               f"(only {neutral})")
    unknown = sorted(set(spec) - ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta", "attention_factor",
                                                    "partial_rotary_factor"})
    if unknown:
        raise ReffuseError(f"{source}: config.json's {key} has {unknown[0]!r}, which a {kind} RoPE does not take "
                           "and reffuse does not compute")
    if kind == "default":
        return float(theta), None
    missing = sorted(ROPE_KEYS[kind] - set(spec) - {"low_freq_factor", "high_freq_factor"})
    if missing:
        raise ReffuseError(f"{source}: config.json's {key} ({kind}) lacks {missing[0]!r}")
    try:
        if kind == "factors":
            return float(theta), RopeScaling("factors", factors=tuple(float(f) for f in spec["factors"]))
        if kind == "linear":
            return float(theta), RopeScaling("linear", float(spec["factor"]))
        return float(theta), RopeScaling("llama3", float(spec["factor"]), float(spec.get("low_freq_factor", 1.0)),
                                         float(spec.get("high_freq_factor", 4.0)),
                                         int(spec["original_max_position_embeddings"]))
    except (TypeError, ValueError):
        raise ReffuseError(f"{source}: config.json's {key} holds a value that is not a number: {spec!r}") from None


def attention_window(raw: dict, layers: int, source: str) -> int | None:
    """The sliding attention window (Mistral, Qwen2's use_sliding_window), None where every layer attends fully."""
    window = raw.get("sliding_window")
    if raw.get("model_type") == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ReffuseError(f"{source}: config.json's layer_types must list 'full_attention' or "
                               f"'sliding_attention' per layer, got {types!r}")
        if "sliding_attention" not in types:
            window = None
    elif raw.get("model_type") == "qwen2" and window is not None and raw.get("max_window_layers", 28) >= layers:
        window = None  # Qwen2 windows only the layers from max_window_layers on
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ReffuseError(f"{source}: config.json's sliding_window must be a positive integer or null, "
                           f"got {window!r}")
    return window


def config_from_json(raw: dict, source: str) -> tuple[Config, tuple[BlockLayout, ...]]:
    """Config and per-block layout from a reffuse, HF Llama / Qwen2 / Mistral or Nemotron-NAS config.json,
    checked before any weight is read."""
    if not isinstance(raw, dict):
        raise ReffuseError(f"{source}: config.json must hold a JSON object")
    model_type = raw.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ReffuseError(f"{source}: model_type {model_type!r} is not supported; reffuse loads Llama-architecture "
                           f"models (model_type {', '.join(map(repr, MODEL_TYPES))})")
    if raw.get("format") == "reffuse" and raw.get("format_version") != FORMAT_VERSION:
        raise ReffuseError(f"{source}: format_version {raw.get('format_version')!r} is not one this reffuse reads "
                           f"({FORMAT_VERSION}): save the model again with this version, or upgrade reffuse")
    check_keys(raw, source)
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise ReffuseError(f"{source}: hidden_act {activation!r} is not supported: reffuse's FFN is SwiGLU (silu)")
    if _boolean(raw, "mlp_bias", False, source):
        raise ReffuseError(f"{source}: config.json's mlp_bias is true: reffuse's FFN has no biases")
    rope_theta, rope_scaling = rope_from_json(raw, source)
    qkv_bias = o_bias = _boolean(raw, "attention_bias", False, source)
    if model_type == "qwen2":  # transformers' Qwen2: q, k and v with biases, o without, whatever the config says
        qkv_bias, o_bias = True, False

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
        kv_default = heads_in_group_kv(raw, n_heads, source) if model_type == MODEL_TYPE else n_heads
        layers = integer("num_hidden_layers")
        config = Config(vocab_size=integer("vocab_size"), dim=dim, n_heads=n_heads,
                        n_kv_heads=integer("num_key_value_heads", kv_default), head_dim=head_dim,
                        rope_theta=rope_theta, norm_eps=number("rms_norm_eps", 1e-5),
                        tie_embeddings=_boolean(raw, "tie_word_embeddings", False, source),
                        name=str(raw.get("name") or raw.get("_name_or_path") or source),
                        max_positions=raw.get("max_position_embeddings") and integer("max_position_embeddings"),
                        rope_scaling=rope_scaling, qkv_bias=qkv_bias, o_bias=o_bias,
                        attention_window=attention_window(raw, layers, source))
        if model_type == MODEL_TYPE:
            blocks = blocks_from_nemotron(raw, source, config.n_kv_heads)
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
    check_config(config, source)
    for i, block in enumerate(blocks):
        if block.kv_heads is not None and n_heads % block.kv_heads:
            raise ReffuseError(f"{source}: block {i}'s {block.kv_heads} key/value heads do not divide the "
                               f"{n_heads} query heads")
    return config, blocks


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
        raise ReffuseError(f"{folder} is incomplete: {len(missing)} of the {len(shards)} weight files listed in "
                           f"{index_path.name} are missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})"
                           "; download them into the folder")
    return _regular_files([folder / name for name in shards])


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

