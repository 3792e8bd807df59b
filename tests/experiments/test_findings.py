"""The findings of `reffuse experiments`: the committed run's verdicts follow from its JSON by the rules in code,
and the whole study runs end to end on the synthetic model."""

import json
from pathlib import Path

import pytest

import numpy as np

from reffuse.cli import main
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings import RULES, by_steps, verdicts
from reffuse.experiments.report import markdown, regions_markdown
from reffuse.experiments.run import region_summary
from reffuse.stats import paired_difference

REPORTS = Path(__file__).resolve().parents[2] / "reports" / "experiments"
REPORT = REPORTS / "smollm2"            # the main run: region 1 on 16384 held-out tokens
REGIONS = REPORTS / "smollm2_regions"   # the replication over four regions
COMMITTED = REPORT / "experiments.json"


def test_the_committed_verdicts_and_report_follow_from_the_committed_numbers_by_the_code():
    result = json.loads(COMMITTED.read_text())
    assert verdicts(result) == result["verdicts"]
    assert markdown(result, result["command"]) == (REPORT / "README.md").read_text()
    assert [v["finding"] for v in result["verdicts"]] == list("abcdefghijk")
    # the rules were committed before the run and unchanged while it ran
    assert result["rules"]["commit"] and result["rules"]["uncommitted_changes"] is False
    summary = json.loads((REGIONS / "regions.json").read_text())
    results = [json.loads((REGIONS / f"region-{r['rank']}" / "experiments.json").read_text())
               for r in summary["regions"]]
    assert len(results) == 4
    for region in results:
        assert verdicts(region) == region["verdicts"]
        assert markdown(region, region["command"]) == (REGIONS / f"region-{region['settings']['region_rank']}" /
                                                       "README.md").read_text()
        assert [v["finding"] for v in region["verdicts"]] == list("abcdefghijk")
    assert region_summary(results) | {"command": summary["command"], "seconds": summary["seconds"]} == summary
    assert regions_markdown(summary, summary["command"], summary["seconds"] / 60) == (REGIONS / "README.md").read_text()
    assert summary["rules"]["commit"] and summary["rules"]["uncommitted_changes"] is False


def test_the_main_run_is_judged_on_16k_held_out_tokens_of_two_kinds_of_text_from_their_first_scene():
    held_out = json.loads(COMMITTED.read_text())["texts"]["held_out"]
    spans = held_out["spans"]
    assert held_out["tokens"] >= 16384 and len(spans) == 9
    assert {s["kind"] for s in spans} == {"drama", "verse"}
    assert all(s["start"] > 0 for s in spans)      # the title pages and lists of persons are left out


def test_one_interval_recomputed_from_the_committed_per_token_values():
    """(a)'s fewest-against-most-groups comparison, from the JSON alone: its mean is the difference of the two
    reported KLs, and its interval over windows follows from the per-window sums."""
    result = json.loads(COMMITTED.read_text())
    rows = by_steps(result)
    x, y = rows[-1]["fold"], rows[0]["fold"]
    diffs = [np.array(a) - np.array(b) for a, b in zip(x["per_token"]["kl"], y["per_token"]["kl"])]
    sums, counts = np.array([d.sum() for d in diffs]), np.array([d.size for d in diffs])
    assert sums.sum() / counts.sum() == pytest.approx(x["kl"] - y["kl"], rel=1e-4)  # per-token values: 5 digits
    draws = np.random.default_rng(0).integers(0, len(diffs), (2000, len(diffs)))
    low, high = np.quantile(sums[draws].sum(axis=1) / counts[draws].sum(axis=1), [0.025, 0.975])
    d = paired_difference(x["per_token"]["kl"], y["per_token"]["kl"])
    assert d["windows_interval_95"] == pytest.approx([low, high])
    verdict = next(v for v in result["verdicts"] if v["finding"] == "a")
    assert f"{rows[0]['steps']} -> {rows[-1]['steps']}: {describe(d)}" in verdict["here"]


@pytest.mark.slow
def test_the_study_runs_end_to_end_on_the_synthetic_model(tmp_path, capsys):
    out = tmp_path / "experiments"
    assert main(["experiments", "--model", "tiny", "--out", str(out), "--held-out-tokens", "256",
                 "--calibration-tokens", "1024", "--scoring-tokens", "64", "--dependency-tokens", "64",
                 "--window", "64", "--decode-tokens", "4", "--repeats", "2", "--scale-tokens", "256,1024"]) == 0
    result = json.loads((out / "experiments.json").read_text())
    assert [v["finding"] for v in result["verdicts"]] == list("abcdefghijk") and len(result["verdicts"]) == len(RULES)
    assert all(v["verdict"] in ("held", "partly held", "did not hold", "not resolved", "not measured")
               for v in result["verdicts"])
    first, last = result["span"]
    one_step = next(row for row in result["intensity"] if row["steps"] == 1)
    assert one_step["groups"] == [[first, last]]                       # one step: the whole span in one group
    assert all(row["fold"]["kl"] >= 0 and row["calibrated"]["kl"] >= 0 for row in result["intensity"])
    # original, pre-fusion, fused, and every count of removed FFNs (those of (b) among them)
    removals = result["equal_latency"]["removal"]
    assert len(result["decode"]) == 2 + len(result["intensity"]) + len(removals) == 2 + 4 + (last - first)
    assert all(len(v["ms_interquartile"]) == 2 and v["repeats"] == 2 for v in result["decode"].values())
    assert [row["removed_count"] for row in removals] == list(range(1, last - first + 1))
    assert all(row["refit"]["kl"] >= 0 and row["refit_fits"] for row in removals)
    assert set(result["equal_latency"]["modelled"]["ms"]) == {"pre-fusion"} | {
        name for name in result["decode"] if name != "original"}
    scale = result["calibration_scale"]
    assert [row["tokens"] for row in scale["rows"]] == [256, 1024] * 2 and scale["sizes"] == [256, 1024]
    assert all(0 <= g["calibrated"] for row in scale["rows"] for g in row["held_out_residual"])
    assert (out / "README.md").read_text().startswith("# FFN Fusion experiments at small scale")


@pytest.mark.slow
def test_the_study_replicated_over_two_regions(tmp_path):
    out = tmp_path / "regions"
    assert main(["experiments", "--model", "tiny", "--regions", "2", "--out", str(out), "--held-out-tokens", "128",
                 "--calibration-tokens", "1024", "--scoring-tokens", "64", "--dependency-tokens", "64",
                 "--window", "64", "--decode-tokens", "2", "--repeats", "1", "--scale-tokens", "256,512"]) == 0
    summary = json.loads((out / "regions.json").read_text())
    first, second = (json.loads((out / f"region-{k}" / "experiments.json").read_text()) for k in (1, 2))
    assert [r["rank"] for r in summary["regions"]] == [1, 2]
    assert first["attention_removal"]["blocks"] != second["attention_removal"]["blocks"]
    assert "2nd least summed" in second["attention_removal"]["rule"]
    for finding in summary["findings"]:
        assert sum(finding["counts"].values()) == 2
    table = (out / "README.md").read_text()
    assert "[region 2](region-2/README.md)" in table and "| (a) fusion intensity |" in table
    assert all("sink_restored" in row["fold"] for row in first["intensity"])
    assert "first_token_matrix" in first["ffn_dependency"]
    assert set(summary["regions"][0]["predictors"]) == set(first["predictors"]["correlations"])
    assert "(h) Spearman rank correlation" in table

