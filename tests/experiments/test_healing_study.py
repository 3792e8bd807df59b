"""The healing study's rules and report, on made-up points (what each rule decides, pending while points are
missing), and the committed study's verdicts recomputed from its JSON."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from reffuse.cli import main
from reffuse.experiments.healing.findings import GAP_FRACTION, verdicts
from reffuse.errors import ReffuseError
from reffuse.experiments.healing.plan import ATTENTION_REMOVED, Budgets, FusionChoices, Point, study_points
from reffuse.experiments.healing.points import HealingPoint, WindowScores
from reffuse.experiments.healing.report import FINDINGS, FIGURE, HealingSummary, summarize, write_report
from reffuse.experiments.healing.study import HealingStudySettings, RecordedFusionStudy, StudyRecord
from reffuse.experiments.provenance import Provenance, provenance
from reffuse.files import json_text

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "reports" / "healing" / "study"
BUDGETS = Budgets(kd=(1024, 4096), local=(1024, 4096, 16384), seeds=(0, 1), sweep_tokens=1024)
TEXTS, WINDOWS_PER_TEXT, PREDICTIONS = 4, 3, 100
PROVENANCE = Provenance(("reffuse/experiments/healing",), None, None, None)


def scores(mean_kl: float, spread: float = 0.02, seed: int = 0) -> WindowScores:
    """Windows of 4 texts whose mean KL is mean_kl, each window off by a seeded amount."""
    rng = np.random.default_rng(seed)
    n = TEXTS * WINDOWS_PER_TEXT
    per_window = mean_kl + spread * rng.standard_normal(n)
    per_window += mean_kl - per_window.mean()
    return WindowScores(kl=list(per_window * PREDICTIONS), nll=[3.0 * PREDICTIONS] * n, agree=[60] * n,
                        predictions=[PREDICTIONS] * n, text=[i // WINDOWS_PER_TEXT for i in range(n)],
                        texts=[f"play {i}" for i in range(TEXTS)])


def result(variant, objective, tokens, kl, seed=0, **kw) -> HealingPoint:
    point = Point(variant, objective, tokens, seed, **kw)
    return HealingPoint(point, [], scores(kl, seed=zlib.crc32(repr(point.to_json()).encode())), None, 1.0, 1,
                        PROVENANCE)


def study_results(healed_fused: float) -> list[HealingPoint]:
    """Every point the rules read: before healing the fused model is 0.4 nats above the attention-removed one."""
    largest, kd_local = max(BUDGETS.kd), max(set(BUDGETS.kd) & set(BUDGETS.local))
    start = {ATTENTION_REMOVED: 0.6, "fused, 4 steps": 1.0, "fused, 1 step": 2.0}
    out = [result(v, "start", 0, kl) for v, kl in start.items()]
    healed = {ATTENTION_REMOVED: 0.3, "fused, 4 steps": healed_fused, "fused, 4 steps, refit": healed_fused - 0.05,
              "3 FFNs removed": healed_fused + 0.2, "fused, 1 step": 0.6, "fused, 1 step, refit": 0.55,
              "6 FFNs removed": 0.9}
    out += [result(v, "kd", largest, kl, seed=s) for v, kl in healed.items() for s in BUDGETS.seeds]
    out += [result("fused, 4 steps", objective, kd_local, healed_fused + extra, seed=s)
            for objective, extra in (("kd-fused", 0.02), ("local", 0.3)) for s in BUDGETS.seeds]
    return out


def by_finding(results) -> dict:
    return {v.finding: v for v in verdicts(results, BUDGETS)}


def test_each_rule_decides_from_the_points():
    v = by_finding(study_results(healed_fused=0.35))    # 0.05 above against a threshold of 0.5 x 0.4
    assert v["l"].verdict == "held" and f"{GAP_FRACTION * 0.4:+.4f}" in v["l"].here
    assert v["m"].verdict == "held" and v["n"].verdict == "held" and v["o"].verdict == "held"
    v = by_finding(study_results(healed_fused=0.9))     # 0.6 above: the gap grew
    assert v["l"].verdict == "did not hold"


def test_a_finding_is_pending_until_its_points_have_run():
    results = [r for r in study_results(0.35) if r.point.objective != "local"]
    v = by_finding(results)
    assert v["n"].verdict == "pending" and "local" in v["n"].note
    assert v["l"].verdict == "held"


def write_study_folder(folder: Path) -> None:
    """A study folder holding the made-up points of study_results(0.35)."""
    (folder / "points").mkdir()
    choices = FusionChoices((5, 6), (5, 12), {4: [(5, 8)], 1: [(5, 11)]}, {5: 0.2, 6: 0.1}, 1.0, "none", 2048, 256)
    study = StudyRecord(HealingStudySettings(budgets=BUDGETS), RecordedFusionStudy(choices, "fusion.json", PROVENANCE),
                        provenance(["reffuse/experiments/healing/findings.py"]),
                        provenance(["reffuse/experiments/healing"]))
    (folder / "study.json").write_text(json_text(study.to_json()))
    for i, r in enumerate(study_results(0.35)):
        (folder / "points" / f"{i}.json").write_text(json_text(r.to_json(), inline_lists=True))


def test_a_summary_round_trips_through_its_json(tmp_path):
    write_study_folder(tmp_path)
    summary = summarize(tmp_path)
    assert summary.curves and summary.verdicts
    record = json.loads(json_text(summary.to_json(), inline_lists=True))
    assert HealingSummary.from_json(record) == summary and HealingSummary.from_json(record).to_json() == record


@pytest.mark.slow
def test_the_report_is_drawn_from_the_folder(tmp_path):
    write_study_folder(tmp_path)
    summary = write_report(tmp_path, "reffuse healing-study --out X")
    text = (tmp_path / "README.md").read_text()
    assert json.loads((tmp_path / FINDINGS).read_text()) == summary.to_json()
    assert "### (l) healing closes most of the fusion gap: held" in text
    assert "{" not in text.split("## Setup")[0], "a field left unformatted in the report's opening"
    fused = next(c for c in summary.curves if (c.variant, c.objective) == ("fused, 4 steps", "kd"))
    assert [r.tokens for r in fused.rows] == [0, max(BUDGETS.kd)] and fused.rows[1].seeds == [0, 1]
    assert main(["healing-study", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / FIGURE).is_file()


def test_report_only_refuses_a_folder_without_a_study(tmp_path, capsys):
    assert main(["healing-study", "--out", str(tmp_path), "--report-only"]) == 2
    assert "no study.json" in capsys.readouterr().err


@pytest.mark.skipif(not (COMMITTED / FINDINGS).is_file(), reason="no committed healing study")
def test_the_committed_verdicts_recompute_from_the_points():
    committed = HealingSummary.from_json(json.loads((COMMITTED / FINDINGS).read_text()))
    recomputed = summarize(COMMITTED)
    assert recomputed.verdicts == committed.verdicts
    assert recomputed.curves == committed.curves


@pytest.mark.skipif(not (COMMITTED / FINDINGS).is_file(), reason="no committed healing study")
def test_the_committed_study_files_round_trip():
    """Every JSON file of the committed study reads into its type and writes back the same."""
    types = {"study.json": StudyRecord, FINDINGS: HealingSummary}
    files = [(COMMITTED / name, kind) for name, kind in types.items()]
    files += [(path, HealingPoint) for path in sorted((COMMITTED / "points").glob("*.json"))]
    assert len(files) > 2
    for path, kind in files:
        record = json.loads(path.read_text())
        assert kind.from_json(record).to_json() == record, path


def test_a_finding_waits_for_every_seed_the_plan_runs():
    results = [r for r in study_results(0.35) if not (r.point.variant == "3 FFNs removed" and r.point.seed == 1)]
    v = by_finding(results)
    assert v["m"].verdict == "pending" and "3 FFNs removed" in v["m"].note
    assert v["l"].verdict == "held"


def test_a_difference_resolves_only_when_every_seed_agrees():
    """Seed 1 of the fused model lands above 3 FFNs removed, seed 0 below: (m) cannot count that pair."""
    results = [r for r in study_results(0.35) if not (r.point.variant == "fused, 4 steps" and r.point.seed == 1
                                                      and r.point.objective == "kd")]
    results.append(result("fused, 4 steps", "kd", max(BUDGETS.kd), 0.35 + 0.3, seed=1))
    v = by_finding(results)
    assert v["m"].verdict == "partly held" and "seed 0: -0.2000" in v["m"].here and "seed 1: +0.1000" in v["m"].here


def test_the_gap_rule_recomputes_by_hand():
    """(l) for seed 0: Σ over windows of fused - removed - 0.5 x (fused start - removed start), over predictions."""
    results = study_results(0.35)
    kl = {(r.point.variant, r.point.objective, r.point.seed): np.array(r.scores.kl) for r in results}
    d = (kl["fused, 4 steps", "kd", 0] - kl[ATTENTION_REMOVED, "kd", 0]
         - GAP_FRACTION * (kl["fused, 4 steps", "start", 0] - kl[ATTENTION_REMOVED, "start", 0]))
    expected = d.sum() / (TEXTS * WINDOWS_PER_TEXT * PREDICTIONS)
    here = by_finding(results)["l"].here
    assert f"gap (+0.2000 over all windows): seed 0: {expected:+.4f} nats" in here


def test_points_scored_on_other_windows_are_refused():
    results = study_results(0.35)
    moved = next(i for i, r in enumerate(results) if r.point.variant == "3 FFNs removed" and r.point.seed == 0)
    other = results[moved].scores
    results[moved] = HealingPoint(results[moved].point, [], WindowScores(other.kl, other.nll, other.agree,
                                  other.predictions, other.text[::-1], other.texts), None, 1.0, 1, PROVENANCE)
    with pytest.raises(ReffuseError, match="other held-out windows"):
        by_finding(results)


def test_a_point_whose_seeds_are_still_running_is_reported_once_they_all_have():
    """The 1-step model, reported beside (l), waits for every seed rather than pairing the seeds it has."""
    results = [r for r in study_results(0.35) if not (r.point.variant == "fused, 1 step" and r.point.seed == 1)]
    assert "1 step:" not in by_finding(results)["l"].here
    assert "1 step: +1.4000 before, seed 0:" in by_finding(study_results(0.35))["l"].here


def test_the_gap_is_refused_when_the_starts_were_scored_on_other_windows():
    results = study_results(0.35)
    for i, r in enumerate(results):
        if r.point.objective == "start":
            s = r.scores
            results[i] = HealingPoint(r.point, [], WindowScores(s.kl, s.nll, s.agree, s.predictions, s.text[::-1],
                                                                s.texts), None, 1.0, 1, PROVENANCE)
    with pytest.raises(ReffuseError, match="the margin's points against fused, 4 steps"):
        by_finding(results)


def test_trained_points_pair_seed_with_seed():
    from reffuse.experiments.healing.findings import Seeded, compare
    one, two = scores(0.3), scores(0.4)
    with pytest.raises(ReffuseError, match=r"ran seeds \(0, 1\) and y seeds \(0,\)"):
        compare(Seeded("x", {0: one, 1: one}), Seeded("y", {0: two}))
    assert list(compare(Seeded("x", {0: one, 1: one}), Seeded("y", {0: two}, start=True)).per_seed) == [0, 1]


def test_budgets_refuse_seeds_without_seed_0_and_objectives_that_share_no_budget():
    with pytest.raises(ReffuseError, match="must start at 0"):
        Budgets(seeds=(1, 2))
    with pytest.raises(ReffuseError, match="share none"):
        Budgets(kd=(1024,), local=(2048,))


def test_the_plan_runs_every_judged_point_with_every_seed():
    budgets = Budgets()
    points = study_points(budgets)
    judged = {(p.variant, p.objective) for p in points if p.seed == 2}
    assert judged == {(v, "kd") for v in budgets.finding_variants} | {("fused, 4 steps", "kd-fused"),
                                                                      ("fused, 4 steps", "local")}
    assert all(p.tokens == max(budgets.kd) for p in points if p.seed) and len(points) == len(set(points)) == 60


@pytest.mark.skipif(not (COMMITTED / FINDINGS).is_file(), reason="no committed healing study")
def test_the_committed_report_states_the_committed_verdicts():
    text = (COMMITTED / "README.md").read_text()
    for v in HealingSummary.from_json(json.loads((COMMITTED / FINDINGS).read_text())).verdicts:
        assert f"### ({v.finding}) {v.title}: {v.verdict}" in text and v.here in text


def test_no_gap_to_close_is_not_resolved():
    results = [r for r in study_results(0.35) if r.point.variant != "fused, 4 steps" or r.point.objective != "start"]
    results.append(result("fused, 4 steps", "start", 0, 0.5))     # below the attention-removed model's 0.6
    assert by_finding(results)["l"].verdict == "not resolved"


def test_the_recovery_figure_draws_every_curve(tmp_path):
    pytest.importorskip("matplotlib")
    from reffuse.plots.healing import kl_ticks, recovery_figure
    write_study_folder(tmp_path)
    curves = summarize(tmp_path).curves
    left, right = recovery_figure(curves, "made-up points").axes
    kd = [c.variant for c in curves if c.objective == "kd"]
    others = [f"{c.variant}: {c.objective}" for c in curves if c.objective != "kd"]
    assert [t.get_text() for t in left.get_legend().get_texts()] == kd
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["fused, 4 steps: kd"] + others
    ticks, labels = kl_ticks(curves)            # the KL axis labelled inside the data's range, not only at 1
    values = [v for c in curves for r in c.rows for v in (r.kl, *(r.interval or ()))]
    assert len(ticks) >= 2 and labels == [f"{t:g}" for t in ticks]
    assert min(values) / 1.2 <= ticks[0] and ticks[-1] <= max(values) * 1.2
    assert list(left.get_yticks()) == ticks
