"""`reffuse analyze` results read back: every committed analysis.json writes the JSON it was read from."""

import json
from pathlib import Path

import pytest

from reffuse.cli import main
from reffuse.formats.corpus import Span
from reffuse.method.analysis import Analysis, AnalysisTokens

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted(ROOT.glob("reports/**/analysis.json"))


def test_the_committed_analyses_are_found():
    assert len(COMMITTED) >= 2


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_analysis_round_trips(path):
    raw = json.loads(path.read_text())
    written = Analysis.from_json(raw).to_json()
    assert written == raw and list(written) == list(raw)


def test_a_fresh_analysis_round_trips_and_reads_typed(tmp_path, capsys):
    assert main(["analyze", "--model", "tiny", "--dependency-tokens", "32", "--drop-attention-count", "2",
                 "--greedy-blocks", "all", "--no-figures", "--out", str(tmp_path / "a")]) == 0
    raw = json.loads((tmp_path / "a" / "analysis.json").read_text())
    analysis = Analysis.from_json(raw)
    assert analysis.to_json() == raw
    removal = analysis.attention_removal
    assert all(isinstance(block, int) for block in removal.kl_scores) and removal.joint_kl > 0
    assert analysis.attention_free_blocks() == [i for i, b in enumerate(analysis.model.layout) if not b.attention]
    assert analysis.dependency.block.shape == (12, 12) and analysis.greedy.steps[0].step == 1
    assert "greedy windows of 4" in capsys.readouterr().out


def test_spans_are_written_as_they_were_read():
    """Spans recorded before they named their kind (drama or verse) are written back without one."""
    span = {"play": "macbeth_gut", "title": "Macbeth", "start": 0, "end": 90, "tokens": 32}
    for spans in ([span], [span | {"kind": "drama"}]):
        raw = {"split": "calibration", "spans": spans, "tokenizer": "smollm2", "sequences": 1, "sequence_length": 32,
               "total": 32, "measured": 31, "attention_sink_excluded": True, "ids": [list(range(32))]}
        tokens = AnalysisTokens.from_json(raw)
        assert tokens.spans[0] == Span("macbeth_gut", "Macbeth", 0, 90, 32) and tokens.to_json() == raw
