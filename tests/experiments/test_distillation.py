"""The committed local-distillation comparison (reffuse.experiments.distillation) reads back from its JSON."""

import json
from pathlib import Path

from reffuse.experiments.distillation import DistillationResult, markdown

COMMITTED = Path(__file__).resolve().parents[2] / "reports" / "distillation" / "smollm2" / "distillation.json"


def test_the_committed_distillation_reads_back_to_the_same_json():
    raw = json.loads(COMMITTED.read_text())
    result = DistillationResult.from_json(raw)
    assert result.to_json() == raw
    report = markdown(result, result.command)
    assert report.startswith("# Local distillation against the closed-form refit")
    assert "| 2 | 5-8,9-11 | 2.5740 | 0.3646 | 1.3122 | 86% | 49% |" in report
