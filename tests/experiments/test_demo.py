"""`reffuse demo` and `reffuse fuse`: the offline pipeline on tiny, the saved model, SmolLM2 round trip, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import reffuse
from reffuse.experiments.demo_result import CALIBRATED, FUSED, HEALED, REMOVED, DemoResult
from reffuse.method.calibrate import calibrated_fuse
from reffuse.cli import main
from reffuse.method.pipeline import PROVENANCE_FILE, RemovalChoice, TextsRecord, synthetic_windows
from reffuse.method.removal import drop_attention
from reffuse.core.tiny import build_tiny

FAST = ["--held-out-tokens", "256", "--calibration-tokens", "256", "--scoring-tokens", "128",
        "--dependency-tokens", "64",
        "--repeats", "6",  # the fewest repeats that give each speedup its interval
        "--decode-tokens", "2", "--sample-tokens", "2"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--model", "tiny", "--json", "--out", str(folder), *FAST]) == 0
    return json.loads(out.getvalue()), folder


def test_demo_tiny_json_is_complete_and_exact(tiny_demo):
    report, folder = tiny_demo
    assert report["synthetic"] is True
    for key in ("attention_removal", "plan", "groups", "layout_before", "layout_removed", "layout_after",
                "fused_vs_parallel_relative_error", "calibration", "quality", "speed", "samples", "figures",
                "texts"):
        assert key in report, key
    # random weights reading random ids: held-out quality would measure nothing, so it is not computed
    assert report["quality"] == {"meaningful": False} and "sequential_vs_parallel" not in report
    # Theorem 3.1: fused == parallel up to rounding (float64 ~1e-16, float32 ~1e-7)
    assert report["fused_vs_parallel_relative_error"]["float64"] <= 1e-12
    assert report["fused_vs_parallel_relative_error"]["float32"] <= 1e-5
    assert report["healing"]["steps"] == report["healing"]["tokens"] // 64 and report["healing"]["losses"]
    assert set(report["speed"]["decode"]) == {"original", "attention removed", "fused, calibrated"}
    assert report["attention_removal"]["blocks"] == [2, 3]  # tiny's cheapest pair (seeded, synthetic)
    assert all(len(g) == 2 and g[1] - g[0] + 1 <= 4 for g in report["groups"])
    for name in ("layout.png", "quality_speed.png", "attention_scores.png", "ffn_dependency.png"):
        assert (folder / name).is_file()


def test_the_demo_json_reads_back_as_it_was_written(tiny_demo):
    report, _ = tiny_demo
    assert DemoResult.from_json(report).to_json() == report


def test_a_demo_with_held_out_quality_reads_back_and_prints(tiny_demo, capsys):
    """The quality a real model gets (a synthetic one has none), measured here on tiny's ids."""
    from reffuse.commands.demo import print_report
    from reffuse.core.fusion import fuse
    from reffuse.experiments.demo import held_out_quality
    from reffuse.method.pipeline import load_texts

    report, _ = tiny_demo
    demo = DemoResult.from_json(report)
    original = reffuse.load_model("tiny")
    removed = drop_attention(original, demo.attention_removal.blocks)
    fused = fuse(removed, demo.groups)
    models = {REMOVED: removed, FUSED: fused, CALIBRATED: fused, HEALED: fused}
    texts = load_texts("tiny", original, 256, 256)
    quality, gap = held_out_quality(original, removed, models, texts, demo.attention_removal.blocks[0])
    assert quality.models[FUSED].kl_vs_attention_removed == gap.kl
    raw = demo.to_json() | {"quality": quality.to_json(), "sequential_vs_parallel": gap.to_json()}
    assert DemoResult.from_json(raw).to_json() == raw
    print_report(DemoResult.from_json(raw))
    assert "calibration closes" in capsys.readouterr().out


COMMITTED = sorted(Path(__file__).parents[2].glob("reports/experiments/**/experiments.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.parent.name))
def test_the_parts_the_experiments_record_as_the_demo_does_read_back(path):
    """No demo JSON is committed; the experiments' texts and attention removal are the same records."""
    raw = json.loads(path.read_text())
    assert TextsRecord.from_json(raw["texts"]).to_json() == raw["texts"]
    assert RemovalChoice.from_json(raw["attention_removal"]).to_json() == raw["attention_removal"]


RATIO = r"(\d+\.\d+)x \((\d+\.\d+)-(\d+\.\d+)\)"  # 1.47x (0.95-1.91)
MS = r"(\d+\.\d{3})"


def agrees(ratio: float, numerator: float, denominator: float, half_unit: float) -> bool:
    """Whether a ratio printed to 2 decimals can be numerator / denominator, each printed to within half_unit."""
    low = (numerator - half_unit) / (denominator + half_unit)
    high = (numerator + half_unit) / (denominator - half_unit)
    return low - 0.005 <= ratio <= high + 0.005


def test_every_printed_speedup_lies_in_its_interval_and_on_the_side_of_its_rates(tiny_demo, capsys):
    from reffuse.commands.demo import print_report
    report, _ = tiny_demo
    print_report(DemoResult.from_json(report))
    text = capsys.readouterr().out
    printed = re.findall(RATIO, text)
    assert len(printed) == 3 + 2 * 2 + 1 + 2, text  # the decode table, the region table, the summary's line 4
    for value, low, high in printed:
        assert float(low) <= float(value) <= float(high), f"{value}x lies outside its interval ({low}-{high})"

    # (numerator, denominator, the speedup printed, half a unit of the last digit printed)
    checks = []
    decode = re.findall(rf"^\s*(\S.*?)\s{{2,}}(\d+\.\d)\s{{2,}}{RATIO}$", text, re.M)
    assert [row[0] for row in decode] == ["original", "attention removed", "fused, calibrated"], text
    original = float(decode[0][1])
    checks += [(float(rate), original, float(value), 0.05) for _, rate, value, _, _ in decode]  # tokens/s
    summary = re.findall(rf"decoded (\d+\.\d) tokens/s against the original's (\d+\.\d): {RATIO}", text)
    checks += [(float(mine), float(theirs), float(value), 0.05) for mine, theirs, value, _, _ in summary]
    region = re.findall(rf"^\s*(\d+)\s+{MS}\s+{MS}\s+{MS}\s+{RATIO}\s+{RATIO}$", text, re.M)
    for _, original_ms, removed_ms, fused_ms, removed_x, _, _, fused_x, _, _ in region:  # the original's ms over
        checks += [(float(original_ms), float(removed_ms), float(removed_x), 0.0005),  # the model's
                   (float(original_ms), float(fused_ms), float(fused_x), 0.0005)]
    assert len(summary) == 1 and len(region) == 2, text
    for numerator, denominator, value, half_unit in checks:
        assert agrees(value, numerator, denominator, half_unit), \
            f"{value}x printed beside {numerator} and {denominator}"
        if value != 1.0:  # above 1 beside a faster rate (or shorter time), below 1 beside a slower one
            assert (numerator >= denominator) if value > 1 else (numerator <= denominator), \
                f"{value}x is on the wrong side of 1 beside {numerator} and {denominator}"


def test_fuse_saves_a_model_that_loads_and_matches(tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(["fuse", "--model", "tiny", "--drop-attention", "2-3", "--groups", "2-4,5-8", "--calibrate",
                 "--calibration-tokens", "256", "--scoring-tokens", "128", "--out", str(out)]) == 0
    loaded = reffuse.load_model(out)
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["groups"] == [[2, 4], [5, 8]] and record["attention_removal"]["blocks"] == [2, 3]
    assert [r["fused_from"] for r in reffuse.layout(loaded).rows()][2:4] == [[2, 3, 4], [5, 6, 7, 8]]
    # the same steps in memory, on the model as the command loads it, give the same weights, bit for bit (float32
    # saved and read back as float32)
    expected, _ = calibrated_fuse(drop_attention(reffuse.load_model("tiny"), [2, 3]), [(2, 4), (5, 8)],
                                  synthetic_windows(build_tiny(), "calibration", 256, 256).ids)
    ids = np.arange(20)
    np.testing.assert_array_equal(reffuse.forward(loaded, ids), reffuse.forward(expected, ids))


@pytest.mark.parametrize("args, message", [
    (["fuse", "--model", "tiny", "--drop-attention", "40-41", "--groups", "4-8"], "block 40 is out of range"),
    (["fuse", "--model", "tiny", "--groups", "2-5"], "contains block 2, which has attention"),
    (["fuse", "--model", "tiny", "--groups", "4-13"], "out of range"),
    (["fuse", "--model", "tiny", "--groups", "4-8", "--calibrate", "--calibration-tokens", "64"],
     "calibration text is too short"),
    (["fuse", "--model", "tiny", "--plan", "auto", "--drop-attention-count", "7"], "only 6 are candidates"),
    (["demo", "--model", "tiny", "--groups", "2-5"], "contains block 2, which has attention"),
    (["demo", "--model", "tiny", "--calibration-tokens", "100"], "calibration text is too short"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, capsys):
    args = args + (["--out", str(tmp_path / "out")] if args[0] == "fuse" else ["--out", str(tmp_path)])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fuse_smollm2_round_trip(tmp_path, smollm2, smollm2_tokenizer, capsys):
    """A fused SmolLM2 folder loads with its tokenizer, and generate and eval take it."""
    out = tmp_path / "fused"
    assert main(["fuse", "--model", "smollm2", "--drop-attention", "12-19", "--groups", "12-15,16-18",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    loaded = reffuse.load_model(out)
    expected = reffuse.fuse(drop_attention(smollm2, range(12, 20)), [(12, 15), (16, 18)])
    ids = smollm2_tokenizer.encode("The capital of France is")
    np.testing.assert_array_equal(reffuse.forward(loaded, ids), reffuse.forward(expected, ids))
    assert main(["generate", "--model", str(out), "The capital of France is", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is")
    assert main(["eval", "--model", str(out), "--held-out-tokens", "32", "--window", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_calibration_and_held_out_spans_must_not_overlap():
    from reffuse.formats.corpus import Span, TokenWindows
    from reffuse.errors import ReffuseError
    from reffuse.method.pipeline import check_disjoint

    ids = np.zeros((1, 4), dtype=np.int64)
    held = TokenWindows(ids, (Span("hamlet_gut", "Hamlet", 0, 100, 4),), "held-out")
    check_disjoint(TokenWindows(ids, (Span("hamlet_gut", "Hamlet", 100, 200, 4),), "calibration"), held)
    check_disjoint(TokenWindows(ids, (Span("macbeth_gut", "Macbeth", 0, 100, 4),), "calibration"), held)
    with pytest.raises(ReffuseError, match="overlaps held-out text"):
        check_disjoint(TokenWindows(ids, (Span("hamlet_gut", "Hamlet", 50, 150, 4),), "calibration"), held)


def test_demo_and_fuse_given_the_same_flags_remove_the_same_blocks(smollm2):
    from reffuse.cli import build_parser
    from reffuse.method.pipeline import load_texts, remove_attention
    parser = build_parser()
    chosen = []
    for argv in (["demo", "--drop-attention-count", "8"],
                 ["fuse", "--model", "smollm2", "--drop-attention-count", "8", "--plan", "auto", "--out", "x"]):
        args = parser.parse_args(argv)
        texts = load_texts("smollm2", smollm2, args.calibration_tokens, 256)
        _, removal = remove_attention(smollm2, texts, count=args.drop_attention_count,
                                      scoring_tokens=args.scoring_tokens)
        chosen.append(removal.blocks)
    assert chosen[0] == chosen[1] == tuple(range(5, 13))  # as the committed experiments chose, on the same text
