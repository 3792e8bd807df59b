"""The float32 cache of SmolLM2 checks what it serves: the sha256 of every file its conversion wrote is recorded,
and a folder whose files are not those (substituted weights, a file added or missing) is converted again from the
pinned GGUF instead of loading as SmolLM2."""

import json
import os
import shutil

import numpy as np
import pytest

import reffuse
from reffuse.formats import smollm2
from reffuse.formats.fetch import CACHE_ENV, cached_path

pytestmark = pytest.mark.slow  # converts the real model (seconds each), twice


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    gguf = cached_path("smollm2")
    if not gguf.is_file():
        pytest.skip("the SmolLM2 GGUF is not in the cache (it is fetched by the other real-model tests)")
    (tmp_path / "smollm2").mkdir()
    shutil.copyfile(gguf, tmp_path / "smollm2" / gguf.name)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(smollm2, "_verified", set())  # what this process checked before is not checked here
    return tmp_path / "smollm2" / smollm2.FOLDER_NAME


def test_substituted_weights_are_converted_again_not_served(fresh_cache, monkeypatch, capsys):
    original = reffuse.load_model("smollm2")
    recorded = json.loads((fresh_cache / smollm2.HASHES_FILE).read_text())
    assert set(recorded) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    weights = fresh_cache / "model.safetensors"
    other = bytearray(weights.read_bytes())
    other[-4:] = np.float32(1.0).tobytes()                    # one weight changed, the file still loads
    weights.write_bytes(bytes(other))
    (fresh_cache / "extra.json").write_text("{}")             # and a file the conversion did not write
    capsys.readouterr()
    monkeypatch.setattr(smollm2, "_verified", set())          # a new process
    again = reffuse.load_model("smollm2")
    assert "does not hold the files its conversion wrote (sha256.json records their sha256): converting the GGUF " \
           "again" in capsys.readouterr().err
    assert np.array_equal(again.embed, original.embed) and np.array_equal(again.norm_gain, original.norm_gain)
    assert sorted(os.listdir(fresh_cache)) == sorted([*recorded, "source.json", smollm2.HASHES_FILE])
    monkeypatch.setattr(smollm2, "_verified", set())
    reffuse.load_model("smollm2")
    assert "converting" not in capsys.readouterr().err        # the folder now matches: served as it is
