"""Reading a Hugging Face style config.json: the model's Config and its per-block layout, checked before any weight
is read.

It reads reffuse's own folders (HF Llama's keys plus `blocks`, reffuse.formats.checkpoint), HF Llama, Qwen2 (q/k/v
biases) and Mistral (a sliding window, computed exactly within it), every block then with attention and
`intermediate_size` units; and Nemotron-NAS (DeciLM) configs (reffuse.formats.nemotron_nas). RoPE is read from either
schema: transformers 4's top-level rope_theta and rope_scaling, or transformers 5's rope_parameters; scaling
`linear` and `llama3` are computed. Every config.json key is read or known not to change the arithmetic
(READ_KEYS, ARITHMETIC_FREE_KEYS); any other is refused by name. `check_config` checks a Config however it was
read (the GGUF loader's too).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from reffuse.core.config import ROPE_SCALINGS, Config, RopeScaling
from reffuse.core.layout import BlockLayout, blocks_from_json
from reffuse.errors import ReffuseError
from reffuse.files import read_json
from reffuse.formats.nemotron_nas import MODEL_TYPE, blocks_from_nemotron, heads_in_group_kv

FORMAT_VERSION = 1  # the version of reffuse's own config.json (its `format_version`), which save_model writes


def read_config(folder: Path) -> dict:
    """The parsed config.json of a model folder, refused in one message for each way it can fail to read."""
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
