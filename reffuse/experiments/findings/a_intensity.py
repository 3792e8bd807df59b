"""(a) Fusion intensity: the span as k sequential FFN steps, k = ceil(L/2) .. 1 (L = b - a blocks), cut where the
least FFN-level dependency is left inside the groups (reffuse.method.planning), plain fusion, norm "fold" and
norm "last" (the latter judged by (f)); where cosine-M cuts the span differently, its plan too (judged by (k)).
The report's table of (a) holds the columns of (f) and (g) beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from reffuse.core.fusion import fuse
from reffuse.core.layout import format_groups
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.rules import Verdict, decide, difference
from reffuse.experiments.study import ScoredVariant, Study, format_kl, format_perplexity, score_cells
from reffuse.method.calibrate import GroupCalibration
from reffuse.progress import Progress
from reffuse.records import as_tuple

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult


@dataclass(frozen=True)
class CosinePlan:
    """Cosine-M's plan for a k where it cuts the span differently from the planner, and its scores."""
    groups: tuple[tuple[int, int], ...]
    groups_text: str
    scores: ScoredVariant

    def to_json(self) -> dict:
        return {"groups": [list(g) for g in self.groups], "groups_text": self.groups_text, **self.scores.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> CosinePlan:
        return cls(as_tuple(raw["groups"]), raw["groups_text"], ScoredVariant.from_json(raw))


@dataclass
class IntensityRow:
    """The span fused into `steps` groups by the planner's plan: plain fusion with norm fold and norm last, cosine-M's
    plan where it differs, and calibrated fusion, which finding (g) adds to the row (calibration)."""
    steps: int
    groups: tuple[tuple[int, int], ...]
    groups_text: str
    depth_reduction: int                          # FFN steps saved: the span's length - steps
    fold: ScoredVariant
    last: ScoredVariant
    cosine_m_plan: CosinePlan | None = None       # None where cosine-M cuts the span the same way
    calibrated: ScoredVariant | None = None       # (g)'s calibrated fusion of the same plan
    calibration_fits: list[GroupCalibration] | None = None

    def to_json(self) -> dict:
        raw = {"steps": self.steps, "groups": [list(g) for g in self.groups], "groups_text": self.groups_text,
               "depth_reduction": self.depth_reduction, "fold": self.fold.to_json(), "last": self.last.to_json()}
        if self.cosine_m_plan is not None:
            raw["cosine_m_plan"] = self.cosine_m_plan.to_json()
        if self.calibrated is not None:
            raw["calibrated"] = self.calibrated.to_json()
        if self.calibration_fits is not None:
            raw["calibration_fits"] = [f.as_dict() for f in self.calibration_fits]
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> IntensityRow:
        cosine, calibrated, fits = raw.get("cosine_m_plan"), raw.get("calibrated"), raw.get("calibration_fits")
        return cls(raw["steps"], as_tuple(raw["groups"]), raw["groups_text"], raw["depth_reduction"],
                   ScoredVariant.from_json(raw["fold"]), ScoredVariant.from_json(raw["last"]),
                   None if cosine is None else CosinePlan.from_json(cosine),
                   None if calibrated is None else ScoredVariant.from_json(calibrated),
                   None if fits is None else [GroupCalibration.from_dict(f) for f in fits])


def fusion_intensity(study: Study) -> list[IntensityRow]:
    """Every plan of the planner with both norms; where cosine-M cuts the span differently, its plan too (for
    finding (k))."""
    a = study.span[0]
    rows = []
    with Progress("fusion variants", 2 * len(study.counts), "models") as bar:
        for k in study.counts:
            groups, cosine = study.plans[k], study.cosine_plans[k]
            fold = study.scores(fuse(study.pre, groups, norm="fold"), a)
            bar.update()
            last = study.scores(fuse(study.pre, groups, norm="last"), a)
            bar.update()
            cosine_plan = None if cosine == groups else CosinePlan(
                as_tuple(cosine), format_groups(cosine), study.scores(fuse(study.pre, cosine), a))
            rows.append(IntensityRow(k, as_tuple(groups), format_groups(groups), study.length - k, fold, last,
                                     cosine_plan))
    return rows


def by_steps(result: StudyResult) -> list[IntensityRow]:
    """The rows of finding (a), most steps first."""
    return sorted(result.intensity, key=lambda row: -row.steps)


def judge(r: StudyResult) -> Verdict:
    rows = by_steps(r)
    sink = r.sink.norm_leaving_run
    rises = [difference(after.fold, before.fold) for before, after in zip(rows, rows[1:])]
    overall = difference(rows[-1].fold, rows[0].fold)
    return Verdict(
        "a", "fusion intensity",
        paper="Puzzle-49B, 26 FFNs fused into 12/6/3/2: accuracy falls gradually, about 1% at 12 and about 4% at 2 "
              "(84.71 -> 83.92 -> 82.84 -> 81.69 -> 81.24)",
        here="KL to the pre-fusion model " + ", ".join(f"{row.steps} steps {format_kl(row.fold.kl)}" for row in rows)
             + "; perplexity " + ", ".join(format_perplexity(row.fold.perplexity) for row in rows)
             + f" (pre-fusion {format_perplexity(r.pre_fusion.perplexity)}). Each step to fewer groups, KL "
               "after - before: " + "; ".join(f"{before.steps} -> {after.steps}: {describe(d)}"
                                             for before, after, d in zip(rows, rows[1:], rises))
             + f"; {rows[0].steps} -> {rows[-1].steps}: {describe(overall)}. The first token's norm leaving "
               f"the run " + ", ".join(f"{row.fold.sink_norm:.0f}" for row in rows) + f" (pre-fusion {sink:.0f})",
        rule="held if every step to fewer groups raises the KL, each rise resolved; partly if the fewest groups "
             "against the most is a resolved rise; did not hold if that is a resolved fall; else not resolved",
        verdict=decide(all(d.higher for d in rises), overall.higher, overall.lower))


def section(r: StudyResult) -> list[str]:
    """The span at every k: plain fusion's scores, norm last's KL ((f)) and calibrated fusion's ((g))."""
    span, sink = r.span, r.sink
    planner = "cosine-M" if r.plan_costs is None else r.plan_costs.predictor
    cut = ("least FFN-level dependency stays inside the groups" if planner == "cosine-M" else
           f"the least {planner} stays inside the groups (the KL of fusing each adjacent pair alone, on "
           f"{r.plan_costs.tokens} calibration tokens; reffuse.method.planning says why this predictor)")
    lines = ["", "## (a) Fusion intensity, (f) fold vs last, (g) calibrated", "",
             f"The span {span[0]}-{span[1]} ({span[1] - span[0] + 1} FFNs) as k sequential steps, cut where the "
             f"{cut}.", "",
             "| steps | groups | plain fusion: KL | perplexity | top-1 | KL vs original | sink norm | norm last: KL | "
             "calibrated: KL | calibrated perplexity | gap closed |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pre = r.pre_fusion
    lines.append(f"| {span[1] - span[0] + 1} (pre-fusion) | - | 0 | {format_perplexity(pre.perplexity)} | 100% | "
                 f"{format_kl(pre.kl_vs_original)} | {sink.norm_leaving_run:.0f} | 0 | 0 | "
                 f"{format_perplexity(pre.perplexity)} | - |")
    for row in r.intensity:
        closed = 1 - row.calibrated.kl / row.fold.kl
        lines.append(f"| {row.steps} | {row.groups_text} | {score_cells(row.fold)} | "
                     f"{format_kl(row.last.kl)} | {format_kl(row.calibrated.kl)} | "
                     f"{format_perplexity(row.calibrated.perplexity)} | {100 * closed:.0f}% |")
    return lines
