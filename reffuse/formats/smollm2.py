"""SmolLM2-135M-Instruct by name: fetched on first use, then kept as a float32 model folder for fast loads.

The GGUF (Q4_1) takes seconds to parse and dequantize. The first load therefore also writes the dequantized
float32 weights as a reffuse model folder beside it (safetensors, no pickle), with the tokenizer:

    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/smollm2/float32-v3/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json, source.json,
                                sha256.json}

source.json records which GGUF (name and sha256) and which conversion made the folder, sha256.json the sha256 of
every other file the conversion wrote. The first load in a process checks the files against it (about 0.4 s for the
538 MB of weights); a folder that does not match (a file changed, substituted or missing) is converted again from the GGUF,
which is itself checked against its pinned sha256. A class of students or the ranks of an MPI job loading at once
on a fresh cache convert once: the others wait for the conversion and read the folder it published, which is
renamed into place whole and replaced only when it no longer matches (a new version of the conversion gets a
new folder name).
If the cache cannot be written, the model loads from the GGUF every time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reffuse.core.model import Model, cast
from reffuse.errors import ReffuseError
from reffuse.files import locked, partial_name, publish_once, read_json, remove_abandoned, replace_folder, share_tree
from reffuse.outputs import write_json_atomic
from reffuse.formats.checkpoint import load_folder, write_model_files
from reffuse.formats.fetch import SOURCES, fetch, file_sha256
from reffuse.formats.gguf import load_gguf, open_gguf
from reffuse.formats.tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf
from reffuse.progress import note

CONVERSION_VERSION = 3  # raise when the GGUF -> float32 conversion changes: the new one gets a new folder
FOLDER_NAME = f"float32-v{CONVERSION_VERSION}"
HASHES_FILE = "sha256.json"  # beside source.json, whose stamp stays what every version of reffuse compares


def _stamp(gguf_path: Path) -> dict:
    return {"gguf": gguf_path.name, "gguf_sha256": SOURCES["smollm2"].cached_sha256, "conversion": CONVERSION_VERSION}


_verified: set[Path] = set()  # the folders this process has checked against their recorded hashes


def converted_folder() -> Path | None:
    """The float32 folder of SmolLM2 (fetching and converting first if needed, converting again if its files
    are not those the conversion wrote); None if it cannot be written."""
    gguf_path = fetch("smollm2")  # checked against its pinned sha256
    folder = gguf_path.parent / FOLDER_NAME
    lock = gguf_path.parent / ".convert.lock"
    if not folder.exists():
        with locked(lock):
            if not folder.exists() and not _convert(gguf_path, folder):
                return None
    if folder in _verified:
        return folder
    _check_stamp(folder, gguf_path)
    if not _matches(folder):
        with locked(lock):  # another process may have converted it again meanwhile
            if not _matches(folder):
                note(f"{folder} does not hold the files its conversion wrote ({HASHES_FILE} records their sha256): "
                     "converting the GGUF again")
                if not _convert(gguf_path, folder, replace=True):
                    return None
    _verified.add(folder)
    return folder


def _check_stamp(folder: Path, gguf_path: Path) -> None:
    remedy = f"remove the folder {folder}; reffuse converts the GGUF again"
    stamp = read_json(folder / "source.json", remedy)
    if stamp != _stamp(gguf_path):
        raise ReffuseError(f"{folder} was not made from this GGUF by this conversion (its source.json says {stamp}): "
                           f"{remedy}")


def _matches(folder: Path) -> bool:
    """Every file of the folder is one the conversion recorded in HASHES_FILE, with the recorded sha256."""
    try:
        recorded = read_json(folder / HASHES_FILE, "")
        present = set(os.listdir(folder)) - {"source.json", HASHES_FILE}
        return present == set(recorded) and all(file_sha256(folder / name) == recorded[name] for name in present)
    except (OSError, ReffuseError, TypeError):  # missing (from before hashes were recorded), unreadable, not a dict
        return False


def _convert(gguf_path: Path, folder: Path, replace: bool = False) -> bool:
    """Write the float32 folder under a temporary name and publish it (in place of a folder that does not match,
    with `replace`); False if the cache cannot be written."""
    remove_abandoned(folder.parent)
    staging = partial_name(folder)
    try:
        staging.mkdir()  # a cache that cannot be written is found out before seconds of dequantizing
    except OSError as e:
        note(f"could not write {folder} ({e.strerror}); SmolLM2 will load from the GGUF each time")
        return False
    note(f"converting {gguf_path.name} to float32 safetensors (once) ...")
    reader = open_gguf(gguf_path)
    model, tokenizer = load_gguf(gguf_path, reader=reader), tokenizer_from_gguf(gguf_path, reader=reader)
    try:
        write_model_files(model, staging)
        tokenizer.save(staging)
        write_json_atomic(staging / HASHES_FILE,
                          {name: file_sha256(staging / name) for name in sorted(os.listdir(staging))})
        write_json_atomic(staging / "source.json", _stamp(gguf_path))
        share_tree(staging)
        if replace:
            replace_folder(staging, folder)
        else:
            publish_once(staging, folder)
    except OSError as e:
        note(f"could not write {folder} ({e}); SmolLM2 will load from the GGUF each time")
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def load_smollm2(dtype="float32") -> Model:
    """SmolLM2-135M-Instruct, float32 (or float64) weights dequantized from its Q4_1 GGUF."""
    folder = converted_folder()
    return load_folder(folder, dtype) if folder else cast(load_gguf(fetch("smollm2")), dtype)


def smollm2_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer, as stored in its GGUF."""
    folder = converted_folder()
    return tokenizer_from_folder(folder) if folder else tokenizer_from_gguf(fetch("smollm2"))
