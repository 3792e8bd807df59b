"""(g) Calibrated vs plain fusion at every k of (a) (reffuse.method.calibrate): the token weighting and ridge chosen
by a sweep judged on a validation part of the calibration text (never on held-out text), then every plan refitted
on all of it. The calibrated KL is a column of (a)'s table; this finding's section says how the fit was chosen.
"""

from __future__ import annotations

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.evaluation.prefix import cache_prefix, score_variant
from reffuse.experiments.findings.rules import Verdict, by_steps, decide_lower, difference, higher
from reffuse.experiments.study import Study, format_kl, format_perplexity
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS, calibrated_fuse
from reffuse.progress import Progress

RIDGE_SWEEP = (0.1, 1.0, 10.0)


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


def judge(r: dict) -> Verdict:
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


def section(r: dict) -> list[str]:
    """The sweep that chose the weighting and the ridge, and what was chosen."""
    c = r["calibration"]
    sweep = ", ".join(f"{s['weighting']} {s['ridge']:g}: {s['geometric_mean_ratio']:.3f}" for s in c["sweep"])
    return ["", "Calibration: token weighting (none or relative, see reffuse.method.calibrate) and ridge chosen "
                f"together on {c['validation_tokens']} validation tokens of the calibration text, every plan above "
                f"fitted on the other {c['fit_tokens']}; the score is the geometric mean over the plans of "
                f"KL(calibrated) / KL(plain): {sweep}. Chosen: **{c['weighting']}, ridge {c['ridge']:g}** (the "
                f"library defaults are {c['default_weighting']}, {c['default_ridge']:g}), then refitted on all "
                f"{c['tokens']} calibration tokens. Held-out text played no part in the choice."]
