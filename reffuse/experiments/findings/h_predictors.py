"""(h) Which predictor ranks fusion damage: every contiguous group of the span fused alone, its KL on calibration text
against the predictors of reffuse.method.predictors (cosine-M with and without the sink, neighbour damage, block
influence, angular distance, the first-order error term), by rank correlation; and, without the adjacent pairs
(whose neighbour damage is their damage), each predictor's lead over the groups' size.
"""

from __future__ import annotations

from reffuse.evaluation.prefix import cache_prefix
from reffuse.experiments.findings.rules import Verdict, decide
from reffuse.experiments.study import Study, format_correlation, format_interval
from reffuse.method.predictors import PREDICTORS, candidate_groups, compare, damage, predictor_values
from reffuse.progress import Progress
from reffuse.stats import spearman, spearman_interval, spearman_lead, verdict


PREDICTOR_TOKENS = 1024  # calibration tokens the groups' damage and the stream predictors are measured on


def predictor_comparison(study: Study) -> dict:
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
    return {"tokens": int(sum(len(w) for w in windows)), "predictors": list(PREDICTORS),
            "groups": [{"group": list(g), "damage": measured[g], **values[g]} for g in groups],
            "correlations": compare(values, measured)}


def own_measurement(group) -> bool:
    """An adjacent pair: its neighbour damage (reffuse.method.predictors) is its measured damage itself, so it
    cannot test a predictor."""
    return group[1] - group[0] == 1


def predictors_against_size(p: dict) -> dict:
    """(h)'s comparison from the recorded groups (r["predictors"]): the groups of three or more blocks, each
    predictor's rank correlation with their damage and bootstrap interval over them, beside the groups' size
    (blocks fused) as a baseline, and each predictor's lead over that baseline with its paired interval
    (reffuse.stats.spearman_lead)."""
    groups = [g for g in p["groups"] if not own_measurement(g["group"])]
    if len(groups) < 3:  # no rank correlation to compare
        return {"groups": len(groups), "left_out": len(p["groups"]) - len(groups), "correlations": None}
    damage = [g["damage"] for g in groups]
    size = [g["group"][1] - g["group"][0] + 1 for g in groups]
    table = {"group size": {"spearman": spearman(size, damage), "interval_95": spearman_interval(size, damage)}}
    for name in p["predictors"]:
        values = [g[name] for g in groups]
        lead = spearman_lead([values], [size], [damage])
        table[name] = {"spearman": spearman(values, damage), "interval_95": spearman_interval(values, damage),
                       "lead_over_size": lead["lead"], "lead_interval_95": lead["interval_95"]}
    return {"groups": len(groups), "left_out": len(p["groups"]) - len(groups), "correlations": table}


def judge(r: dict) -> Verdict:
    if "predictors" not in r:
        return Verdict("h", "which predictor ranks fusion damage", paper="see the paper's §3", here="not measured",
                       rule="-", verdict="not measured")
    p = r["predictors"]
    compared = predictors_against_size(p)
    table = compared["correlations"]
    if table is None:
        return Verdict("h", "which predictor ranks fusion damage", paper="see the paper's §3",
                       here=f"{compared['groups']} groups of three or more blocks: too few to rank", rule="-",
                       verdict="not measured")
    lead = table["cosine-M"]["lead_interval_95"]
    beats = [name for name in p["predictors"] if verdict(table[name]["lead_interval_95"], 0.0, ">") == "met"]
    as_run = "; ".join(f"{name} {format_correlation(c['spearman'])} {format_interval(c['interval_95'])}"
                       for name, c in p["correlations"].items())
    return Verdict(
        "h", "which predictor ranks fusion damage",
        paper="the paper chooses what to fuse by its block dependency metric (cosine distance, its §3): groups with "
              "little dependency left inside fuse with little damage",
        here=f"Spearman rank correlation with the damage of each of the {compared['groups']} contiguous groups of "
             f"three or more blocks of the span, fused alone ({p['tokens']} calibration tokens; the "
             f"{compared['left_out']} adjacent pairs left out, their neighbour damage being their damage), 95% "
             "bootstrap interval over groups, and the lead over the groups' size: group size "
             f"{format_correlation(table['group size']['spearman'])} "
             f"{format_interval(table['group size']['interval_95'])}; "
             + "; ".join(f"{name} {format_correlation(table[name]['spearman'])} "
                         f"{format_interval(table[name]['interval_95'])}, lead "
                         f"{format_correlation(table[name]['lead_over_size'])} "
                         f"{format_interval(table[name]['lead_interval_95'])}" for name in p["predictors"])
             + f". Over all {len(p['groups'])} groups, pairs included (the rule as first written): {as_run}",
        rule="held if cosine-M ranks the groups' damage better than their size does, its lead over group size "
             "resolved above 0 (paired bootstrap over the groups of three or more blocks); did not hold if that "
             "lead is resolved below 0; else not resolved",
        verdict=decide(verdict(lead, 0.0, ">") == "met", False, verdict(lead, 0.0, "<") == "met"),
        note="predictors that rank the damage better than group size, resolved: "
             + (", ".join(beats) if beats else "none"))


def section(r: dict) -> list[str]:
    """Each predictor's rank correlation with the damage over all groups, then without the pairs, against size."""
    if "predictors" not in r:
        return []
    p = r["predictors"]
    lines = ["", "## (h) Which predictor ranks fusion damage", "",
             f"Each of the {len(p['groups'])} contiguous groups of the span fused alone, its KL to the pre-fusion "
             f"model on {p['tokens']} calibration tokens, against what each predictor says from the pre-fusion "
             "model alone (reffuse.method.predictors):", "",
             "| predictor | Spearman with the damage | 95% interval (bootstrap over groups) |", "|---|---:|---|"]
    for name, c in p["correlations"].items():
        interval = "-" if c["interval_95"] is None else f"{c['interval_95'][0]:+.2f} to {c['interval_95'][1]:+.2f}"
        lines.append(f"| {name} | {format_correlation(c['spearman'])} | {interval} |")
    return lines + against_size_lines(predictors_against_size(p))


def against_size_lines(compared: dict) -> list[str]:
    """(h) without the adjacent pairs, each predictor against the groups' size (predictors_against_size)."""
    table = compared["correlations"]
    if table is None:
        return []
    lines = ["", f"The {compared['left_out']} adjacent pairs among these groups cannot test the neighbour damage: a "
                 "pair's neighbour damage is its measured damage. And a predictor that only tracks how many blocks a "
                 "group fuses adds nothing: the groups' size is the baseline. Without the "
                 f"pairs ({compared['groups']} groups of three or more blocks), each predictor beside the groups' "
                 "size, and its lead over size (paired bootstrap over the groups): a predictor adds information "
                 "only where that lead is resolved above 0.", "",
             "| predictor | Spearman with the damage | 95% interval | lead over group size | 95% interval |",
             "|---|---:|---|---:|---|"]
    for name, c in table.items():
        lead = (f"{format_correlation(c['lead_over_size'])} | {format_interval(c['lead_interval_95'])}"
                if "lead_over_size" in c else "- | -")
        lines.append(f"| {name} | {format_correlation(c['spearman'])} | {format_interval(c['interval_95'])} | "
                     f"{lead} |")
    return lines
