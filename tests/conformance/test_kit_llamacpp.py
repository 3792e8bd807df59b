"""llama.cpp held against the conformance kit: every GGUF pattern within 1e-4 of the largest logit of the
float64 reference (float32 kernels over a few blocks, measured ~2e-7), and the one divergence of llama.cpp's deci
graph reproduced by its minimal file and worked around by the export. A Nemotron-NAS folder with per-block
n_heads_in_group and ffn_mult and a replace_with_linear block loads, fuses, exports and runs in llama.cpp with
reffuse's logits; a saved folder without a tokenizer is verified on token ids alone."""

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import reffuse  # noqa: E402
from reffuse.cli import main  # noqa: E402
from reffuse.core.patterns import build_pattern  # noqa: E402
from reffuse.evaluation.conformance import KitRow, build_kit, verify_kit  # noqa: E402
from reffuse.evaluation.llamacpp import LlamaCpp  # noqa: E402
from reffuse.evaluation.verify import verify  # noqa: E402
from reffuse.formats.checkpoint import load_folder, save_model, save_nemotron_nas  # noqa: E402
from reffuse.formats.gguf_export import save_gguf  # noqa: E402

pytestmark = pytest.mark.slow  # llama.cpp loads a model per pattern

LLAMACPP = 1e-4  # reffuse.evaluation.verify.TARGETS["llama.cpp"]


def test_llamacpp_computes_every_pattern_of_the_kit(tmp_path, capsys):
    build_kit(tmp_path / "kit")
    rows = {row.pattern: row for row in verify_kit(tmp_path / "kit", threads=1)}
    for name, row in rows.items():
        assert KitRow.from_json(row.to_json()) == row
        if row.verdict == "not in GGUF":
            assert name == "linear-ffn" and row.met is None
        elif "as is" in name:  # the deci graph drops the attention of a layer without FFN
            assert row.relative > 1e-2 and row.verdict == "known divergence reproduced" and row.met, row
        else:
            assert row.relative <= LLAMACPP and row.top1_agreement == 1.0 and row.met, row
    assert main(["verify", "--model", str(tmp_path / "kit"), "--against", "llama.cpp"]) == 0
    out = capsys.readouterr().out
    assert out.count("agrees") == 7 and "known divergence reproduced" in out


def test_a_nemotron_folder_with_varying_heads_widths_and_a_linear_block_runs_in_llamacpp(tmp_path):
    """Per-block n_heads_in_group and ffn_mult and a replace_with_linear attention, in a folder as Puzzle writes
    one (the layout in block_configs only): it loads as written, fuses, and its GGUF export runs in llama.cpp with
    reffuse's logits."""
    model = reffuse.cast(build_pattern(["attn/1+ffn:256", "attn/4+ffn:768", "lin+ffn:512", "-+ffn:256", "-+ffn:512",
                                        "attn+-", "attn+ffn:256"]), "float32")
    folder = save_nemotron_nas(model, tmp_path / "nas")
    raw = json.loads((folder / "config.json").read_text())
    del raw["reffuse_blocks"]                              # reffuse's own record of the layout: not in such a folder
    (folder / "config.json").write_text(json.dumps(raw))
    attention, ffn = [c["attention"] for c in raw["block_configs"]], [c["ffn"] for c in raw["block_configs"]]
    assert [a["n_heads_in_group"] for a in attention if not a["no_op"]] == [4, 1, None, 2, 2]
    assert [a["replace_with_linear"] for a in attention] == [False, False, True, False, False, False, False]
    assert [f["ffn_mult"] for f in ffn] == [12.0, 36.0, 24.0, 12.0, 24.0, None, 12.0]  # hidden 32: 256, 768, 512

    loaded = load_folder(folder)
    ids = np.random.default_rng(0).integers(0, 260, 24)
    assert loaded.layout().rows() == model.layout().rows()
    np.testing.assert_array_equal(reffuse.forward(loaded, ids), reffuse.forward(model, ids))
    fused = reffuse.fuse(loaded, [(3, 4)])
    assert fused.layout().blocks[3].ffn_width == 768 and fused.layout().blocks[3].fused_from == (3, 4)
    ours = reffuse.forward(reffuse.cast(fused, "float64"), ids)
    path = save_gguf(fused, tmp_path / "fused.gguf", None)
    theirs = LlamaCpp(path, n_ctx=64, threads=1).logits(ids)
    error = np.abs(theirs - ours).max() / np.abs(ours).max()
    print(f"Nemotron-NAS folder (n_heads_in_group 4, 1, 2; ffn_mult 12, 24, 36; a linear attention), blocks 3-4 "
          f"fused: llama.cpp vs reffuse {error:.1e} of the largest logit")
    assert error <= LLAMACPP


def test_a_saved_folder_without_a_tokenizer_is_verified_on_ids(tmp_path):
    folder = save_model(reffuse.cast(build_pattern(["attn+ffn", "attn+-", "-+ffn"]), "float32"), tmp_path / "m")
    result = verify(str(folder), "llama.cpp", np.arange(20) % 260, generate_tokens=4)
    assert result.comparison.logits.relative <= LLAMACPP and "deci" in result.against


def test_smollm2_without_two_ffns_agrees_with_llamacpp_through_the_export(smollm2, smollm2_tokenizer, tmp_path):
    """The case that found the divergence: SmolLM2 with the FFNs of blocks 10 and 11 removed. Written as it is,
    llama.cpp loses those blocks' attention (most of the largest logit away); the export's stand-in FFNs fix it."""
    from reffuse.evaluation.activations import DEFAULT_TEXT
    from reffuse.method.removal import drop_ffns

    model = drop_ffns(smollm2, [10, 11])
    folder = save_model(model, tmp_path / "no-ffn", tokenizer=smollm2_tokenizer)
    ids = np.asarray(smollm2_tokenizer.encode(DEFAULT_TEXT)[:64])
    result = verify(str(folder), "llama.cpp", ids, generate_tokens=8)
    assert result.comparison.logits.relative <= LLAMACPP and result.greedy.identical_prefix == 8
    as_is = save_gguf(model, tmp_path / "as-is.gguf", smollm2_tokenizer, stand_in_ffns=False)
    theirs = LlamaCpp(as_is, n_ctx=128).logits(ids)
    ours = reffuse.forward(model, ids)
    error, top1 = np.abs(theirs - ours).max() / np.abs(ours).max(), np.mean(theirs.argmax(-1) == ours.argmax(-1))
    print(f"SmolLM2 without FFNs 10-11, llama.cpp vs reffuse: as is {error:.2f} of the largest logit, top-1 "
          f"{top1:.1%}; through the export {result.comparison.logits.relative:.1e}, top-1 "
          f"{result.comparison.top1_agreement:.1%}")
    assert error > 0.1
