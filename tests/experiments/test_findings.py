"""The findings of `reffuse experiments`: the committed run's verdicts follow from its JSON by the rules in code,
and the whole study runs end to end on the synthetic model."""

import json
import shutil
from pathlib import Path

import pytest

import numpy as np

from reffuse.cli import main
from reffuse.evaluation.intervals import describe
from reffuse.experiments import findings
from reffuse.experiments.findings import RULES, StudyResult, by_steps, difference, verdicts
from reffuse.experiments.provenance import changes_since
from reffuse.experiments.report import markdown, regions_markdown
from reffuse.experiments.run import SETUP_FILES, RegionSummary, region_summary
from reffuse.stats import RESAMPLES, paired_difference, spearman, t_quantile

REPORTS = Path(__file__).resolve().parents[2] / "reports" / "experiments"
REPORT = REPORTS / "smollm2"            # the main run: region 1 on 16384 held-out tokens
REGIONS = REPORTS / "smollm2_regions"   # the replication over four regions
COMMITTED = REPORT / "experiments.json"
COMMITTED_RUNS = [COMMITTED] + sorted(REGIONS.glob("region-*/experiments.json"))


def read(path: Path) -> StudyResult:
    return StudyResult.from_json(json.loads(path.read_text()))


def by_finding(verdict_list) -> dict:
    return {v.finding: v.verdict for v in verdict_list}


@pytest.mark.parametrize("path", COMMITTED_RUNS, ids=lambda p: p.parent.name)
def test_every_committed_run_reads_back_to_the_same_json(path):
    raw = json.loads(path.read_text())
    assert StudyResult.from_json(raw).to_json() == raw


def test_the_committed_summary_over_regions_reads_back_to_the_same_json():
    raw = json.loads((REGIONS / "regions.json").read_text())
    assert RegionSummary.from_json(raw).to_json() == raw


def test_the_committed_verdicts_and_report_follow_from_the_committed_numbers_by_the_code():
    result = read(COMMITTED)
    assert verdicts(result) == result.verdicts
    assert markdown(result, result.command) == (REPORT / "README.md").read_text()
    assert [v.finding for v in result.verdicts] == list("abcdefghijk")
    # the rules were committed before the run and unchanged while it ran; the revised rules that judged it again
    # were committed before that, and the verdicts the run recorded are kept beside the new ones
    assert result.rules.commit and result.rules.uncommitted_changes is False
    assert result.revision.rules.commit and result.revision.rules.uncommitted_changes is False
    assert [v.finding for v in result.verdicts_as_run] == list("abcdefghijk")
    assert "Rules revised on " + result.revision.date in (REPORT / "README.md").read_text()
    summary = RegionSummary.from_json(json.loads((REGIONS / "regions.json").read_text()))
    results = [read(REGIONS / f"region-{r.rank}" / "experiments.json") for r in summary.regions]
    assert len(results) == 4
    for region in results:
        assert verdicts(region) == region.verdicts
        assert markdown(region, region.command) == (REGIONS / f"region-{region.settings.region_rank}" /
                                                    "README.md").read_text()
        assert [v.finding for v in region.verdicts] == list("abcdefghijk")
    assert region_summary(results, summary.command, summary.seconds) == summary
    assert regions_markdown(summary, summary.command, summary.seconds / 60) == (REGIONS / "README.md").read_text()
    assert summary.rules.commit and summary.rules.uncommitted_changes is False
    assert "**The regions overlap** (5-12, 4-11, 7-14, 6-13" in (REGIONS / "README.md").read_text()


def test_each_finding_is_one_module_with_its_rule_and_its_place_in_the_report():
    names = [finding.__name__.rsplit(".", 1)[1] for finding in findings.FINDINGS]
    assert [name[:2] for name in names] == [f"{letter}_" for letter in "abcdefghijk"]
    assert RULES == tuple(finding.judge for finding in findings.FINDINGS)
    placed = findings.ON_THE_PLANS + findings.OTHERS     # every section once; (f)'s KL is a column of (a)'s table
    assert len(set(placed)) == len(placed) and set(placed) == set(findings.FINDINGS) - {findings.f_norm}


def test_h_recomputed_without_the_groups_whose_predictor_is_their_own_measurement():
    """(h) from the committed groups alone, in each region (the main run's groups are region 1's): an adjacent
    pair's neighbour damage is its damage, so the pairs are left out; cosine-M must then rank the damage better
    than the groups' size does, and it does not, resolved, in any region (nor does any other predictor)."""
    for index in range(4):
        result = read(REGIONS / f"region-{index + 1}" / "experiments.json")
        groups = result.predictors.groups
        pairs = [g for g in groups if g.group[1] - g.group[0] == 1]
        assert len(groups) == 21 and len(pairs) == 6
        assert all(g.values["neighbour damage"] == g.damage for g in pairs)         # the circular groups
        kept = [g for g in groups if g.group[1] - g.group[0] > 1]
        damage = np.array([g.damage for g in kept])
        size = np.array([g.group[1] - g.group[0] + 1 for g in kept])
        cosine = np.array([g.values["cosine-M"] for g in kept])
        h = next(v for v in result.verdicts if v.finding == "h")
        lead = spearman(cosine, damage) - spearman(size, damage)
        assert (f"group size {spearman(size, damage):+.2f}" in h.here
                and f"cosine-M {spearman(cosine, damage):+.2f}" in h.here and f"lead {lead:+.2f}" in h.here)
        if index == 0:  # region 1: the paired bootstrap of the lead by hand, the same groups drawn for both
            draws = np.random.default_rng(0).integers(0, len(kept), (RESAMPLES, len(kept)))
            leads = np.array([np.float64(spearman(cosine[d], damage[d])) - np.float64(spearman(size[d], damage[d]))
                              for d in draws])
            low, high = np.quantile(leads[np.isfinite(leads)], [0.025, 0.975])
            assert low < 0 < high and f"lead {lead:+.2f} [{low:+.2f}, {high:+.2f}]" in h.here
        assert h.verdict == "not resolved"
        assert h.note.endswith("resolved: none")
        assert by_finding(result.verdicts_as_run)["h"] == "held"


def test_few_windows_are_judged_by_a_t_interval_and_that_moves_region_2():
    """The regions are judged on 8 windows: the interval over windows is the t-interval of the windows' own
    means, by hand here for (a)'s step from 4 to 3 groups in region 2, which it leaves unresolved; region 2's (a)
    and (g), held by the percentile bootstrap, are partly held."""
    region = read(REGIONS / "region-2" / "experiments.json")
    rows = by_steps(region)
    before, after = rows[0].fold.per_token.kl, rows[1].fold.per_token.kl
    means = np.array([np.mean(np.array(a) - np.array(b)) for a, b in zip(after, before)])
    assert len(means) == 8
    half = t_quantile(0.975, 7) * means.std(ddof=1) / np.sqrt(8)
    d = difference(rows[1].fold, rows[0].fold)
    assert d.windows_interval == "t"
    assert d.windows_interval_95 == pytest.approx([means.mean() - half, means.mean() + half])
    assert d.windows_interval_95[0] < 0 < d.windows_interval_95[1] and not d.resolved
    now, was = by_finding(region.verdicts), by_finding(region.verdicts_as_run)
    assert (now["a"], was["a"], now["g"], was["g"]) == ("partly held", "held", "partly held", "held")
    assert "over windows (t)" in next(v.here for v in region.verdicts if v.finding == "a")


def test_the_setup_files_exist_and_their_changes_are_read_from_git():
    root = Path(__file__).resolve().parents[2]
    assert all((root / f).exists() for f in SETUP_FILES)   # files, and the findings' package
    head = changes_since("HEAD", SETUP_FILES)
    assert all(f.commits == 0 and f.uncommitted for f in head.files)  # nothing committed after HEAD
    recorded = read(COMMITTED).revision.setup_changes
    assert "reffuse/formats/corpus.py" in [f.file for f in recorded.files]  # the held-out text changed


def test_report_only_on_a_copy_of_a_committed_run_rewrites_the_same_report(tmp_path, capsys):
    """Judged again from its JSON in a copy of its folder: the same JSON and the same report, but for the lines
    that say when, by which command and under which checkout it was judged."""
    committed = REGIONS / "region-1"
    folder = tmp_path / "region-1"
    shutil.copytree(committed, folder)
    assert main(["experiments", "--report-only", "--out", str(folder)]) == 0
    capsys.readouterr()
    before, after = json.loads((committed / "experiments.json").read_text()), read(folder / "experiments.json")
    assert after.to_json() | {"revision": before["revision"]} == before

    def judged(line: str) -> bool:
        return line.startswith(("**Rules revised on ", "**Judged again", "The run recorded "))

    old, new = ([line for line in (f / "README.md").read_text().splitlines() if not judged(line)]
                for f in (committed, folder))
    assert old == new


def test_report_only_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["experiments", "--report-only", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "holds no experiments.json that reffuse experiments wrote" in error and error.count("\n") == 1


def test_the_main_run_is_judged_on_16k_held_out_tokens_of_two_kinds_of_text_from_their_first_scene():
    held_out = read(COMMITTED).texts.held_out
    spans = held_out.spans
    assert held_out.tokens >= 16384 and len(spans) == 9
    assert {s.kind for s in spans} == {"drama", "verse"}
    assert all(s.start > 0 for s in spans)      # the title pages and lists of persons are left out


def test_one_interval_recomputed_from_the_committed_per_token_values():
    """(a)'s fewest-against-most-groups comparison, from the JSON alone: its mean is the difference of the two
    reported KLs, and its interval over windows follows from the per-window sums."""
    result = read(COMMITTED)
    rows = by_steps(result)
    x, y = rows[-1].fold, rows[0].fold
    diffs = [np.array(a) - np.array(b) for a, b in zip(x.per_token.kl, y.per_token.kl)]
    sums, counts = np.array([d.sum() for d in diffs]), np.array([d.size for d in diffs])
    assert sums.sum() / counts.sum() == pytest.approx(x.kl - y.kl, rel=1e-4)  # per-token values: 5 digits
    draws = np.random.default_rng(0).integers(0, len(diffs), (2000, len(diffs)))
    low, high = np.quantile(sums[draws].sum(axis=1) / counts[draws].sum(axis=1), [0.025, 0.975])
    d = paired_difference(x.per_token.kl, y.per_token.kl)
    assert d.windows_interval_95 == pytest.approx([low, high])
    verdict = next(v for v in result.verdicts if v.finding == "a")
    assert f"{rows[0].steps} -> {rows[-1].steps}: {describe(d)}" in verdict.here


@pytest.mark.slow
def test_the_study_runs_end_to_end_on_the_synthetic_model(tmp_path, capsys):
    out = tmp_path / "experiments"
    assert main(["experiments", "--model", "tiny", "--out", str(out), "--held-out-tokens", "256",
                 "--calibration-tokens", "1024", "--scoring-tokens", "64", "--dependency-tokens", "64",
                 "--window", "64", "--decode-tokens", "4", "--repeats", "2", "--scale-tokens", "256,1024"]) == 0
    raw = json.loads((out / "experiments.json").read_text())
    result = StudyResult.from_json(raw)
    assert result.to_json() == raw
    assert [v.finding for v in result.verdicts] == list("abcdefghijk") and len(result.verdicts) == len(RULES)
    assert all(v.verdict in ("held", "partly held", "did not hold", "not resolved", "not measured")
               for v in result.verdicts)
    first, last = result.span
    one_step = next(row for row in result.intensity if row.steps == 1)
    assert one_step.groups == ((first, last),)                         # one step: the whole span in one group
    assert all(row.fold.kl >= 0 and row.calibrated.kl >= 0 for row in result.intensity)
    # original, pre-fusion, fused, and every count of removed FFNs (those of (b) among them)
    removals = result.equal_latency.removal
    assert len(result.decode) == 2 + len(result.intensity) + len(removals) == 2 + 4 + (last - first)
    assert all(len(v.ms_interquartile) == 2 and v.repeats == 2 for v in result.decode.values())
    assert [row.removed_count for row in removals] == list(range(1, last - first + 1))
    assert all(row.refit.kl >= 0 and row.refit_fits for row in removals)
    assert set(result.equal_latency.modelled.ms) == {"pre-fusion"} | {
        name for name in result.decode if name != "original"}
    scale = result.calibration_scale
    assert [row.tokens for row in scale.rows] == [256, 1024] * 2 and scale.sizes == [256, 1024]
    assert all(0 <= g.calibrated for row in scale.rows for g in row.held_out_residual)
    assert (out / "README.md").read_text().startswith("# FFN Fusion experiments at small scale")
    assert result.setup.files == SETUP_FILES
    # judged again from its JSON: the same rules give the same verdicts, and those of the run are kept beside
    assert main(["experiments", "--report-only", "--out", str(out)]) == 0
    again = read(out / "experiments.json")
    assert again.verdicts == again.verdicts_as_run == result.verdicts
    assert (out / "README.md").read_text() == markdown(again, again.command)


@pytest.mark.slow
def test_the_study_replicated_over_two_regions(tmp_path):
    out = tmp_path / "regions"
    assert main(["experiments", "--model", "tiny", "--regions", "2", "--out", str(out), "--held-out-tokens", "128",
                 "--calibration-tokens", "1024", "--scoring-tokens", "64", "--dependency-tokens", "64",
                 "--window", "64", "--decode-tokens", "2", "--repeats", "1", "--scale-tokens", "256,512"]) == 0
    summary = RegionSummary.from_json(json.loads((out / "regions.json").read_text()))
    first, second = (read(out / f"region-{k}" / "experiments.json") for k in (1, 2))
    assert [r.rank for r in summary.regions] == [1, 2]
    assert first.attention_removal.blocks != second.attention_removal.blocks
    assert "2nd least summed" in second.attention_removal.rule
    for finding in summary.findings:
        assert sum(finding.counts.values()) == 2
    table = (out / "README.md").read_text()
    assert "[region 2](region-2/README.md)" in table and "| (a) fusion intensity |" in table
    assert all(row.fold.sink_restored is not None for row in first.intensity)
    assert first.ffn_dependency.first_token_matrix is not None
    assert set(summary.regions[0].predictors) == set(first.predictors.correlations)
    assert "(h) Spearman rank correlation" in table

