"""`reffuse bench --train` on the tiny model: the result's structure, both engines' losses agreeing, the fused model
and its trainable set, and the verdicts following the intervals (never a wall-clock verdict)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reffuse.cli import main  # noqa: E402
from reffuse.core.model import cast  # noqa: E402
from reffuse.core.tiny import TINY_CONFIG, build_synthetic, build_tiny  # noqa: E402
from reffuse.speed.torch_models import TorchStep, is_plain_llama  # noqa: E402
from reffuse.speed.bench_report import PEAK_RSS_BYTES, check_train_targets, train_markdown  # noqa: E402
from reffuse.speed.train_bench import HYPERPARAMETERS, ReffuseStep, trainable_set, training_model  # noqa: E402
from reffuse.speed.environment import environment  # noqa: E402
from reffuse.speed.train_result import EngineSteps, FusedModel, TrainResult, TrainRow  # noqa: E402

TOKENS, REPEATS = 16, 2


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "bench_train_tiny.json"
    code = main(["bench", "--model", "tiny", "--train", "all", "--train", "fused", "--window", str(TOKENS),
                 "--threads", "1", "--repeats", str(REPEATS), "--out", str(out)])
    assert code == 0
    return TrainResult.from_json(json.loads(out.read_text())), out.with_suffix(".md").read_text()


def test_result_has_both_trainable_sets_and_both_engines(cli_result):
    result, _ = cli_result
    assert [r.train for r in result.rows] == ["all", "fused"]
    assert result.tokens == TOKENS and result.environment.threads == 1 and result.pytorch_used
    assert "--train all --train fused" in result.command
    for row in result.rows:
        for side in (row.reffuse, row.pytorch):
            assert len(side.step_seconds) == REPEATS and all(s > 0 for s in side.step_seconds)
            assert len(side.losses) == REPEATS + 1                      # the warm-up step's too
            assert side.tokens_per_second == pytest.approx(TOKENS / side.median_step_seconds)
            assert side.peak_rss_bytes >= side.rss_after_setup_bytes > 0
        assert "equations" in row.pytorch.implementation             # tiny has attention-free blocks
        assert row.speed_ratio > 0 and row.speed_ratio_interval_95 is None  # too few repeats for one
    all_row, fused_row = result.rows
    assert all_row.trainable_parameters > fused_row.trainable_parameters


def test_both_engines_compute_the_same_losses(cli_result):
    result, _ = cli_result
    for row in result.rows:
        assert row.first_loss_relative_difference < 1e-5    # the same weights, the same window
        assert row.worst_loss_relative_difference < 1e-4    # and the same updates after it
        np.testing.assert_allclose(row.reffuse.losses, row.pytorch.losses, rtol=1e-4)


def test_markdown_and_targets_of_a_run_off_the_target_settings(cli_result):
    result, text = cli_result
    assert result.command in text
    assert "| all | " in text and "| fused | " in text
    assert [t.verdict for t in result.targets] == ["not measured", "not measured"]  # 16 tokens, 1 thread


def test_fused_model_and_its_trainable_set():
    fused = training_model(build_tiny(), "fused")
    assert [b.fused_from for b in fused.blocks if b.fused_from] == [(5, 6, 7, 8), (9, 10, 11)]
    assert len(fused.blocks) == 7 and all(b.attention is None for b in fused.blocks[4:])  # 0-4, 5-8, 9-11
    names = trainable_set(fused, "fused")
    assert names and {n.split(".")[2] for n in names} == {"5", "6"}
    assert all(".mlp." in n or "post_attention_layernorm" in n for n in names)


def test_transformers_step_agrees_with_reffuse_on_a_plain_llama():
    model = cast(build_synthetic(TINY_CONFIG, [True] * 3, [96] * 3, seed=4), "float32")
    assert is_plain_llama(model)
    ids = np.random.default_rng(0).integers(0, TINY_CONFIG.vocab_size, 24)
    names = [n for n in trainable_set(model, "all")]
    ours, theirs = ReffuseStep(model, names, ids), TorchStep(model, names, ids, HYPERPARAMETERS)
    assert "transformers" in theirs.implementation and ours.parameters == theirs.parameters
    losses = np.array([(ours.step(), theirs.step()) for _ in range(3)])
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=1e-5)
    assert losses[-1, 0] < losses[0, 0]


def reffuse_steps(peak_rss_bytes: int) -> EngineSteps:
    return EngineSteps(implementation="reffuse", step_seconds=(5.12,), median_step_seconds=5.12,
                       tokens_per_second=100.0, peak_rss_bytes=peak_rss_bytes, rss_after_setup_bytes=2 ** 29,
                       setup_seconds=1.0, losses=(3.0, 2.9))


def made_result(rows, threads=2, pytorch_used=True) -> TrainResult:
    """A result of these rows, its targets not yet judged."""
    return TrainResult(model="m", model_name="m", dtype="float32", repeats=7, tokens=512, text="text",
                       hyperparameters=HYPERPARAMETERS, fused_model=FusedModel((5,), ((5, 8),)),
                       environment=dataclasses.replace(environment(threads), cores=2),
                       pytorch_used=pytorch_used, rows=tuple(rows), targets=())


def result_with(ratio_interval, peak_gib, threads=2, tokens=512):
    row = TrainRow(train="all", tokens=tokens, trainable_tensors=3, trainable_parameters=10 ** 6,
                   reffuse=reffuse_steps(int(peak_gib * 2 ** 30)), speed_ratio=1.0,
                   speed_ratio_interval_95=ratio_interval)
    return made_result([row], threads)


@pytest.mark.parametrize("interval, expected", [((1.02, 1.3), "met"), ((0.6, 0.9), "not met"),
                                                ((0.9, 1.1), "unresolved"), (None, "unresolved")])
def test_speed_verdict_follows_the_interval(interval, expected):
    speed, _ = check_train_targets(result_with(interval, 2.0))
    assert speed.verdict == expected and speed.interval_95 == interval


def test_memory_verdict_and_the_target_settings():
    assert check_train_targets(result_with((1.1, 1.2), 2.5))[1].verdict == "met"
    assert check_train_targets(result_with((1.1, 1.2), PEAK_RSS_BYTES / 2 ** 30))[1].verdict == "not met"
    speed, memory = check_train_targets(result_with((1.1, 1.2), 2.5, threads=4))
    assert speed.verdict == "not measured" and memory.verdict == "met"   # memory does not depend on threads
    assert [t.verdict for t in check_train_targets(result_with((1.1, 1.2), 2.5, tokens=256))] == \
        ["not measured", "not measured"]


def test_markdown_shows_verdicts_and_intervals():
    row = TrainRow(train="all", tokens=512, trainable_tensors=3, trainable_parameters=10 ** 6,
                   reffuse=reffuse_steps(2 ** 30))
    result = made_result([row], pytorch_used=False)
    result = dataclasses.replace(result, targets=check_train_targets(result))
    text = train_markdown(result, "reffuse bench --train all")
    assert "PyTorch not measured" in text and "| all | 3 (1.0M) | 512 | 100.0 | - | - | 1.00 GiB | - |" in text
    assert "| not measured |" in text and "| met |" in text


def test_the_committed_training_result_reads_back_as_it_is_and_gives_its_report():
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    committed = [p for p in sorted(results.rglob("bench_*.json")) if '"trainable_tensors"' in p.read_text()]
    assert {p.stem for p in committed} >= {"bench_train_smollm2"}
    for path in committed:
        raw = json.loads(path.read_text())
        result = TrainResult.from_json(raw)
        assert result.to_json() == raw, path.name
        assert check_train_targets(result) == result.targets
        assert train_markdown(result, result.command) == path.with_suffix(".md").read_text()
