"""`reffuse tp` results read back: every committed one writes the JSON it was read from, key for key."""

import json
from pathlib import Path

import pytest

from reffuse.speed.tp_result import LATER_KEYS, TpResult
from reffuse.stats import PairedRatio

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted(ROOT.glob("benchmarks/results/**/tp_*.json"))


def test_the_committed_results_are_found():
    assert len(COMMITTED) >= 10


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_result_round_trips(path):
    raw = json.loads(path.read_text())
    written = TpResult.from_json(raw).to_json()
    assert written == raw and list(written) == list(raw)


def test_a_result_with_the_later_keys_writes_them_all():
    """The committed runs predate LATER_KEYS; a run of today writes them, null on CPU included."""
    raw = json.loads((ROOT / "benchmarks" / "results" / "tp_tiny_n2.json").read_text())
    ratio = {"median": 0.9, "interval_95": [0.8, 0.95], "repeats": 8, "resolved": True}
    today = raw | {"allreduce_path": None, "cuda_aware_source": None,
                   "fused_over_sequential_time": {"prefill": ratio, "decode": ratio}}
    result = TpResult.from_json(today)
    assert result.unrecorded == () and result.to_json() == today
    assert result.fused_over_sequential_time["decode"] == PairedRatio(0.9, [0.8, 0.95], 8, True)
    assert set(LATER_KEYS) <= set(result.to_json())
