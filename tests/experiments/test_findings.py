"""The findings of `reffuse experiments`: the committed run's verdicts follow from its JSON by the rules in code,
and the whole study runs end to end on the synthetic model."""

import json
from pathlib import Path

from reffuse.cli import main
from reffuse.experiments.findings import RULES, verdicts
from reffuse.experiments.report import markdown

COMMITTED = Path(__file__).resolve().parents[2] / "reports" / "experiments" / "smollm2" / "experiments.json"


def test_the_committed_verdicts_and_report_follow_from_the_committed_numbers_by_the_code():
    result = json.loads(COMMITTED.read_text())
    assert verdicts(result) == result["verdicts"]
    assert markdown(result, result["command"]) == (COMMITTED.parent / "README.md").read_text()
    assert [v["finding"] for v in result["verdicts"]] == list("abcdefg")


def test_the_study_runs_end_to_end_on_the_synthetic_model(tmp_path, capsys):
    out = tmp_path / "experiments"
    assert main(["experiments", "--model", "tiny", "--out", str(out), "--held-out-tokens", "256",
                 "--calibration-tokens", "1024", "--scoring-tokens", "64", "--dependency-tokens", "64",
                 "--window", "64", "--decode-tokens", "4", "--repeats", "1"]) == 0
    result = json.loads((out / "experiments.json").read_text())
    assert {v["finding"] for v in result["verdicts"]} == set("abcdefg") and len(result["verdicts"]) == len(RULES)
    assert all(v["verdict"] in ("held", "partly held", "did not hold", "not measured") for v in result["verdicts"])
    first, last = result["span"]
    one_step = next(row for row in result["intensity"] if row["steps"] == 1)
    assert one_step["groups"] == [[first, last]]                       # one step: the whole span in one group
    assert all(row["fold"]["kl"] >= 0 and row["calibrated"]["kl"] >= 0 for row in result["intensity"])
    assert len(result["decode"]) == 2 + 2 * len(result["intensity"])  # original, pre-fusion, fused and removed
    assert (out / "README.md").read_text().startswith("# FFN Fusion experiments at small scale")
