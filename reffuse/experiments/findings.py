"""The findings (a)-(k) of `reffuse experiments`, each as the function that measures it on a Study and, beside
it, the rule that turns the measurement into a verdict against the paper's observation.

A measurement returns the JSON-ready value stored under its key of the run's result; a rule reads only that
result (so it can be re-applied to a committed run) and returns a Verdict: "held", "partly held", "did not
hold", "not resolved" or "not measured".

Every comparison a rule makes is a paired difference over the same held-out predictions
(reffuse.stats.paired_difference): its mean, a 95% interval over windows and one over token blocks, and the sign
count. A difference counts for a verdict only when it is resolved (both intervals exclude 0); where the rule's
comparisons are not resolved the verdict says so. Whether an interval lies on a side of a threshold is decided by
reffuse.stats.verdict. The rules were fixed before the run that applies them; the report names the commit they
come from. A rule revised after a run's results were seen is listed in REVISIONS with its date, and a run judged
again by it (`reffuse experiments --report-only`) keeps the verdicts it recorded beside the new ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.core.layout import format_groups, full_blocks
from reffuse.evaluation.intervals import describe
from reffuse.evaluation.prefix import cache_prefix, score_variant, sink_restored
from reffuse.method.calibrate import (DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS, calibrated_fuse, calibrated_removal,
                                      collect, fused_index)
from reffuse.method.predictors import PREDICTORS, candidate_groups, compare, damage, predictor_values
from reffuse.method.metrics import block_evaluations_needed, dependency, greedy_windows, matrix_to_json, \
    window_statistics
from reffuse.method.removal import cheapest, drop_ffns, ffn_scores
from reffuse.progress import Progress
from reffuse.speed.bench import decode_samples, prompt_ids, reffuse_decode
from reffuse.speed.costmodel.calibration import get_hardware
from reffuse.speed.costmodel.latency import forward_cost, tensor_parallel_degrees
from reffuse.speed.costmodel.presets import layout_from_model
from reffuse.stats import MIN_BOOTSTRAP_WINDOWS, paired_difference, spearman, spearman_interval, \
    spearman_lead, verdict
from reffuse.experiments.study import (MAX_STEPS, WINDOW, Study, format_correlation, format_kl, format_perplexity,
                                       fused_name, removed_name, reversed_run)

RIDGE_SWEEP = (0.1, 1.0, 10.0)

# The rules revised after a review of runs already made, newest last: the date, the findings whose verdicts the
# change can move ("all" for every comparison), and what changed. A report of a run made under earlier rules lists
# the revisions dated after them.
REVISIONS = (
    {"date": "2026-12-05", "findings": "all",
     "change": f"an interval over fewer than {MIN_BOOTSTRAP_WINDOWS} held-out windows is a t-interval over the "
               "windows' own means, no longer a percentile bootstrap over windows (which covers less than 95% with "
               "so few: about 90% with 8)"},
    {"date": "2026-12-05", "findings": "h",
     "change": "the adjacent pairs are left out of every predictor's rank correlation (a pair's neighbour damage is "
               "its measured damage itself), and cosine-M counts only where it ranks the damage better than the "
               "groups' size does (was: its rank correlation over all groups above 0)"},
    {"date": "2026-12-05", "findings": "e",
     "change": "the rank correlation of M_max with the damage of the single windows is given with its bootstrap "
               "interval (a note; the verdict is unchanged)"},
)


@dataclass
class Verdict:
    finding: str
    title: str
    paper: str      # what the paper observed
    here: str       # what was measured here
    rule: str       # what decides
    verdict: str
    note: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def decide(ok: bool, partly: bool = False, against: bool = True) -> str:
    """held / partly held; else "did not hold" when the data resolve against the paper, "not resolved" when not."""
    return "held" if ok else "partly held" if partly else "did not hold" if against else "not resolved"


def decide_lower(diffs: list[dict], also_partly: bool = False) -> str:
    """The rule most findings share, for differences x - y where the paper expects x lower: held if every one is
    resolved lower; partly if some are (or `also_partly`) and none is resolved higher; did not hold if some are
    resolved higher and none lower; else not resolved."""
    some_lower, some_higher = any(lower(d) for d in diffs), any(higher(d) for d in diffs)
    return decide(all(lower(d) for d in diffs), (some_lower or also_partly) and not some_higher,
                  some_higher and not some_lower)


def difference(x: dict, y: dict, measure: str = "kl", y_scale: float = 1.0) -> dict:
    """The paired difference x - y_scale·y of two scored variants' per-prediction `measure` (kl or nll)."""
    return paired_difference(x["per_token"][measure], [np.asarray(w) * y_scale for w in y["per_token"][measure]])


def lower(d: dict) -> bool:
    """x resolved below y."""
    return d["resolved"] and d["mean"] < 0


def higher(d: dict) -> bool:
    """x resolved above y."""
    return d["resolved"] and d["mean"] > 0


def by_steps(r: dict) -> list[dict]:
    """The rows of finding (a), most steps first."""
    return sorted(r["intensity"], key=lambda row: -row["steps"])


# ---------------------------------------------------------------------------------------------------------------
# (a) fusion intensity and (f) fold vs last: the span into k groups, k = ceil(L/2) .. 1, both norms


def fusion_intensity(study: Study) -> list[dict]:
    """Every plan of the planner with both norms; where cosine-M cuts the span differently, its plan too (for
    finding (k))."""
    a = study.span[0]
    rows = []
    with Progress("fusion variants", 2 * len(study.counts), "models") as bar:
        for k in study.counts:
            groups = study.plans[k]
            row = {"steps": k, "groups": [list(g) for g in groups], "groups_text": format_groups(groups),
                   "depth_reduction": study.length - k}
            for norm in ("fold", "last"):
                row[norm] = study.scores(fuse(study.pre, groups, norm=norm), a)
                bar.update()
            cosine = study.cosine_plans[k]
            if cosine != groups:
                row["cosine_m_plan"] = {"groups": [list(g) for g in cosine], "groups_text": format_groups(cosine),
                                        **study.scores(fuse(study.pre, cosine), a)}
            rows.append(row)
    return rows


def planner_verdict(r: dict) -> Verdict | None:
    if "plan_costs" not in r:
        return None
    rows = [row for row in by_steps(r) if "cosine_m_plan" in row]
    planner = r["plan_costs"]["predictor"]
    if not rows:
        return Verdict("k", "the planner's predictor on held-out text", paper="the paper plans with cosine-M (§3)",
                       here=f"{planner} and cosine-M cut the span the same way at every k", rule="-",
                       verdict="not measured")
    diffs = [difference(row["fold"], row["cosine_m_plan"]) for row in rows]
    return Verdict(
        "k", "the planner's predictor on held-out text",
        paper="the paper cuts runs by its block dependency metric, cosine-M (§3); reffuse's planner uses the "
              f"{planner}, chosen on the calibration-text damage of four regions (reffuse.method.predictors)",
        here="; ".join(f"{row['steps']} steps: {planner} plan {row['groups_text']} KL {format_kl(row['fold']['kl'])}, "
                       f"cosine-M plan {row['cosine_m_plan']['groups_text']} KL "
                       f"{format_kl(row['cosine_m_plan']['kl'])}, difference {describe(d)}"
                       for row, d in zip(rows, diffs)),
        rule=f"our addition, at every k where the two plans differ: held if the {planner} plan has the resolved "
             "lower KL at each; partly if at some and resolved higher at none; did not hold if resolved higher at "
             "some and lower at none; else not resolved",
        verdict=decide_lower(diffs))


def intensity_verdict(r: dict) -> Verdict:
    rows = by_steps(r)
    sink = r["sink"]["pre_fusion_norms"][r["sink"]["layer"]]
    rises = [difference(after["fold"], before["fold"]) for before, after in zip(rows, rows[1:])]
    overall = difference(rows[-1]["fold"], rows[0]["fold"])
    return Verdict(
        "a", "fusion intensity",
        paper="Puzzle-49B, 26 FFNs fused into 12/6/3/2: accuracy falls gradually, about 1% at 12 and about 4% at 2 "
              "(84.71 -> 83.92 -> 82.84 -> 81.69 -> 81.24)",
        here="KL to the pre-fusion model " + ", ".join(f"{row['steps']} steps {format_kl(row['fold']['kl'])}"
                                                       for row in rows)
             + "; perplexity " + ", ".join(format_perplexity(row["fold"]["perplexity"]) for row in rows)
             + f" (pre-fusion {format_perplexity(r['pre_fusion']['perplexity'])}). Each step to fewer groups, KL "
               "after - before: " + "; ".join(f"{before['steps']} -> {after['steps']}: {describe(d)}"
                                             for before, after, d in zip(rows, rows[1:], rises))
             + f"; {rows[0]['steps']} -> {rows[-1]['steps']}: {describe(overall)}. The first token's norm leaving "
               f"the run " + ", ".join(f"{row['fold']['sink_norm']:.0f}" for row in rows) + f" (pre-fusion {sink:.0f})",
        rule="held if every step to fewer groups raises the KL, each rise resolved; partly if the fewest groups "
             "against the most is a resolved rise; did not hold if that is a resolved fall; else not resolved",
        verdict=decide(all(higher(d) for d in rises), higher(overall), lower(overall)))


def fold_vs_last_verdict(r: dict) -> Verdict:
    rows = by_steps(r)
    diffs = [difference(row["fold"], row["last"]) for row in rows]
    return Verdict(
        "f", "fold vs last norm",
        paper="the paper feeds every fused FFN the last block's norm (its §3) and does not ablate it; folding each "
              "block's gain into its weights is exact for the parallel form [INF]",
        here="; ".join(f"{row['steps']} steps: fold KL {format_kl(row['fold']['kl'])}, last "
                       f"{format_kl(row['last']['kl'])}, fold - last {describe(d)}" for row, d in zip(rows, diffs)),
        rule="not a test of the paper: held if fold is resolved better at every k; partly if at some k and "
             "resolved worse at none; did not hold if last is resolved better at some k and fold at none; else "
             "not resolved",
        verdict=decide_lower(diffs))


# ---------------------------------------------------------------------------------------------------------------
# (g) calibrated vs plain fusion at every k of (a)


def calibration(study: Study, intensity: list[dict]) -> dict:
    """Token weighting and ridge chosen by a sweep judged on a validation part of the calibration text (never
    on held-out text), then every plan of (a) refitted on all of it and scored; adds "calibrated" and
    "calibration_fits" to each row of `intensity`."""
    a, pre, counts = study.span[0], study.pre, study.counts
    calibration_ids = study.texts.calibration.ids
    fit_windows, validation_windows = calibration_ids[:-2], calibration_ids[-2:]
    validation = cache_prefix(pre, validation_windows)
    plain_validation = {k: score_variant(validation, fuse(pre, study.plans[k]), a, kl_only=True)["kl_from_base"]
                        for k in counts}
    sweep = []
    with Progress("calibration sweep", len(WEIGHTINGS) * len(RIDGE_SWEEP) * len(counts), "fits") as bar:
        for weighting in WEIGHTINGS:
            for ridge in RIDGE_SWEEP:
                ratios = {}
                for k in counts:
                    calibrated, _ = calibrated_fuse(pre, study.plans[k], fit_windows, ridge=ridge, weighting=weighting)
                    ratios[k] = score_variant(validation, calibrated, a, kl_only=True)["kl_from_base"] / \
                        plain_validation[k]
                    bar.update()
                sweep.append({"weighting": weighting, "ridge": ridge,
                              "kl_ratio": {str(k): v for k, v in ratios.items()},
                              "geometric_mean_ratio": float(np.exp(np.mean(np.log(list(ratios.values())))))})
    best = min(sweep, key=lambda r: r["geometric_mean_ratio"])
    with Progress("calibrated variants", len(counts), "models") as bar:
        for row in intensity:
            calibrated, fits = calibrated_fuse(pre, [tuple(g) for g in row["groups"]], calibration_ids,
                                               ridge=best["ridge"], weighting=best["weighting"])
            row["calibrated"] = study.scores(calibrated, a)
            row["calibration_fits"] = [f.as_dict() for f in fits]
            bar.update()
    return {"sweep": sweep, "plain_validation_kl": {str(k): v for k, v in plain_validation.items()},
            "ridge": best["ridge"], "weighting": best["weighting"], "default_ridge": DEFAULT_RIDGE,
            "default_weighting": DEFAULT_WEIGHTING, "fit_tokens": int(fit_windows.size),
            "validation_tokens": int(validation_windows.size), "tokens": int(calibration_ids.size)}


def calibration_verdict(r: dict) -> Verdict:
    rows = by_steps(r)
    closed = [1 - row["calibrated"]["kl"] / row["fold"]["kl"] for row in rows]
    kl = [difference(row["calibrated"], row["fold"]) for row in rows]
    nll = [difference(row["calibrated"], row["fold"], "nll") for row in rows]
    worse = [row["steps"] for row, d in zip(rows, nll) if higher(d)]
    return Verdict(
        "g", "calibrated vs plain fusion",
        paper="not in the paper: it recovers fused models by knowledge distillation on billions of tokens (Step 3 "
              "+ KD beats the baseline: 85.28 vs 84.71)",
        here="; ".join(f"{row['steps']} steps: plain KL {format_kl(row['fold']['kl'])} -> calibrated "
                       f"{format_kl(row['calibrated']['kl'])} ({100 * c:.0f}% of the gap closed; calibrated - plain "
                       f"{describe(d)}), perplexity {format_perplexity(row['fold']['perplexity'])} -> "
                       f"{format_perplexity(row['calibrated']['perplexity'])}"
                       for row, c, d in zip(rows, closed, kl))
             + f"; weighting {r['calibration']['weighting']}, ridge {r['calibration']['ridge']:g}, chosen on "
               "validation calibration text",
        rule="our addition: held if calibration lowers the held-out KL at every k, each resolved; partly if at some "
             "k and raises it at none; did not hold if it raises it, resolved, at some k and lowers it at none; "
             "else not resolved. Where the calibrated perplexity is resolved higher, the note says so",
        verdict=decide_lower(kl),
        note=(f"calibration raised the held-out negative log-likelihood, resolved, at k = {', '.join(map(str, worse))}"
              if worse else "calibration raised the held-out negative log-likelihood, resolved, at no k"))


# ---------------------------------------------------------------------------------------------------------------
# (j) calibration at scale: more calibration text, residuals on held-out text


def scale_plans(study: Study) -> list[int]:
    """The plans of the scale study: the most steps and one step (the narrowest and the widest groups)."""
    return sorted({max(study.counts), min(study.counts)}, reverse=True)


def held_out_residual(study: Study, groups, fused, weighting: str) -> list[dict]:
    """For each group: the relative residual ||H W^T - R||² / ||R||² of the plain and the calibrated
    down-projection on the held-out streams entering the group in the pre-fusion model."""
    plain = fuse(study.pre, groups)
    rows = []
    for group in groups:
        index = fused_index(groups, group)
        w0, w = plain.blocks[index].ffn.down, fused.blocks[index].ffn.down
        errors, energy = np.zeros(2), 0.0
        for window in study.prefix.streams:
            h, target = collect(study.pre, group, plain.blocks[index].ffn, window[group[0]], weighting=weighting)
            energy += float(np.sum(target * target))
            errors += [float(np.sum((h @ np.asarray(down, dtype=np.float64).T - target) ** 2)) for down in (w0, w)]
        rows.append({"group": list(group), "plain": errors[0] / energy, "calibrated": errors[1] / energy})
    return rows


def calibration_scale(study: Study, chosen: dict, sizes) -> dict:
    """The plans of scale_plans calibrated on the first n calibration tokens for every n of `sizes`, with the
    weighting and ridge of (g): held-out scores, and each group's residual on its own calibration tokens and on
    held-out text."""
    a = study.span[0]
    text = study.texts.calibration_tokens(max(sizes))
    rows = []
    with Progress("calibration at scale", len(sizes) * len(scale_plans(study)), "fits") as bar:
        for k in scale_plans(study):
            for n in sizes:
                windows = text.ids[:n // text.window]
                calibrated, fits = calibrated_fuse(study.pre, study.plans[k], windows, ridge=chosen["ridge"],
                                                   weighting=chosen["weighting"])
                rows.append({"steps": k, "tokens": int(windows.size), **study.scores(calibrated, a),
                             "fits": [f.as_dict() for f in fits],
                             "held_out_residual": held_out_residual(study, study.plans[k], calibrated,
                                                                    chosen["weighting"])})
                bar.update()
    return {"sizes": [int(n) for n in sizes], "ridge": chosen["ridge"], "weighting": chosen["weighting"],
            "text": text.describe(), "rows": rows}


def calibration_scale_verdict(r: dict) -> Verdict | None:
    if "calibration_scale" not in r:
        return None
    scale = r["calibration_scale"]
    plain = {row["steps"]: row["fold"] for row in r["intensity"]}
    here, more_helps, worse_nll = [], [], []
    for k in sorted({row["steps"] for row in scale["rows"]}, reverse=True):
        rows = sorted((row for row in scale["rows"] if row["steps"] == k), key=lambda row: row["tokens"])
        gain = difference(rows[-1], rows[0])
        more_helps.append(gain)
        parts = []
        for row in rows:
            nll = difference(row, plain[k], "nll")
            if higher(nll):
                worse_nll.append(f"{k} steps at {row['tokens']} tokens")
            fit = np.mean([f["fit_error_calibrated"] for f in row["fits"]])
            held = np.mean([g["calibrated"] for g in row["held_out_residual"]])
            parts.append(f"{row['tokens']} tokens KL {format_kl(row['kl'])}, perplexity "
                         f"{format_perplexity(row['perplexity'])} (plain {format_perplexity(plain[k]['perplexity'])}; "
                         f"calibrated - plain NLL {describe(nll)}), residual {fit:.3f} on its calibration tokens, "
                         f"{held:.3f} held-out")
        held_plain = np.mean([g["plain"] for g in rows[0]["held_out_residual"]])
        here.append(f"{k} steps (plain residual {held_plain:.3f} held-out): " + "; ".join(parts)
                    + f"; {rows[-1]['tokens']} - {rows[0]['tokens']} tokens: {describe(gain)}")
    return Verdict(
        "j", "calibration at scale",
        paper="not in the paper (it distils on billions of tokens)",
        here="; ".join(here) + f"; weighting {scale['weighting']}, ridge {scale['ridge']:g}",
        rule="our addition: held if the most calibration text gives a resolved lower KL than the least at every k "
             "studied; partly if at some k and resolved higher at none; did not hold if resolved higher at some k "
             "and lower at none; else not resolved. Every resolved rise of the held-out negative log-likelihood "
             "over plain fusion is named in the note",
        verdict=decide_lower(more_helps),
        note=("calibration raised the held-out negative log-likelihood over plain fusion, resolved, at "
              + ", ".join(worse_nll)) if worse_nll else
             "calibration raised the held-out negative log-likelihood over plain fusion, resolved, nowhere")


# ---------------------------------------------------------------------------------------------------------------
# (b) FFN removal vs fusion at equal depth reduction


def ffn_removal(study: Study, intensity: list[dict]) -> dict:
    """The L - k least important FFNs of the span removed (by the KL of removing each alone, on calibration
    text), for every depth reduction of `intensity`."""
    importance = ffn_scores(study.pre, study.texts.scoring(study.scoring_tokens, min(study.window, 128)),
                            layers=range(study.span[0], study.span[1] + 1))
    rows = []
    for row in intensity:
        dropped = cheapest(importance, row["depth_reduction"])
        rows.append({"depth_reduction": row["depth_reduction"], "removed": dropped,
                     **study.scores(drop_ffns(study.pre, dropped), study.span[0])})
    return {"ffn_scores": {str(k): v for k, v in importance.items()}, "rows": rows}


def removal_verdict(r: dict) -> Verdict:
    latency = r["decode"]
    base_ms = latency["pre-fusion"]["ms_per_token"]
    pairs = list(zip(r["intensity"], r["removal"]["rows"]))
    plain = [difference(row["fold"], removal) for row, removal in pairs]
    calibrated = [difference(row["calibrated"], removal) for row, removal in pairs]
    here = []
    for (row, removal), d, c in zip(pairs, plain, calibrated):
        fused_ms = latency[fused_name(row["steps"])]["ms_per_token"]
        removed_ms = latency[removed_name(removal["depth_reduction"])]["ms_per_token"]
        here.append(f"depth -{row['depth_reduction']}: fusion KL {format_kl(row['fold']['kl'])} (calibrated "
                    f"{format_kl(row['calibrated']['kl'])}), {100 * (fused_ms / base_ms - 1):+.1f}% decode latency; "
                    f"removal KL {format_kl(removal['kl'])}, {100 * (removed_ms / base_ms - 1):+.1f}%; fusion - "
                    f"removal {describe(d)}; calibrated fusion - removal {describe(c)}")
    return Verdict(
        "b", "FFN removal vs fusion",
        paper="at a similar latency, fusion keeps more accuracy than removal (fusion step 3: -10% latency, -3.5% "
              "accuracy; removing 15 FFNs: -7.5% latency, -5% accuracy; 20 FFNs: -11%, -8.7%)",
        here="; ".join(here),
        rule="at equal depth reduction (not the paper's equal latency): held if plain fusion has the resolved lower "
             "KL at every depth; partly if at some depth, or calibrated fusion at every depth, and removal is "
             "resolved lower at none; did not hold if removal is resolved lower at some depth and plain fusion at "
             "none; else not resolved. Latency is reported, not judged: a CPU decode of a 135M model is bound by "
             "reading weights, which fusion does not reduce",
        verdict=decide_lower(plain, also_partly=all(lower(c) for c in calibrated)),
        note=f"plain fusion resolved lower at {sum(map(lower, plain))} of {len(plain)} depths, removal at "
             f"{sum(map(higher, plain))}; calibrated fusion resolved lower at {sum(map(lower, calibrated))}")


# ---------------------------------------------------------------------------------------------------------------
# (i) FFN removal vs fusion at equal latency, removal refitted as fusion is


TP_HARDWARE = "h100-sxm-bf16"   # the cost model's GPU preset for the modelled tensor-parallel latency
TP_CONTEXT = 1024               # cached positions of the modelled decode step


def removal_counts(study: Study, removal: dict, chosen: dict) -> list[dict]:
    """Removing 1 .. L-1 FFNs of the span (the least important first, as in (b)), each plain and with the refit
    that calibrated fusion gets (reffuse.method.calibrate.calibrated_removal, the weighting and ridge of (g))."""
    importance = {int(k): v for k, v in removal["ffn_scores"].items()}
    a = study.span[0]
    rows = []
    with Progress("FFN removal, plain and refitted", study.length - 1, "models") as bar:
        for count in range(1, study.length):
            dropped = cheapest(importance, count)
            refit, fits = calibrated_removal(study.pre, study.span, dropped, study.texts.calibration.ids,
                                             ridge=chosen["ridge"], weighting=chosen["weighting"])
            rows.append({"removed_count": count, "removed": dropped,
                         "plain": study.scores(drop_ffns(study.pre, dropped), a),
                         "refit": study.scores(refit, a), "refit_fits": [f.as_dict() for f in fits]})
            bar.update()
    return rows


def modelled_latency(models: dict) -> dict:
    """Each model's decode step by the cost model (reffuse.speed.costmodel) on TP_HARDWARE, at the largest
    tensor-parallel degree up to 8 that every model's heads and widths allow, and at TP 1; milliseconds."""
    hw = get_hardware(TP_HARDWARE)
    layouts = {name: layout_from_model(model, fusion_groups=()) for name, model in models.items()}
    tp = max(set.intersection(*(set(tensor_parallel_degrees(layout, 8)) for layout in layouts.values())))
    return {"hardware": TP_HARDWARE, "tp": tp, "context": TP_CONTEXT,
            "ms": {name: 1e3 * forward_cost(layout, hw, tp, 1, TP_CONTEXT).seconds for name, layout in layouts.items()},
            "ms_tp1": {name: 1e3 * forward_cost(layout, hw, 1, 1, TP_CONTEXT).seconds
                       for name, layout in layouts.items()}}


def matched_removal(latency: dict, fused: str, counts) -> int:
    """The removal count whose latency (ms) is nearest the fused model's; a tie goes to fewer FFNs removed."""
    return min(counts, key=lambda c: (abs(latency[removed_name(c)] - latency[fused]), c))


def equal_latency_verdict(r: dict) -> Verdict | None:
    if "equal_latency" not in r:
        return None
    e = r["equal_latency"]
    rows = {row["removed_count"]: row for row in e["removal"]}
    modelled, cpu = e["modelled"]["ms"], {name: v["ms_per_token"] for name, v in r["decode"].items()}
    here, plain, calibrated = [], [], []
    for row in by_steps(r):
        name = fused_name(row["steps"])
        tp_match, cpu_match = matched_removal(modelled, name, rows), matched_removal(cpu, name, rows)
        d, c = difference(row["fold"], rows[tp_match]["plain"]), difference(row["calibrated"], rows[tp_match]["refit"])
        plain.append(d)
        calibrated.append(c)
        cpu_d = difference(row["fold"], rows[cpu_match]["plain"])
        here.append(f"{row['steps']} steps ({modelled[name]:.3f} ms modelled) against {tp_match} FFNs removed "
                    f"({modelled[removed_name(tp_match)]:.3f} ms): fusion - removal {describe(d)}, calibrated "
                    f"fusion - refitted removal {describe(c)}; on this CPU ({cpu[name]:.2f} ms) against {cpu_match} "
                    f"removed ({cpu[removed_name(cpu_match)]:.2f} ms): {describe(cpu_d)}")
    return Verdict(
        "i", "FFN removal vs fusion at equal latency",
        paper="at a similar latency, fusion keeps more accuracy than removal (fusion step 3: -10% latency, -3.5% "
              "accuracy; removing 15 FFNs: -7.5% latency, -5% accuracy)",
        here=f"latency of a decode step modelled on {e['modelled']['hardware']} at TP {e['modelled']['tp']} "
             f"(the largest degree up to 8 that every model's heads allow), context {e['modelled']['context']}; "
             "each fused model against the removal whose latency is nearest: " + "; ".join(here),
        rule="by the modelled latency: held if plain fusion has the resolved lower KL than its matched removal at "
             "every k; partly if at some k, or calibrated fusion against refitted removal at every k, and removal "
             "is resolved lower at none; did not hold if removal is resolved lower at some k and plain fusion at "
             "none; else not resolved. The CPU match is reported, not judged: there fusion saves no time",
        verdict=decide_lower(plain, also_partly=all(lower(c) for c in calibrated)),
        note=f"plain fusion resolved lower at {sum(map(lower, plain))} of {len(plain)} k, removal at "
             f"{sum(map(higher, plain))}; calibrated fusion resolved lower than refitted removal at "
             f"{sum(map(lower, calibrated))}, higher at {sum(map(higher, calibrated))}")


# ---------------------------------------------------------------------------------------------------------------
# (c) the last FFN of the run


LAST_FFN_CHOICES = ("leave out the last FFN", "leave out the first FFN", "the whole run, last FFN included")


def last_ffn(study: Study) -> list[dict]:
    """Fusing [a, b-1] vs [a+1, b] vs [a, b], one group each."""
    a, b = study.region
    groups = dict(zip(LAST_FFN_CHOICES, [(a, b - 1), (a + 1, b), (a, b)]))
    return [{"label": label, "group": list(group), **study.scores(fuse(study.pre, [group]), a)}
            for label, group in groups.items()]


def last_ffn_verdict(r: dict) -> Verdict:
    last = {row["label"]: row for row in r["last_ffn"]}
    left_out = last["leave out the last FFN"]
    versus = {label: difference(left_out, row) for label, row in last.items() if label != "leave out the last FFN"}
    whole = versus["the whole run, last FFN included"]
    return Verdict(
        "c", "the last FFN of a run",
        paper="including the run's last FFN hurts most (MT-Bench 8.25 -> 7.30 when layers 51 and 70 are included); "
              "shifting the group by one to include it is worse than leaving it out",
        here="; ".join(f"{row['label']} ({row['group'][0]}-{row['group'][1]}) KL {format_kl(row['kl'])}"
                       for row in r["last_ffn"])
             + "; leaving out the last FFN against "
             + "; ".join(f"{label}: {describe(d)}" for label, d in versus.items()),
        rule="held if leaving out the last FFN has a resolved lower KL than both other choices; partly if only "
             "than the whole run; did not hold if the whole run is resolved lower; else not resolved",
        verdict=decide(all(lower(d) for d in versus.values()), lower(whole), higher(whole)))


# ---------------------------------------------------------------------------------------------------------------
# (d) reversed order vs fusion


def reversed_order(study: Study) -> list[dict]:
    """The blocks of a span run sequentially in reverse order, against fusing them: the first and last spans of
    up to 4 blocks, and the whole span."""
    span = study.span
    half = min(4, study.length)
    rows = []
    for first, last in sorted({(span[0], span[0] + half - 1), (span[1] - half + 1, span[1]), span}):
        rows.append({"span": [first, last], "fused": study.scores(fuse(study.pre, [(first, last)]), first),
                     "reversed": study.scores(reversed_run(study.pre, first, last), first)})
    return rows


# (d)'s equivalence margin: "about as much" as the paper's 0.25 points of about 84 is 0.3%; at this scale a KL
# ratio is the proxy, and the margin is a fifth of the fused KL either way.
REVERSED_MARGIN = 0.2


def within_margin(d: dict, margin: float) -> bool:
    """Both intervals of the difference d lie within [-margin, +margin]: the two variants are equivalent."""
    return all(verdict(interval, -margin, ">=") == "met" and verdict(interval, margin, "<=") == "met"
               for interval in (d["windows_interval_95"], d["tokens_interval_95"]))


def beyond_margin(d: dict, margin: float) -> bool:
    """Both intervals of the difference d lie wholly beyond the margin on the side of its mean: the two variants
    differ by more than it."""
    side, threshold = (">", margin) if d["mean"] > 0 else ("<", -margin)
    return d["mean"] != 0 and all(verdict(interval, threshold, side) == "met"
                                  for interval in (d["windows_interval_95"], d["tokens_interval_95"]))


def reversed_verdict(r: dict) -> Verdict:
    diffs = [difference(row["reversed"], row["fused"]) for row in r["reversed"]]
    margins = [REVERSED_MARGIN * row["fused"]["kl"] for row in r["reversed"]]
    inside = [within_margin(d, m) for d, m in zip(diffs, margins)]
    outside = [beyond_margin(d, m) for d, m in zip(diffs, margins)]
    return Verdict(
        "d", "reversed order vs fusion",
        paper="running a span's FFNs in reverse order costs about as much as fusing them (combined accuracy within "
              "0.25 points, e.g. [42,49] 83.74 fused vs 83.52 reversed)",
        here="; ".join(f"{row['span'][0]}-{row['span'][1]}: fused KL {format_kl(row['fused']['kl'])}, reversed "
                       f"{format_kl(row['reversed']['kl'])}, reversed - fused {describe(d)} (margin ±{format_kl(m)}: "
                       + ("within it" if within else "beyond it" if beyond else "neither within it nor beyond it")
                       + ")" for row, d, m, within, beyond in zip(r["reversed"], diffs, margins, inside, outside)),
        rule=f"an equivalence test: held if, for every span, both intervals of reversed - fused lie within "
             f"±{REVERSED_MARGIN:.0%} of the fused KL; did not hold if for some span both lie wholly beyond it; "
             "partly if some spans are within; else not resolved",
        verdict=decide(all(inside), any(inside) and not any(outside), any(outside)))


# ---------------------------------------------------------------------------------------------------------------
# (e) full-block parallelization


def full_block(study: Study) -> dict:
    """The paper's greedy selection of windows of 4 blocks that have attention and an FFN, on the block-level
    dependency matrix of the pre-fusion model, 1 to 4 steps, each window run as x + Σ_j (f_j(x) - x); and every
    eligible window alone, to see whether M predicts the damage."""
    pre, prefix = study.pre, study.prefix
    eligible = full_blocks(pre)
    block_windows = study.texts.scoring(study.dependency_tokens, min(study.window, 64))
    with Progress("block-level dependencies", block_evaluations_needed(pre, len(block_windows), ("block",)),
                  "block evaluations") as bar:
        block_M = dependency(pre, list(block_windows), granularities=("block",), progress=bar.update).matrices["block"]
    steps = greedy_windows(block_M, WINDOW, eligible=eligible, max_steps=MAX_STEPS)
    rows = []
    for n in range(1, len(steps) + 1):
        chosen = [(s["first"], s["last"]) for s in steps[:n]]
        first = min(s for s, _ in chosen)
        scores = score_variant(prefix, pre, first, reference=study.original_prefix, parallel=chosen,
                               whole_blocks=True, per_token=True)
        rows.append({"steps": n, "windows": [list(w) for w in chosen], "windows_text": format_groups(chosen),
                     "kl": scores["kl_from_base"], "perplexity": scores["perplexity"],
                     "top1": scores["top1_agreement"], "kl_vs_original": scores["kl_from_reference"],
                     "per_token": scores["per_token"],
                     "sink_restored": sink_restored(prefix, pre, first, max(e for _, e in chosen) + 1, chosen,
                                                    whole_blocks=True)})
    scan = cache_prefix(pre, study.texts.held_out.ids[:2])  # the first two held-out windows
    candidates = [w for w in window_statistics(block_M, WINDOW)
                  if math.isfinite(w["max"]) and all(eligible[w["first"]:w["last"] + 1])]
    single = []
    with Progress("full-block windows one at a time", len(candidates), "windows") as bar:
        for w in candidates:
            first, last = w["first"], w["last"]
            kl = score_variant(scan, pre, first, kl_only=True, parallel=[(first, last)],
                               whole_blocks=True)["kl_from_base"]
            single.append({"first": first, "last": last, "max": w["max"], "sum": w["sum"], "kl": kl})
            bar.update()
    return {"window": WINDOW, "greedy": steps, "rows": rows, "matrix": matrix_to_json(block_M),
            "tokens": study.dependency_tokens, "eligible_blocks": [i for i, e in enumerate(eligible) if e],
            "single_windows": single, "single_window_tokens": int(study.texts.held_out.ids[:2].size),
            "rank_correlation_max_kl": spearman([w["max"] for w in single], [w["kl"] for w in single])}


def _prediction_note(full: dict) -> str:
    single = full["single_windows"]
    if not single:
        return ""
    best, worst = min(single, key=lambda w: w["kl"]), max(single, key=lambda w: w["kl"])
    rho = full["rank_correlation_max_kl"]
    if rho is None:
        return ""
    interval = spearman_interval([w["max"] for w in single], [w["kl"] for w in single])
    side = ("resolved above 0" if verdict(interval, 0.0, ">") == "met" else
            "resolved below 0" if verdict(interval, 0.0, "<") == "met" else
            "not resolved: the data do not say whether M_max ranks the damage")
    judged = f"{format_interval(interval)} (bootstrap over the windows), {side}"
    return (f"each of the {len(single)} eligible windows alone: KL from {format_kl(best['kl'])} ({best['first']}-"
            f"{best['last']}) to {format_kl(worst['kl'])} ({worst['first']}-{worst['last']}); rank correlation of "
            f"M_max with that KL {rho:.2f} {judged}")


def full_block_verdict(r: dict) -> Verdict:
    full = r["full_block"]["rows"]
    if not full:
        return Verdict("e", "full-block parallelization", paper="see the paper's App. B, Table 7",
                       here="no window of 4 consecutive blocks with attention and FFN exists", rule="-",
                       verdict="not measured")
    ffn_four = next((row["fused"] for row in r["reversed"] if row["span"][1] - row["span"][0] + 1 == WINDOW), None)
    collapse = difference(full[-1], full[1], y_scale=2.0) if len(full) >= 2 else None  # last - 2 x step 2
    harder = difference(full[0], ffn_four) if ffn_four is not None else None           # 1 window - 4 FFNs
    here = "; ".join(f"step {row['steps']} (+{row['windows_text'].split(',')[-1]}, M_max {step['max']:.3f}) KL "
                     f"{format_kl(row['kl'])}" for row, step in zip(full, r["full_block"]["greedy"]))
    if collapse is not None:
        here += f"; KL after the last step - 2 x after step 2: {describe(collapse)}"
    if harder is not None:
        here += (f"; one window of {WINDOW} whole blocks - fusing {WINDOW} attention-free FFNs (KL "
                 f"{format_kl(ffn_four['kl'])}): {describe(harder)}")
    cheap_start = collapse is not None and higher(collapse)
    return Verdict(
        "e", "full-block parallelization",
        paper="greedy windows of 4 whole blocks: the first two steps are cheap (MMLU 80.73 -> 80.51 -> 80.04), the "
              "third and fourth collapse (77.86, 56.12); whole blocks are harder to parallelize than FFNs",
        here=here,
        rule=f"held if the KL after the last step is resolved above twice the KL after step 2 (cheap first steps, "
             f"then a collapse) and one window of {WINDOW} whole blocks has a resolved higher KL than fusing {WINDOW} "
             f"attention-free FFNs; partly if one of the two holds; did not hold if the window of whole blocks is "
             f"resolved lower; else not resolved",
        verdict=decide(cheap_start and harder is not None and higher(harder),
                       cheap_start or (harder is not None and higher(harder)),
                       harder is not None and lower(harder)),
        note=_prediction_note(r["full_block"]))


# ---------------------------------------------------------------------------------------------------------------
# (h) which predictor ranks fusion damage


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


def format_interval(interval) -> str:
    """A rank correlation's interval as [low, high] with signs; "no interval" for None."""
    return "no interval" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def predictor_verdict(r: dict) -> Verdict:
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


# ---------------------------------------------------------------------------------------------------------------
# Decode latency of every model of (a) and (b), for (b)'s comparison


def decode_latency(study: Study, intensity: list[dict], removal_rows: list[dict], decode_tokens: int,
                   repeats: int, removal_counts: list[dict] = ()) -> dict:
    """Greedy decode of the original, the pre-fusion, every fused and every FFN-removed model (those of (b), and
    of (i) when given), timed in alternation in one run (reffuse.speed.bench.decode_samples): the median and
    the quartiles of the repeats, per token."""
    models = {"original": study.original, "pre-fusion": study.pre}
    for row in intensity:
        models[fused_name(row["steps"])] = fuse(study.pre, [tuple(g) for g in row["groups"]])
    for row in removal_rows:
        models[removed_name(row["depth_reduction"])] = drop_ffns(study.pre, row["removed"])
    for row in removal_counts:
        models[removed_name(row["removed_count"])] = drop_ffns(study.pre, row["removed"])
    seconds, _ = decode_samples({name: (lambda p, n, m=m: reffuse_decode(m, p, n)) for name, m in models.items()},
                                prompt_ids(study.original, 32), decode_tokens, repeats)
    result = {}
    for name, samples in seconds.items():
        q1, median, q3 = np.quantile(np.asarray(samples) * 1e3 / decode_tokens, [0.25, 0.5, 0.75])
        result[name] = {"ms_per_token": float(median), "tokens_per_second": 1e3 / float(median),
                        "ms_interquartile": [float(q1), float(q3)], "repeats": len(samples)}
    return result


def decoded_models(study: Study, removal_counts: list[dict]) -> dict:
    """The models of (i) by name, for the cost model: pre-fusion, every fused plan and every removal count."""
    models = {"pre-fusion": study.pre}
    for k in study.counts:
        models[fused_name(k)] = fuse(study.pre, study.plans[k])
    for row in removal_counts:
        models[removed_name(row["removed_count"])] = drop_ffns(study.pre, row["removed"])
    return models


# The rules in the order the report lists them.
RULES = (intensity_verdict, removal_verdict, last_ffn_verdict, reversed_verdict, full_block_verdict,
         fold_vs_last_verdict, calibration_verdict, predictor_verdict, equal_latency_verdict,
         calibration_scale_verdict, planner_verdict)


def verdicts(r: dict) -> list[dict]:
    """One entry per finding, by the rules above, from the run's JSON result: (a)-(h), and (i)-(k) where the run
    measured them (runs made before they existed did not)."""
    return [v.as_dict() for v in (rule(r) for rule in RULES) if v is not None]
