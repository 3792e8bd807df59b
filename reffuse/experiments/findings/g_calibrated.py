"""(g) Calibrated vs plain fusion at every k of (a) (reffuse.method.calibrate): the token weighting and ridge chosen
by a sweep judged on a validation part of the calibration text (never on held-out text), then every plan refitted
on all of it. The calibrated KL is a column of (a)'s table; this finding's section says how the fit was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.evaluation.prefix import cache_prefix, score_variant
from reffuse.experiments.findings.a_intensity import IntensityRow, by_steps
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference
from reffuse.experiments.study import Study, format_kl, format_perplexity
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS, calibrated_fuse
from reffuse.progress import Progress

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult

RIDGE_SWEEP = (0.1, 1.0, 10.0)


@dataclass(frozen=True)
class SweepPoint:
    """One weighting and ridge of the sweep: KL(calibrated) / KL(plain) on the validation text for each k, and
    their geometric mean (the score the choice minimises)."""
    weighting: str
    ridge: float
    kl_ratio: dict[int, float]      # steps k -> the ratio
    geometric_mean_ratio: float

    def to_json(self) -> dict:
        return {"weighting": self.weighting, "ridge": self.ridge,
                "kl_ratio": {str(k): v for k, v in self.kl_ratio.items()},
                "geometric_mean_ratio": self.geometric_mean_ratio}

    @classmethod
    def from_json(cls, raw: dict) -> SweepPoint:
        return cls(raw["weighting"], raw["ridge"], {int(k): v for k, v in raw["kl_ratio"].items()},
                   raw["geometric_mean_ratio"])


@dataclass(frozen=True)
class Calibration:
    """How the calibrated fusion of (g) was chosen: the sweep, plain fusion's validation KL for each k, and the
    weighting and ridge chosen (the library's defaults beside them); tokens of the fit, validation and whole
    calibration text."""
    sweep: list[SweepPoint]
    plain_validation_kl: dict[int, float]   # steps k -> plain fusion's KL on the validation text
    ridge: float
    weighting: str
    default_ridge: float
    default_weighting: str
    fit_tokens: int
    validation_tokens: int
    tokens: int

    def to_json(self) -> dict:
        return {"sweep": [point.to_json() for point in self.sweep],
                "plain_validation_kl": {str(k): v for k, v in self.plain_validation_kl.items()},
                "ridge": self.ridge, "weighting": self.weighting, "default_ridge": self.default_ridge,
                "default_weighting": self.default_weighting, "fit_tokens": self.fit_tokens,
                "validation_tokens": self.validation_tokens, "tokens": self.tokens}

    @classmethod
    def from_json(cls, raw: dict) -> Calibration:
        return cls([SweepPoint.from_json(point) for point in raw["sweep"]],
                   {int(k): v for k, v in raw["plain_validation_kl"].items()}, raw["ridge"], raw["weighting"],
                   raw["default_ridge"], raw["default_weighting"], raw["fit_tokens"], raw["validation_tokens"],
                   raw["tokens"])


def calibration(study: Study, intensity: list[IntensityRow]) -> Calibration:
    """Token weighting and ridge chosen by a sweep judged on a validation part of the calibration text (never
    on held-out text), then every plan of (a) refitted on all of it and scored; sets `calibrated` and
    `calibration_fits` of each row of `intensity`."""
    a, pre, counts = study.span[0], study.pre, study.counts
    calibration_ids = study.texts.calibration.ids
    fit_windows, validation_windows = calibration_ids[:-2], calibration_ids[-2:]
    validation = cache_prefix(pre, validation_windows)
    plain_validation = {k: score_variant(validation, fuse(pre, study.plans[k]), a, kl_only=True).kl_from_base
                        for k in counts}
    sweep = []
    with Progress("calibration sweep", len(WEIGHTINGS) * len(RIDGE_SWEEP) * len(counts), "fits") as bar:
        for weighting in WEIGHTINGS:
            for ridge in RIDGE_SWEEP:
                ratios = {}
                for k in counts:
                    calibrated, _ = calibrated_fuse(pre, study.plans[k], fit_windows, ridge=ridge, weighting=weighting)
                    ratios[k] = score_variant(validation, calibrated, a, kl_only=True).kl_from_base / \
                        plain_validation[k]
                    bar.update()
                sweep.append(SweepPoint(weighting, ridge, ratios,
                                        float(np.exp(np.mean(np.log(list(ratios.values())))))))
    best = min(sweep, key=lambda point: point.geometric_mean_ratio)
    with Progress("calibrated variants", len(counts), "models") as bar:
        for row in intensity:
            calibrated, fits = calibrated_fuse(pre, list(row.groups), calibration_ids, ridge=best.ridge,
                                               weighting=best.weighting)
            row.calibrated = study.scores(calibrated, a)
            row.calibration_fits = fits
            bar.update()
    return Calibration(sweep, plain_validation, best.ridge, best.weighting, DEFAULT_RIDGE, DEFAULT_WEIGHTING,
                       int(fit_windows.size), int(validation_windows.size), int(calibration_ids.size))


def judge(r: StudyResult) -> Verdict:
    rows = by_steps(r)
    closed = [1 - row.calibrated.kl / row.fold.kl for row in rows]
    kl = [difference(row.calibrated, row.fold) for row in rows]
    nll = [difference(row.calibrated, row.fold, "nll") for row in rows]
    worse = [row.steps for row, d in zip(rows, nll) if d.higher]
    return Verdict(
        "g", "calibrated vs plain fusion",
        paper="not in the paper: it recovers fused models by knowledge distillation on billions of tokens (Step 3 "
              "+ KD beats the baseline: 85.28 vs 84.71)",
        here="; ".join(f"{row.steps} steps: plain KL {format_kl(row.fold.kl)} -> calibrated "
                       f"{format_kl(row.calibrated.kl)} ({100 * c:.0f}% of the gap closed; calibrated - plain "
                       f"{describe(d)}), perplexity {format_perplexity(row.fold.perplexity)} -> "
                       f"{format_perplexity(row.calibrated.perplexity)}"
                       for row, c, d in zip(rows, closed, kl))
             + f"; weighting {r.calibration.weighting}, ridge {r.calibration.ridge:g}, chosen on "
               "validation calibration text",
        rule="our addition: held if calibration lowers the held-out KL at every k, each resolved; partly if at some "
             "k and raises it at none; did not hold if it raises it, resolved, at some k and lowers it at none; "
             "else not resolved. Where the calibrated perplexity is resolved higher, the note says so",
        verdict=decide_lower(kl),
        note=(f"calibration raised the held-out negative log-likelihood, resolved, at k = {', '.join(map(str, worse))}"
              if worse else "calibration raised the held-out negative log-likelihood, resolved, at no k"))


def section(r: StudyResult) -> list[str]:
    """The sweep that chose the weighting and the ridge, and what was chosen."""
    c = r.calibration
    sweep = ", ".join(f"{s.weighting} {s.ridge:g}: {s.geometric_mean_ratio:.3f}" for s in c.sweep)
    return ["", "Calibration: token weighting (none or relative, see reffuse.method.calibrate) and ridge chosen "
                f"together on {c.validation_tokens} validation tokens of the calibration text, every plan above "
                f"fitted on the other {c.fit_tokens}; the score is the geometric mean over the plans of "
                f"KL(calibrated) / KL(plain): {sweep}. Chosen: **{c.weighting}, ridge {c.ridge:g}** (the "
                f"library defaults are {c.default_weighting}, {c.default_ridge:g}), then refitted on all "
                f"{c.tokens} calibration tokens. Held-out text played no part in the choice."]
