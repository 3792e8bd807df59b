"""(k) The planner's predictor: reffuse's planner cuts the span where the neighbour damage is least, the paper where
cosine-M is; where the two cut it differently at some k, both plans on held-out text (cosine-M's plan is measured
with (a)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.a_intensity import by_steps
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference
from reffuse.experiments.study import format_kl

if TYPE_CHECKING:  # named for the annotations only
    from reffuse.experiments.findings import StudyResult


def judge(r: StudyResult) -> Verdict | None:
    if r.plan_costs is None:
        return None
    rows = [row for row in by_steps(r) if row.cosine_m_plan is not None]
    planner = r.plan_costs.predictor
    if not rows:
        return Verdict("k", "the planner's predictor on held-out text", paper="the paper plans with cosine-M (§3)",
                       here=f"{planner} and cosine-M cut the span the same way at every k", rule="-",
                       verdict="not measured")
    diffs = [difference(row.fold, row.cosine_m_plan.scores) for row in rows]
    return Verdict(
        "k", "the planner's predictor on held-out text",
        paper="the paper cuts runs by its block dependency metric, cosine-M (§3); reffuse's planner uses the "
              f"{planner}, chosen on the calibration-text damage of four regions (reffuse.method.predictors)",
        here="; ".join(f"{row.steps} steps: {planner} plan {row.groups_text} KL {format_kl(row.fold.kl)}, "
                       f"cosine-M plan {row.cosine_m_plan.groups_text} KL "
                       f"{format_kl(row.cosine_m_plan.scores.kl)}, difference {describe(d)}"
                       for row, d in zip(rows, diffs)),
        rule=f"our addition, at every k where the two plans differ: held if the {planner} plan has the resolved "
             "lower KL at each; partly if at some and resolved higher at none; did not hold if resolved higher at "
             "some and lower at none; else not resolved",
        verdict=decide_lower(diffs))


def section(r: StudyResult) -> list[str]:
    """(k): the planner's plans against cosine-M's where the two cut the span differently."""
    if r.plan_costs is None:
        return []
    costs = r.plan_costs
    a = costs.blocks[0]
    lines = ["", "## (k) The planner's predictor against cosine-M", "",
             f"The planner's cost, the {costs.predictor} of each adjacent pair (KL of fusing FFNs i, i+1 alone, "
             f"{costs.tokens} calibration tokens): "
             + ", ".join(f"{a + i}-{a + i + 1} {format_kl(costs.matrix[i][i + 1])}"
                         for i in range(len(costs.matrix) - 1)) + ".", ""]
    rows = [row for row in by_steps(r) if row.cosine_m_plan is not None]
    if not rows:
        return lines + ["Cosine-M cuts the span the same way at every k."]
    lines += ["| steps | planner's groups | KL | cosine-M's groups | KL |", "|---:|---|---:|---|---:|"]
    for row in rows:
        lines.append(f"| {row.steps} | {row.groups_text} | {format_kl(row.fold.kl)} | "
                     f"{row.cosine_m_plan.groups_text} | {format_kl(row.cosine_m_plan.scores.kl)} |")
    return lines
