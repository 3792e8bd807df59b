"""Nemotron-NAS (DeciLM) folders: reffuse's export reads back to the same model, bit for bit; padding an FFN to
the format's widths adds nothing; what reffuse does not compute is refused by name."""

import json

import numpy as np
import pytest

import reffuse
from reffuse.core.model import forward, plain
from reffuse.errors import ReffuseError
from reffuse.formats.checkpoint import load_folder, save_nemotron_nas
from reffuse.formats.nemotron_nas import padded_ffn, width_from_mult


def test_the_width_rule_is_the_engines(tiny32):
    assert width_from_mult(4.0, 576) == 1536          # SmolLM2's FFN: 2 * 4 * 576 / 3
    assert width_from_mult(1.0, 64) == 256            # int(42.67) = 42, rounded up to 256


def test_padding_an_ffn_with_zeros_adds_nothing(tiny64):
    ffn = tiny64.blocks[1].ffn                        # width 96
    x = np.random.default_rng(0).standard_normal((5, 64))
    assert padded_ffn(ffn, 256).width == 256
    np.testing.assert_allclose(reffuse.swiglu(padded_ffn(ffn, 256), x), reffuse.swiglu(ffn, x), rtol=0, atol=1e-13)


def test_a_fused_model_round_trips_bit_for_bit(tiny32, tmp_path):
    fused = reffuse.fuse(tiny32, [(4, 6), (7, 8)])
    folder = save_nemotron_nas(fused, tmp_path / "nas")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "nemotron-nas" and raw["architectures"] == ["DeciLMForCausalLM"]
    assert raw["num_hidden_layers"] == len(tiny32.blocks)            # no-op blocks keep the original depth
    assert raw["block_configs"][5]["attention"]["no_op"] and raw["block_configs"][5]["ffn"]["no_op"]  # fused away
    assert raw["block_configs"][4]["attention"]["no_op"] and not raw["block_configs"][4]["ffn"]["no_op"]
    assert width_from_mult(raw["block_configs"][4]["ffn"]["ffn_mult"], 64) % 256 == 0
    back = load_folder(folder)
    assert reffuse.layout(back).rows() == reffuse.layout(fused).rows()
    ids = np.arange(24)
    np.testing.assert_array_equal(forward(back, ids), forward(plain(fused), ids))  # load_folder reads plain


def test_a_folder_reffuse_did_not_write_loads_as_written(tiny32, tmp_path):
    folder = save_nemotron_nas(reffuse.fuse(tiny32, [(4, 8)]), tmp_path / "nas")
    raw = json.loads((folder / "config.json").read_text())
    del raw["reffuse_blocks"]
    (folder / "config.json").write_text(json.dumps(raw))
    other = load_folder(folder)
    assert len(other.blocks) == len(tiny32.blocks) and other.blocks[5].ffn is None and other.blocks[5].attention is None
    ids = np.arange(24)
    expected = forward(reffuse.fuse(tiny32, [(4, 8)]), ids)
    assert np.abs(forward(other, ids) - expected).max() <= 1e-5 * np.abs(expected).max()  # padded: float32 rounding


@pytest.mark.parametrize("part, key, value", [("attention", "window_length", 512), ("attention", "num_sink_tokens", 4),
                                              ("ffn", "sparsify", ["a"]), ("ffn", "moe", {"num_experts": 8})])
def test_what_reffuse_does_not_compute_is_refused_by_name(tiny32, tmp_path, part, key, value):
    folder = save_nemotron_nas(tiny32, tmp_path / "nas")
    raw = json.loads((folder / "config.json").read_text())
    raw["block_configs"][2][part][key] = value
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ReffuseError, match=f"block 2's {part} has {key}"):
        load_folder(folder)


def test_a_fused_smollm2_round_trips_bit_for_bit(smollm2, tmp_path):
    fused = reffuse.fuse(reffuse.drop_attention(smollm2, list(range(5, 13))), [(5, 8), (9, 11)])
    back = load_folder(save_nemotron_nas(fused, tmp_path / "nas"))
    ids = np.arange(32)
    np.testing.assert_array_equal(forward(back, ids), forward(plain(fused), ids))  # load_folder reads plain
