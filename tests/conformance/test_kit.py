"""The conformance kit: every pattern's files read back to the function its references hold, bit for bit; a
dump held against it is judged at the grain of a sub-block; and the kit goes only where it may."""

import json

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from reffuse.cli import main  # noqa: E402
from reffuse.core.model import forward  # noqa: E402
from reffuse.errors import ReffuseError  # noqa: E402
from reffuse.evaluation.activations import Activations, activations, load_activations, save_activations  # noqa: E402
from reffuse.evaluation.conformance import KitManifest, build_kit, load_kit  # noqa: E402
from reffuse.evaluation.verify import VerifyResult, verify  # noqa: E402
from reffuse.formats.checkpoint import load_folder  # noqa: E402
from reffuse.formats.gguf import load_gguf  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kit") / "kit"
    build_kit(folder, tokens=16)
    return folder


def test_every_pattern_reads_back_to_its_reference_bit_for_bit(kit):
    """The weights are float32 numbers, so the float64 reference is the function of the files themselves."""
    manifest = load_kit(kit)
    assert [p.name for p in manifest.patterns] == [
        "both-sub-blocks", "attention-no-op", "ffn-no-op-attention-kept", "both-no-op", "linear-attention",
        "linear-ffn", "varying-heads-and-widths", "fused-wide-ffn"]
    for pattern in manifest.patterns:
        reference = load_activations(kit / pattern.references["float64"])
        folder = load_folder(kit / pattern.nemotron_nas, dtype="float64")
        assert folder.layout().blocks == pattern.blocks, pattern.name
        np.testing.assert_array_equal(forward(folder, reference.token_ids), reference.logits)
        if pattern.gguf:  # GGUF stores RMSNorm's eps as float32: 1e-5 moves by 3e-13, the logits by ~1e-12
            gguf = load_gguf(kit / pattern.gguf, dtype="float64")
            assert gguf.layout().blocks == pattern.blocks, pattern.name
            logits = forward(gguf, reference.token_ids)
            assert np.abs(logits - reference.logits).max() <= 1e-10 * np.abs(reference.logits).max()
    varying = json.loads((kit / "varying-heads-and-widths" / "nemotron-nas" / "config.json").read_text())
    assert [(c["attention"]["n_heads_in_group"], c["ffn"]["ffn_mult"]) for c in varying["block_configs"]] == \
        [(4, 12.0), (1, 36.0), (2, 24.0)]                   # FFN widths 256, 768, 512 at hidden size 32
    linear_ffn = next(p for p in manifest.patterns if p.name == "linear-ffn")
    assert linear_ffn.gguf is None and "llama.cpp's deci graph does not compute" in linear_ffn.not_in_gguf
    kept = next(p for p in manifest.patterns if p.name == "ffn-no-op-attention-kept")
    assert kept.reproduction.engine == "llama.cpp" and "all-zero FFN" in kept.gguf_notes[0]
    assert (kit / "README.md").read_text().count("reffuse verify") >= 2


def test_kit_json_is_written_as_its_manifest_reads_it(kit):
    raw = json.loads((kit / "kit.json").read_text())
    assert KitManifest.from_json(raw).to_json() == raw
    assert list(raw["patterns"][0]) == ["name", "description", "blocks", "nemotron_nas", "gguf", "references",
                                        "gguf_architecture", "gguf_notes"]


def test_a_dump_of_the_reference_meets_the_float64_targets_sub_block_by_sub_block(kit):
    result = verify(str(kit / "linear-attention" / "nemotron-nas"), str(kit / "linear-attention" /
                                                                       "reference-float64.npz"))
    steps = [row.step for row in result.comparison.hidden_states]
    assert steps[:5] == ["embedding", "block 0 attn_out", "block 0 resid_mid", "block 0 mlp_out", "block 0"]
    assert result.targets == "float64" and result.met and result.hint is None
    assert VerifyResult.from_json(result.to_json()) == result


def test_the_first_diverging_sub_block_is_named(kit, tmp_path):
    dump = load_activations(kit / "varying-heads-and-widths" / "reference-float64.npz")
    dump.attn_out = dump.attn_out.copy()
    dump.attn_out[1] *= 1.01                    # block 1's attention off by 1%: its stream follows
    dump.resid_mid = dump.resid_mid.copy()
    dump.resid_mid[1] += dump.attn_out[1] / 101
    path = save_activations(tmp_path / "wrong.npz", dump, dump.model)
    result = verify(str(kit / "varying-heads-and-widths" / "nemotron-nas"), str(path))
    assert result.first_diverging == "block 1 attn_out"


def test_a_fused_block_says_which_layers_it_stands_for(kit):
    result = verify(str(kit / "fused-wide-ffn" / "nemotron-nas"), str(kit / "fused-wide-ffn" /
                                                                     "reference-float64.npz"))
    assert "block 1 (fused from layers 1-3)" in [row.step for row in result.comparison.hidden_states]


def test_a_float64_dump_with_float32_rounding_gets_a_hint(kit, tmp_path):
    dump = load_activations(kit / "both-sub-blocks" / "reference-float32.npz")
    promoted = Activations(**{k: v.astype(np.float64) if v.dtype == np.float32 else v
                              for k, v in dump.arrays().items()})
    path = save_activations(tmp_path / "promoted.npz", promoted, "float32, stored as float64")
    result = verify(str(kit / "both-sub-blocks" / "nemotron-nas"), str(path))
    assert not result.met
    assert "misses float64's target by float32's rounding" in result.hint
    assert VerifyResult.from_json(result.to_json()) == result


def test_a_dump_of_another_model_says_which_side_is_which(kit, tiny32, tmp_path):
    path = save_activations(tmp_path / "tiny.npz", activations(tiny32, np.arange(8)), "tiny")
    with pytest.raises(ReffuseError, match=r"tiny\.npz \(the dump\) has 256 vocabulary, 12 blocks, 64 width, but "
                                           r".*both-sub-blocks/nemotron-nas \(--model, reffuse's side\) has 260 "
                                           r"vocabulary, 3 blocks, 32 width: give --model the model the dump was made "
                                           r"with; the dump names its model 'tiny'"):
        verify(str(kit / "both-sub-blocks" / "nemotron-nas"), str(path))


def test_the_kit_goes_only_where_it_may(kit, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("not reffuse's")
    assert main(["conformance", "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "README.md").read_text() == "not reffuse's"
    assert main(["conformance", "--out", str(tmp_path / "again"), "--reference-tokens", "8"]) == 0
    assert main(["conformance", "--out", str(tmp_path / "again"), "--reference-tokens", "8", "--overwrite",
                 "--json"]) == 0
    assert load_kit(tmp_path / "again").tokens == 8


def test_the_export_says_it_stands_an_all_zero_ffn_in_for_an_absent_one(kit, tmp_path, capsys):
    """`reffuse export --format gguf` of a block that keeps attention and has no FFN: the file holds an FFN of 32
    zero units there (llama.cpp's deci graph drops the attention of a layer without one), the command says so,
    and reffuse reads the block back without it."""
    import gguf

    out = tmp_path / "kept.gguf"
    assert main(["export", "--model", str(kit / "ffn-no-op-attention-kept" / "nemotron-nas"), "--format", "gguf",
                 "--out", str(out)]) == 0
    assert "note: block 1 keeps attention and has no FFN: written with an all-zero FFN of 32 units" in \
        capsys.readouterr().out
    widths = gguf.GGUFReader(out).fields["deci.feed_forward_length"]
    assert [int(widths.parts[i][0]) for i in widths.data] == [48, 32, 48]
    reference = load_activations(kit / "ffn-no-op-attention-kept" / "reference-float64.npz")
    back = load_gguf(out, dtype="float64")
    assert back.layout().blocks[1].ffn_width == 0 and back.blocks[1].ffn is None
    logits = forward(back, reference.token_ids)
    assert np.abs(logits - reference.logits).max() <= 1e-10 * np.abs(reference.logits).max()
