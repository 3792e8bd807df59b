"""The findings (a)-(g) of `reffuse experiments`, each as the function that measures it on a Study and, beside
it, the rule that turns the measurement into a verdict against the paper's observation.

A measurement returns the JSON-ready value stored under its key of the run's result; a rule reads only that
result (so it can be re-applied to a committed run) and returns a Verdict: "held", "partly held", "did not
hold" or "not measured".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.core.layout import format_groups, full_blocks
from reffuse.evaluation.prefix import cache_prefix, score_variant
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS, calibrated_fuse
from reffuse.method.metrics import block_evaluations_needed, dependency, greedy_windows, matrix_to_json, \
    window_statistics
from reffuse.method.removal import cheapest, drop_ffns, ffn_scores
from reffuse.progress import Progress
from reffuse.speed.bench import prompt_ids, reffuse_decode, time_decode
from reffuse.experiments.study import (MAX_STEPS, WINDOW, Study, format_kl, format_perplexity, fused_name,
                                       rank_correlation, removed_name, reversed_run)

RIDGE_SWEEP = (0.1, 1.0, 10.0)


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


def decide(ok: bool, partly: bool = False) -> str:
    return "held" if ok else "partly held" if partly else "did not hold"


def by_steps(r: dict) -> list[dict]:
    """The rows of finding (a), most steps first."""
    return sorted(r["intensity"], key=lambda row: -row["steps"])


# ---------------------------------------------------------------------------------------------------------------
# (a) fusion intensity and (f) fold vs last: the span into k groups, k = ceil(L/2) .. 1, both norms


def fusion_intensity(study: Study) -> list[dict]:
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
            rows.append(row)
    return rows


def intensity_verdict(r: dict) -> Verdict:
    rows = by_steps(r)
    sink = r["sink"]["pre_fusion_norms"][r["sink"]["layer"]]
    kls = [row["fold"]["kl"] for row in rows]
    rises = [y >= x * 0.95 for x, y in zip(kls, kls[1:])]
    return Verdict(
        "a", "fusion intensity",
        paper="Puzzle-49B, 26 FFNs fused into 12/6/3/2: accuracy falls gradually, about 1% at 12 and about 4% at 2 "
              "(84.71 -> 83.92 -> 82.84 -> 81.69 -> 81.24)",
        here="KL to the pre-fusion model " + ", ".join(f"{row['steps']} steps {format_kl(row['fold']['kl'])}"
                                                       for row in rows)
             + "; perplexity " + ", ".join(format_perplexity(row["fold"]["perplexity"]) for row in rows)
             + f" (pre-fusion {format_perplexity(r['pre_fusion']['perplexity'])}); the first token's norm leaving "
               f"the run " + ", ".join(f"{row['fold']['sink_norm']:.0f}" for row in rows) + f" (pre-fusion {sink:.0f})",
        rule="held if the damage grows as the groups get fewer (each KL at least 95% of the one before); partly if "
             "the fewest groups still cost more than the most, but not step by step",
        verdict=decide(all(rises), kls[-1] > kls[0]))


def fold_vs_last_verdict(r: dict) -> Verdict:
    rows = by_steps(r)
    fold_better = [row["fold"]["kl"] <= row["last"]["kl"] for row in rows]
    return Verdict(
        "f", "fold vs last norm",
        paper="the paper feeds every fused FFN the last block's norm (its §3) and does not ablate it; folding each "
              "block's gain into its weights is exact for the parallel form [INF]",
        here="; ".join(f"{row['steps']} steps: fold KL {format_kl(row['fold']['kl'])}, last "
                       f"{format_kl(row['last']['kl'])}" for row in rows),
        rule="not a test of the paper: 'held' means fold is at least as good as last at every k",
        verdict=decide(all(fold_better), any(fold_better)))


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
    return Verdict(
        "g", "calibrated vs plain fusion",
        paper="not in the paper: it recovers fused models by knowledge distillation on billions of tokens (Step 3 "
              "+ KD beats the baseline: 85.28 vs 84.71)",
        here="; ".join(f"{row['steps']} steps: plain KL {format_kl(row['fold']['kl'])} -> calibrated "
                       f"{format_kl(row['calibrated']['kl'])} ({100 * c:.0f}% of the gap closed), perplexity "
                       f"{format_perplexity(row['fold']['perplexity'])} -> "
                       f"{format_perplexity(row['calibrated']['perplexity'])}" for row, c in zip(rows, closed))
             + f"; weighting {r['calibration']['weighting']}, ridge {r['calibration']['ridge']:g}, chosen on "
               "validation calibration text",
        rule="our addition: 'held' means calibration lowers the held-out KL at every k",
        verdict=decide(all(c > 0 for c in closed), any(c > 0 for c in closed)))


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
    plain = [row["fold"]["kl"] < removal["kl"] for row, removal in pairs]
    calibrated = [row["calibrated"]["kl"] < removal["kl"] for row, removal in pairs]
    here = []
    for row, removal in pairs:
        fused_ms = latency[fused_name(row["steps"])]["ms_per_token"]
        removed_ms = latency[removed_name(removal["depth_reduction"])]["ms_per_token"]
        here.append(f"depth -{row['depth_reduction']}: fusion KL {format_kl(row['fold']['kl'])} (calibrated "
                    f"{format_kl(row['calibrated']['kl'])}), {100 * (fused_ms / base_ms - 1):+.1f}% decode latency; "
                    f"removal KL {format_kl(removal['kl'])}, {100 * (removed_ms / base_ms - 1):+.1f}%")
    return Verdict(
        "b", "FFN removal vs fusion",
        paper="at a similar latency, fusion keeps more accuracy than removal (fusion step 3: -10% latency, -3.5% "
              "accuracy; removing 15 FFNs: -7.5% latency, -5% accuracy; 20 FFNs: -11%, -8.7%)",
        here="; ".join(here),
        rule="held if plain fusion has the lower KL at every equal depth reduction; partly if it wins at some, or if "
             "only calibrated fusion wins at all. Latency is reported, not judged: a CPU decode of a 135M model is "
             "bound by reading weights, which fusion does not reduce",
        verdict=decide(all(plain), any(plain) or all(calibrated)),
        note=f"plain fusion wins at {sum(plain)} of {len(plain)} depths, calibrated fusion at {sum(calibrated)} of "
             f"{len(calibrated)}")


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
    left_out = last["leave out the last FFN"]["kl"]
    others = [row["kl"] for label, row in last.items() if label != "leave out the last FFN"]
    whole = last["the whole run, last FFN included"]["kl"]
    return Verdict(
        "c", "the last FFN of a run",
        paper="including the run's last FFN hurts most (MT-Bench 8.25 -> 7.30 when layers 51 and 70 are included); "
              "shifting the group by one to include it is worse than leaving it out",
        here="; ".join(f"{row['label']} ({row['group'][0]}-{row['group'][1]}) KL {format_kl(row['kl'])}"
                       for row in r["last_ffn"]),
        rule="held if leaving out the last FFN gives the lowest KL and including it (the whole run) is worse than "
             "leaving it out",
        verdict=decide(left_out <= min(others) and whole > left_out, whole > left_out))


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


def reversed_verdict(r: dict) -> Verdict:
    close = [max(row["fused"]["kl"], row["reversed"]["kl"]) <= 2 * min(row["fused"]["kl"], row["reversed"]["kl"])
             for row in r["reversed"]]
    return Verdict(
        "d", "reversed order vs fusion",
        paper="running a span's FFNs in reverse order costs about as much as fusing them (combined accuracy within "
              "0.25 points, e.g. [42,49] 83.74 fused vs 83.52 reversed)",
        here="; ".join(f"{row['span'][0]}-{row['span'][1]}: fused KL {format_kl(row['fused']['kl'])}, reversed "
                       f"{format_kl(row['reversed']['kl'])}" for row in r["reversed"]),
        rule="held if, for every span, the two KLs are within a factor 2 of each other",
        verdict=decide(all(close), any(close)))


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
        scores = score_variant(prefix, pre, min(s for s, _ in chosen), reference=study.original_prefix,
                               parallel=chosen, whole_blocks=True)
        rows.append({"steps": n, "windows": [list(w) for w in chosen], "windows_text": format_groups(chosen),
                     "kl": scores["kl_from_base"], "perplexity": scores["perplexity"],
                     "top1": scores["top1_agreement"], "kl_vs_original": scores["kl_from_reference"]})
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
            "rank_correlation_max_kl": rank_correlation([w["max"] for w in single], [w["kl"] for w in single])}


def _prediction_note(full: dict) -> str:
    single = full["single_windows"]
    if not single:
        return ""
    best, worst = min(single, key=lambda w: w["kl"]), max(single, key=lambda w: w["kl"])
    rho = full["rank_correlation_max_kl"]
    return (f"each of the {len(single)} eligible windows alone: KL from {format_kl(best['kl'])} ({best['first']}-"
            f"{best['last']}) to {format_kl(worst['kl'])} ({worst['first']}-{worst['last']}); rank correlation of "
            f"M_max with that KL {rho:.2f}" if rho is not None else "")


def full_block_verdict(r: dict) -> Verdict:
    full = r["full_block"]["rows"]
    if not full:
        return Verdict("e", "full-block parallelization", paper="see the paper's App. B, Table 7",
                       here="no window of 4 consecutive blocks with attention and FFN exists", rule="-",
                       verdict="not measured")
    ffn_four = next((row["fused"]["kl"] for row in r["reversed"] if row["span"][1] - row["span"][0] + 1 == WINDOW),
                    None)
    cheap_start = len(full) >= 2 and full[1]["kl"] < 0.5 * full[-1]["kl"]
    harder = ffn_four is not None and full[0]["kl"] > ffn_four
    here = "; ".join(f"step {row['steps']} (+{row['windows_text'].split(',')[-1]}, M_max {step['max']:.3f}) KL "
                     f"{format_kl(row['kl'])}" for row, step in zip(full, r["full_block"]["greedy"]))
    if ffn_four is not None:
        here += f"; for comparison, fusing {WINDOW} attention-free FFNs: KL {format_kl(ffn_four)}"
    return Verdict(
        "e", "full-block parallelization",
        paper="greedy windows of 4 whole blocks: the first two steps are cheap (MMLU 80.73 -> 80.51 -> 80.04), the "
              "third and fourth collapse (77.86, 56.12); whole blocks are harder to parallelize than FFNs",
        here=here,
        rule=f"held if the KL after step 2 is under half the KL after the last step (cheap first steps, then a "
             f"collapse) and one window of {WINDOW} whole blocks costs more than fusing {WINDOW} attention-free "
             f"FFNs; partly if only the second holds",
        verdict=decide(cheap_start and harder, harder),
        note=_prediction_note(r["full_block"]))


# ---------------------------------------------------------------------------------------------------------------
# Decode latency of every model of (a) and (b), for (b)'s comparison


def decode_latency(study: Study, intensity: list[dict], removal_rows: list[dict], decode_tokens: int,
                   repeats: int) -> dict:
    """Greedy decode of the original, the pre-fusion, every fused and every FFN-removed model, timed in
    alternation in one run (reffuse.speed.bench.time_decode)."""
    models = {"original": study.original, "pre-fusion": study.pre}
    for row in intensity:
        models[fused_name(row["steps"])] = fuse(study.pre, [tuple(g) for g in row["groups"]])
    for row in removal_rows:
        models[removed_name(row["depth_reduction"])] = drop_ffns(study.pre, row["removed"])
    seconds, _ = time_decode({name: (lambda p, n, m=m: reffuse_decode(m, p, n)) for name, m in models.items()},
                             prompt_ids(study.original, 32), decode_tokens, repeats)
    return {name: {"ms_per_token": 1e3 * s / decode_tokens, "tokens_per_second": decode_tokens / s}
            for name, s in seconds.items()}


# The rules in the order the report lists them.
RULES = (intensity_verdict, removal_verdict, last_ffn_verdict, reversed_verdict, full_block_verdict,
         fold_vs_last_verdict, calibration_verdict)


def verdicts(r: dict) -> list[dict]:
    """One entry per finding (a)-(g), by the rules above, from the run's JSON result."""
    return [rule(r).as_dict() for rule in RULES]
