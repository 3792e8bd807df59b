"""`reffuse analyze` results read back: every committed analysis.json writes the JSON it was read from."""

import json
from pathlib import Path

import pytest

from reffuse.method.analysis import Analysis

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted(ROOT.glob("reports/**/analysis.json"))


def test_the_committed_analyses_are_found():
    assert len(COMMITTED) >= 2


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_analysis_round_trips(path):
    raw = json.loads(path.read_text())
    written = Analysis.from_json(raw).to_json()
    assert written == raw and list(written) == list(raw)
