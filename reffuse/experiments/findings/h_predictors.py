"""(h) Which predictor ranks fusion damage: every contiguous group of the span fused alone, its KL on calibration text
against the predictors of reffuse.method.predictors (cosine-M with and without the sink, neighbour damage, block
influence, angular distance, the first-order error term), by rank correlation; and, without the adjacent pairs
(whose neighbour damage is their damage), each predictor's lead over the groups' size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from reffuse.evaluation.prefix import cache_prefix
from reffuse.experiments.findings.rules import Verdict, decide
from reffuse.experiments.study import Study, format_correlation, format_interval
from reffuse.method.predictors import (PREDICTORS, GroupPrediction, RankCorrelation, candidate_groups, compare,
                                       damage, predictor_values)
from reffuse.progress import Progress
from reffuse.stats import RankLead, spearman, spearman_interval, spearman_lead, verdict

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult


PREDICTOR_TOKENS = 1024  # calibration tokens the groups' damage and the stream predictors are measured on


@dataclass(frozen=True)
class PredictorComparison:
    """Every contiguous group of the span fused alone, its damage and each predictor's value, and each
    predictor's rank correlation with the damage over all the groups (predictor name -> correlation)."""
    tokens: int                     # calibration tokens measured
    predictors: list[str]
    groups: list[GroupPrediction]
    correlations: dict[str, RankCorrelation]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "predictors": self.predictors, "groups": [g.to_json() for g in self.groups],
                "correlations": {name: c.to_json() for name, c in self.correlations.items()}}

    @classmethod
    def from_json(cls, raw: dict) -> PredictorComparison:
        return cls(raw["tokens"], raw["predictors"], [GroupPrediction.from_json(g) for g in raw["groups"]],
                   {name: RankCorrelation.from_json(c) for name, c in raw["correlations"].items()})


@dataclass(frozen=True)
class AgainstSize:
    """A rank correlation with the damage of the groups of three or more blocks, and, for a predictor, its lead
    over the groups' size with the paired interval (None for the size itself)."""
    correlation: RankCorrelation
    lead: RankLead | None = None

    def to_json(self) -> dict:
        if self.lead is None:
            return self.correlation.to_json()
        return self.correlation.to_json() | {"lead_over_size": self.lead.lead,
                                             "lead_interval_95": self.lead.interval_95}

    @classmethod
    def from_json(cls, raw: dict) -> AgainstSize:
        return cls(RankCorrelation.from_json(raw),
                   RankLead(raw["lead_over_size"], raw["lead_interval_95"]) if "lead_over_size" in raw else None)


@dataclass(frozen=True)
class PredictorsAgainstSize:
    """(h)'s comparison without the adjacent pairs: how many groups are left and left out, and for the groups'
    size and each predictor its AgainstSize (None where fewer than 3 groups are left)."""
    groups: int
    left_out: int
    correlations: dict[str, AgainstSize] | None   # "group size" first, then the predictors

    def to_json(self) -> dict:
        return {"groups": self.groups, "left_out": self.left_out,
                "correlations": None if self.correlations is None else
                {name: c.to_json() for name, c in self.correlations.items()}}

    @classmethod
    def from_json(cls, raw: dict) -> PredictorsAgainstSize:
        table = raw["correlations"]
        return cls(raw["groups"], raw["left_out"],
                   None if table is None else {name: AgainstSize.from_json(c) for name, c in table.items()})


def predictor_comparison(study: Study) -> PredictorComparison:
    """Every contiguous group of the span fused alone: its damage (KL on calibration text, never held-out, since a
    planner may use the result) against each predictor of reffuse.method.predictors, and their rank correlations
    with bootstrap intervals over the groups."""
    windows = study.texts.scoring(PREDICTOR_TOKENS, min(study.window, 128))
    prefix = cache_prefix(study.pre, windows)
    groups = candidate_groups(*study.span)
    with Progress("predictors of fusion damage", 1, "passes") as bar:
        measured = damage(study.pre, prefix, groups)
        values = predictor_values(study.pre, prefix, study.ffn_dependency, study.first_token_dependency, groups,
                                  measured)
        bar.update()
    return PredictorComparison(int(sum(len(w) for w in windows)), list(PREDICTORS),
                               [GroupPrediction(g, measured[g], values[g]) for g in groups],
                               compare(values, measured))


def own_measurement(group) -> bool:
    """An adjacent pair: its neighbour damage (reffuse.method.predictors) is its measured damage itself, so it
    cannot test a predictor."""
    return group[1] - group[0] == 1


def predictors_against_size(p: PredictorComparison) -> PredictorsAgainstSize:
    """(h)'s comparison from the recorded groups: the groups of three or more blocks, each predictor's rank
    correlation with their damage and bootstrap interval over them, beside the groups' size (blocks fused) as a
    baseline, and each predictor's lead over that baseline with its paired interval (reffuse.stats.spearman_lead)."""
    groups = [g for g in p.groups if not own_measurement(g.group)]
    if len(groups) < 3:  # no rank correlation to compare
        return PredictorsAgainstSize(len(groups), len(p.groups) - len(groups), None)
    damages = [g.damage for g in groups]
    size = [g.group[1] - g.group[0] + 1 for g in groups]
    table = {"group size": AgainstSize(RankCorrelation(spearman(size, damages), spearman_interval(size, damages)))}
    for name in p.predictors:
        values = [g.values[name] for g in groups]
        table[name] = AgainstSize(RankCorrelation(spearman(values, damages), spearman_interval(values, damages)),
                                  spearman_lead([values], [size], [damages]))
    return PredictorsAgainstSize(len(groups), len(p.groups) - len(groups), table)


def judge(r: StudyResult) -> Verdict:
    if r.predictors is None:
        return Verdict("h", "which predictor ranks fusion damage", paper="see the paper's §3", here="not measured",
                       rule="-", verdict="not measured")
    p = r.predictors
    compared = predictors_against_size(p)
    table = compared.correlations
    if table is None:
        return Verdict("h", "which predictor ranks fusion damage", paper="see the paper's §3",
                       here=f"{compared.groups} groups of three or more blocks: too few to rank", rule="-",
                       verdict="not measured")
    lead = table["cosine-M"].lead.interval_95
    beats = [name for name in p.predictors if verdict(table[name].lead.interval_95, 0.0, ">") == "met"]
    as_run = "; ".join(f"{name} {format_correlation(c.spearman)} {format_interval(c.interval_95)}"
                       for name, c in p.correlations.items())
    size = table["group size"].correlation
    return Verdict(
        "h", "which predictor ranks fusion damage",
        paper="the paper chooses what to fuse by its block dependency metric (cosine distance, its §3): groups with "
              "little dependency left inside fuse with little damage",
        here=f"Spearman rank correlation with the damage of each of the {compared.groups} contiguous groups of "
             f"three or more blocks of the span, fused alone ({p.tokens} calibration tokens; the "
             f"{compared.left_out} adjacent pairs left out, their neighbour damage being their damage), 95% "
             "bootstrap interval over groups, and the lead over the groups' size: group size "
             f"{format_correlation(size.spearman)} {format_interval(size.interval_95)}; "
             + "; ".join(f"{name} {format_correlation(table[name].correlation.spearman)} "
                         f"{format_interval(table[name].correlation.interval_95)}, lead "
                         f"{format_correlation(table[name].lead.lead)} "
                         f"{format_interval(table[name].lead.interval_95)}" for name in p.predictors)
             + f". Over all {len(p.groups)} groups, pairs included (the rule as first written): {as_run}",
        rule="held if cosine-M ranks the groups' damage better than their size does, its lead over group size "
             "resolved above 0 (paired bootstrap over the groups of three or more blocks); did not hold if that "
             "lead is resolved below 0; else not resolved",
        verdict=decide(verdict(lead, 0.0, ">") == "met", False, verdict(lead, 0.0, "<") == "met"),
        note="predictors that rank the damage better than group size, resolved: "
             + (", ".join(beats) if beats else "none"))


def section(r: StudyResult) -> list[str]:
    """Each predictor's rank correlation with the damage over all groups, then without the pairs, against size."""
    if r.predictors is None:
        return []
    p = r.predictors
    lines = ["", "## (h) Which predictor ranks fusion damage", "",
             f"Each of the {len(p.groups)} contiguous groups of the span fused alone, its KL to the pre-fusion "
             f"model on {p.tokens} calibration tokens, against what each predictor says from the pre-fusion "
             "model alone (reffuse.method.predictors):", "",
             "| predictor | Spearman with the damage | 95% interval (bootstrap over groups) |", "|---|---:|---|"]
    for name, c in p.correlations.items():
        interval = "-" if c.interval_95 is None else f"{c.interval_95[0]:+.2f} to {c.interval_95[1]:+.2f}"
        lines.append(f"| {name} | {format_correlation(c.spearman)} | {interval} |")
    return lines + against_size_lines(predictors_against_size(p))


def against_size_lines(compared: PredictorsAgainstSize) -> list[str]:
    """(h) without the adjacent pairs, each predictor against the groups' size (predictors_against_size)."""
    table = compared.correlations
    if table is None:
        return []
    lines = ["", f"The {compared.left_out} adjacent pairs among these groups cannot test the neighbour damage: a "
                 "pair's neighbour damage is its measured damage. And a predictor that only tracks how many blocks a "
                 "group fuses adds nothing: the groups' size is the baseline. Without the "
                 f"pairs ({compared.groups} groups of three or more blocks), each predictor beside the groups' "
                 "size, and its lead over size (paired bootstrap over the groups): a predictor adds information "
                 "only where that lead is resolved above 0.", "",
             "| predictor | Spearman with the damage | 95% interval | lead over group size | 95% interval |",
             "|---|---:|---|---:|---|"]
    for name, c in table.items():
        lead = ("- | -" if c.lead is None else
                f"{format_correlation(c.lead.lead)} | {format_interval(c.lead.interval_95)}")
        lines.append(f"| {name} | {format_correlation(c.correlation.spearman)} | "
                     f"{format_interval(c.correlation.interval_95)} | {lead} |")
    return lines
