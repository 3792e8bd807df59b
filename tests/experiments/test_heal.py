"""`reffuse heal` on tiny: what it saves and records, what it refuses, and a run killed mid-way and resumed that
ends with the same weights as one never interrupted."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import reffuse
from reffuse.cli import main
from reffuse.core.names import named_weights
from reffuse.experiments.heal import HealRecord
from reffuse.training.trainer import trainable_names

COMMITTED = Path(__file__).resolve().parents[2] / "reports" / "healing" / "smollm2_fused.json"


def read_record(folder) -> HealRecord:
    return HealRecord.from_json(json.loads((folder / "heal.json").read_text()))


@pytest.fixture(scope="module")
def fused_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "fused-tiny"
    assert main(["fuse", "--model", "tiny", "--groups", "4-8", "--out", str(folder)]) == 0
    return folder


def heal_arguments(student, out, *extra):
    return ["heal", "--model", str(student), "--teacher", "tiny", "--window", "64", "--held-out-tokens", "1024",
            "--learning-rate", "1e-3", "--out", str(out), *extra]


def test_heal_saves_a_model_and_records_before_and_after(fused_tiny, tmp_path, capsys):
    out = tmp_path / "healed"
    assert main(heal_arguments(fused_tiny, out, "--training-tokens", "2048")) == 0
    record = read_record(out)
    assert record.training.steps == 32 and record.log.tokens == 2048
    assert record.trainable == trainable_names(reffuse.load_model(fused_tiny), "fused")
    assert record.texts.synthetic and (out / "student-fuse.json").is_file()
    assert None not in (record.held_out_before.kl_from_base, record.held_out_after.kl_from_base,
                        record.held_out_before.perplexity, record.held_out_after.perplexity)
    assert HealRecord.from_json(record.to_json()) == record
    healed = reffuse.load_model(out)
    changed = [n for n, w in named_weights(healed).items()
               if not np.array_equal(w, named_weights(reffuse.load_model(fused_tiny))[n])]
    assert changed == record.trainable
    assert "held-out KL to the teacher" in capsys.readouterr().out
    assert not (tmp_path / "healed.checkpoint").exists()


def test_trainable_choices(fused_tiny):
    model = reffuse.load_model(fused_tiny)
    assert {n.split(".")[2] for n in trainable_names(model, "fused")} == {"4"}
    assert {n.split(".")[2] for n in trainable_names(model, "blocks 2-3")} == {"2", "3"}
    assert len(trainable_names(model, "all")) == len(named_weights(model))
    for bad, message in (("blocks 2-30", "has blocks 0-7"), ("some", "is not a choice"), ("blocks x", "blocks A-B")):
        with pytest.raises(reffuse.ReffuseError, match=message):
            trainable_names(model, bad)
    assert trainable_names(reffuse.build_tiny(), "run")  # an unfused model: the attention-free blocks
    with pytest.raises(reffuse.ReffuseError, match="no fused blocks"):
        trainable_names(reffuse.build_tiny(), "fused")


def test_refusals_come_before_any_work(fused_tiny, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(heal_arguments(fused_tiny, tmp_path / "mine")) == 2
    assert "not a model reffuse wrote" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(heal_arguments(fused_tiny, tmp_path / "x", "--learning-rate", "nan"))


@pytest.mark.slow  # two runs of 128 steps and a subprocess
def test_a_killed_run_resumes_to_the_same_weights(fused_tiny, tmp_path):
    """SIGKILL once the first checkpoint is written, then --resume: the weights equal an uninterrupted run's."""
    arguments = ["--training-tokens", "16384", "--window", "128", "--checkpoint-every", "8"]
    straight = tmp_path / "straight"
    assert main(heal_arguments(fused_tiny, straight, *arguments)) == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "reffuse.cli", *heal_arguments(fused_tiny, killed, *arguments)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "killed.checkpoint" / "checkpoint.npz"
    deadline = time.monotonic() + 600  # a hang guard only
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not killed.exists(), "the run ended before it could be killed"
    assert main(heal_arguments(fused_tiny, killed, *arguments, "--resume")) == 0
    assert read_record(killed).log.losses == read_record(straight).log.losses
    for name, w in named_weights(reffuse.load_model(straight)).items():
        np.testing.assert_array_equal(named_weights(reffuse.load_model(killed))[name], w)


def test_the_committed_healing_run_round_trips():
    raw = json.loads(COMMITTED.read_text())
    assert HealRecord.from_json(raw).to_json() == raw


def test_the_healing_page_quotes_the_committed_healing_run():
    record = HealRecord.from_json(json.loads(COMMITTED.read_text()))
    readme = (COMMITTED.parents[2] / "docs" / "healing.md").read_text()
    before, after = record.held_out_before, record.held_out_after
    quoted = [f"{before.kl_from_base:.3f} -> {after.kl_from_base:.4f}",
              f"{before.perplexity:.2f} -> {after.perplexity:.2f}", f"{before.base_perplexity:.2f}",
              f"{before.top1_agreement:.1%} -> {after.top1_agreement:.1%}", f"{record.seconds:,.0f} s"]
    for text in quoted:
        assert text in readme, text
    assert record.training.steps == 128 and record.texts.held_out.tokens == 16384
