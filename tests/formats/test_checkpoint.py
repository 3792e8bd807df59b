"""Saved folders: HF Llama names, bit-exact round trips, and errors that name the tensor."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import reffuse
from reffuse.formats.checkpoint import model_to_tensors
from reffuse.errors import ReffuseError
from reffuse.core.model import forward, plain


def test_round_trip_is_bit_exact(tmp_path, tiny32, tiny_ids):
    for model in (tiny32, reffuse.fuse(tiny32, [(4, 7)]), reffuse.cast(tiny32, "float64")):
        folder = reffuse.save_model(model, tmp_path / str(len(model.blocks)) / str(model.dtype))
        loaded = reffuse.load_model(folder, dtype=model.dtype)
        original, again = model_to_tensors(model), model_to_tensors(loaded)
        assert original.keys() == again.keys()
        for name in original:
            np.testing.assert_array_equal(original[name], again[name], err_msg=name)
        assert [b.fused_from for b in loaded.blocks] == [b.fused_from for b in model.blocks]
        np.testing.assert_array_equal(forward(plain(loaded), tiny_ids), forward(model, tiny_ids))  # same kernels


def test_saved_fused_block_holds_folded_stacked_weights(tmp_path, tiny64):
    """Acceptance: block a of the saved fused model holds gate = [gate_i * g_i], up = [up_i * g_i],
    down = [down_i] in the order a..b, and a unit norm."""
    a, b = 4, 8
    folder = reffuse.save_model(reffuse.fuse(tiny64, [(a, b)], norm="fold"), tmp_path / "fused")
    tensors = load_file(str(folder / "model.safetensors"))
    run = [tiny64.blocks[i].ffn for i in range(a, b + 1)]
    prefix = f"model.layers.{a}"
    np.testing.assert_array_equal(tensors[f"{prefix}.mlp.gate_proj.weight"], np.vstack([f.gate * f.norm_gain for f in run]))
    np.testing.assert_array_equal(tensors[f"{prefix}.mlp.up_proj.weight"], np.vstack([f.up * f.norm_gain for f in run]))
    np.testing.assert_array_equal(tensors[f"{prefix}.mlp.down_proj.weight"], np.hstack([f.down for f in run]))
    np.testing.assert_array_equal(tensors[f"{prefix}.post_attention_layernorm.weight"], np.ones(tiny64.config.dim))
    config = json.loads((folder / "config.json").read_text())
    assert config["blocks"][a] == {"attention": False, "ffn_width": sum(f.width for f in run),
                                   "fused_from": [4, 5, 6, 7, 8]}
    assert len(config["blocks"]) == 12 - (b - a)
    assert f"{prefix}.self_attn.q_proj.weight" not in tensors      # attention-free: no attention tensors
    assert "model.layers.7.mlp.gate_proj.weight" in tensors        # blocks renumbered consecutively
    assert "model.layers.8.mlp.gate_proj.weight" not in tensors


def tamper(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.layers.3.mlp.up_proj.weight"), r"missing tensors: model.layers.3.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.4.self_attn.q_proj.weight": np.zeros((64, 64), np.float32)}),
     r"unexpected tensors: model.layers.4.self_attn.q_proj.weight"),
    (lambda t: t.update({"model.norm.weight": np.zeros(63, np.float32)}),
     r"wrong shapes: model.norm.weight is \(63,\), expected \(64,\)"),
])
def test_folder_that_does_not_match_its_config(tmp_path, tiny32, change, message):
    folder = reffuse.save_model(tiny32, tmp_path / "m")
    tamper(folder, change)
    with pytest.raises(ReffuseError, match=message):
        reffuse.load_model(folder)


def test_missing_and_corrupt_files(tmp_path, tiny32):
    with pytest.raises(ReffuseError, match="config.json does not exist"):
        reffuse.load_model(tmp_path)
    folder = reffuse.save_model(tiny32, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReffuseError, match="could not be read as safetensors"):
        reffuse.load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ReffuseError, match="is not valid JSON"):
        reffuse.load_model(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ReffuseError, match="model_type 'gpt2' is not supported"):
        reffuse.load_model(folder)


def test_no_pickle_in_saved_folder(tmp_path, tiny32):
    folder = reffuse.save_model(tiny32, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
