"""The activation dump format and `reffuse dump` / `reffuse verify --against FILE.npz`, on the tiny model."""

import json

import numpy as np
import pytest

import reffuse
from reffuse.evaluation.activations import FORMAT, activations, compare, load_activations, save_activations
from reffuse.evaluation.verify import GreedyComparison, QuantizedGap, VerifyResult
from reffuse.cli import build_parser, main
from reffuse.errors import ReffuseError


def run_raising(argv):
    """Run a command's `run` directly, so that its ReffuseError reaches the test."""
    args = build_parser().parse_args(argv)
    return args.run(args)


def test_dump_round_trip(tiny32, tmp_path):
    ids = np.arange(10)
    acts = activations(tiny32, ids)
    assert acts.hidden_states.shape == (len(tiny32.blocks) + 1, 10, tiny32.config.dim)
    loaded = load_activations(save_activations(tmp_path / "a.npz", acts, "tiny"))
    assert loaded.model == "tiny"
    result = compare(loaded, acts)
    assert result.logits.max_abs == 0 and all(r.max_abs == 0 for r in result.hidden_states)
    assert result.top1_agreement == 1.0
    assert [r.step for r in result.hidden_states[:3]] == ["embedding", "block 0", "block 1"]
    assert result.logits.worst_position == 0 and result.hidden_states[1].relative_without_sink == 0


def test_cli_dump_then_verify_a_float32_dump_in_float64(tiny32, tmp_path, capsys):
    out = tmp_path / "tiny.npz"
    assert main(["dump", "--model", "tiny", "--ids", "1,2,3,4,5,6,7,8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", "--model", "tiny", "--against", str(out), "--dtype", "float64", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = VerifyResult.from_json(printed)
    assert result.to_json() == printed and list(result.to_json()) == list(printed)
    assert result.targets == "float32"  # the dump is float32, so float32's targets apply
    assert result.tokens == 8 and result.met and result.greedy is None
    assert 0 < result.comparison.logits.relative < 1e-5  # float32 rounding against float64, not zero


def test_verify_reports_a_wrong_dump(tiny32, tmp_path, capsys):
    acts = activations(tiny32, np.arange(6))
    acts.hidden_states[5] += 1e-2
    acts.logits = acts.logits + 1e-3
    path = save_activations(tmp_path / "off.npz", acts, "someone else's kernels")
    assert main(["verify", "--model", "tiny", "--against", str(path)]) == 1
    text = capsys.readouterr().out
    assert "NOT MET: logits max |diff| <= 0.0002" in text
    assert "block 4   1.000e-02" in text  # the step that was changed (index 5 = output of block 4)


@pytest.mark.parametrize("step", [1, 6, -1])  # a block early, in the middle, and the last one
def test_verify_fails_on_one_wrong_block_and_names_it(tiny32, tmp_path, capsys, step):
    acts = activations(tiny32, np.arange(6))
    acts.hidden_states[step][3] += 0.05      # one position of one block's output; the logits left as they were
    path = save_activations(tmp_path / "one-block.npz", acts, "a kernel with one bug")
    assert main(["verify", "--model", "tiny", "--against", str(path)]) == 1
    block = (step % len(acts.hidden_states)) - 1
    assert f"the first output that diverges: block {block}" in capsys.readouterr().out


def test_a_float64_dump_is_compared_in_float64_without_flags(tmp_path, capsys):
    model = reffuse.load_model("tiny", dtype="float64")  # as verify loads it: on the same kernels
    path = save_activations(tmp_path / "f64.npz", activations(model, np.arange(8)), "float64 kernels")
    assert main(["verify", "--model", "tiny", "--against", str(path), "--json"]) == 0
    result = VerifyResult.from_json(json.loads(capsys.readouterr().out))
    assert result.dtype == "float64" and result.targets == "float64"
    assert result.comparison.logits.relative == 0.0


def test_a_dump_with_hfs_post_norm_last_state_is_refused(tiny32, tmp_path, capsys):
    from reffuse.core.model import rms_norm
    acts = activations(tiny32, np.arange(6))
    acts.hidden_states[-1] = rms_norm(acts.hidden_states[-1], tiny32.norm_gain, tiny32.config.norm_eps)
    path = save_activations(tmp_path / "hf.npz", acts, "HF hidden_states")
    assert main(["verify", "--model", "tiny", "--against", str(path)]) == 2
    assert "the stream after the final norm (HF's hidden_states[-1])" in capsys.readouterr().err


def test_dumps_with_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, format=np.array(FORMAT), token_ids=np.array([1, 2]), logits=np.array([None, None], dtype=object))
    with pytest.raises(ReffuseError, match=r"pickled\.npz could not be read as an \.npz archive without pickle"):
        load_activations(path)


@pytest.mark.parametrize("arrays, message", [
    ({"format": np.array("other"), "token_ids": np.array([1]), "logits": np.zeros((1, 4))}, "format is 'other'"),
    ({"format": np.array(FORMAT), "token_ids": np.array([1, 2])}, "lacks logits"),
    ({"format": np.array(FORMAT), "token_ids": np.array([1, 2]), "logits": np.zeros((3, 4))}, r"logits must be \[T=2"),
    ({"format": np.array(FORMAT), "token_ids": np.array([1, 2]), "logits": np.zeros((2, 4)),
      "hidden_states": np.zeros((3, 5, 8))}, r"hidden_states must be \[L\+1, T=2, d\]"),
])
def test_malformed_dumps(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ReffuseError, match=message):
        load_activations(path)


def test_dump_needs_text_or_ids_for_a_model_without_tokenizer(tmp_path):
    with pytest.raises(ReffuseError, match="'tiny' is synthetic and has no tokenizer: give token ids instead"):
        run_raising(["dump", "--model", "tiny", "--out", str(tmp_path / "x.npz")])


def test_a_verify_result_with_every_part_writes_the_json_it_is_read_from(tiny32):
    acts = activations(tiny32, np.arange(6))
    comparison = compare(acts, acts)
    result = VerifyResult(comparison, "tiny", "llama.cpp (a test)", "float32", 6, "llama.cpp", {"logits": True}, None,
                          GreedyComparison(3, 2, [1, 2, 3], [1, 2, 4]),
                          QuantizedGap(comparison.logits, 1.0, "model.Q4_1.gguf"))
    raw = json.loads(json.dumps(result.to_json()))
    assert list(raw) == ["hidden_states", "logits", "top1_agreement", "greedy", "quantized_file", "model", "against",
                         "dtype", "tokens", "targets", "targets_met", "first_diverging"]
    assert raw["quantized_file"]["judged"] is False and "worst_position" in raw["logits"]
    assert VerifyResult.from_json(raw) == result and VerifyResult.from_json(raw).to_json() == raw
