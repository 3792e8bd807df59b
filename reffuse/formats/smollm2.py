"""SmolLM2-135M-Instruct by name: fetched on first use, then kept as a float32 model folder for fast loads.

The GGUF (Q4_1) takes seconds to parse and dequantize. The first load therefore also writes the dequantized
float32 weights as a reffuse model folder beside it (safetensors, no pickle), with the tokenizer:

    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/smollm2/float32/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json, source.json}

source.json records which GGUF (name and size) and which conversion made the folder; a folder that does not
match is made again. If the cache cannot be written, the model loads from the GGUF every time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from reffuse.formats.checkpoint import load_folder, save_model
from reffuse.formats.fetch import fetch
from reffuse.formats.gguf import load_gguf, open_gguf
from reffuse.core.model import Model, cast
from reffuse.progress import note
from reffuse.formats.tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf

CONVERSION_VERSION = 1  # raise when the GGUF -> float32 conversion changes, so old folders are made again
FOLDER_NAME = "float32"


def _stamp(gguf_path: Path) -> dict:
    return {"gguf": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size, "conversion": CONVERSION_VERSION}


def converted_folder() -> Path | None:
    """The float32 folder of SmolLM2 (fetching and converting first if needed); None if it cannot be written."""
    gguf_path = fetch("smollm2")
    folder = gguf_path.parent / FOLDER_NAME
    stamp_path = folder / "source.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == _stamp(gguf_path):
        return folder
    note(f"converting {gguf_path.name} to float32 safetensors (once) ...")
    reader = open_gguf(gguf_path)
    model, tokenizer = load_gguf(gguf_path, reader=reader), tokenizer_from_gguf(gguf_path, reader=reader)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=gguf_path.parent))
        try:
            save_model(model, staging)
            tokenizer.save(staging)
            (staging / "source.json").write_text(json.dumps(_stamp(gguf_path)) + "\n")
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is readable like the GGUF beside it
            shutil.rmtree(folder, ignore_errors=True)  # an outdated conversion
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        note(f"could not write {folder} ({e}); SmolLM2 will load from the GGUF each time")
        return None
    return folder


def load_smollm2(dtype="float32") -> Model:
    """SmolLM2-135M-Instruct, float32 (or float64) weights dequantized from its Q4_1 GGUF."""
    folder = converted_folder()
    return load_folder(folder, dtype) if folder else cast(load_gguf(fetch("smollm2")), dtype)


def smollm2_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer, as stored in its GGUF."""
    folder = converted_folder()
    return tokenizer_from_folder(folder) if folder else tokenizer_from_gguf(fetch("smollm2"))
