"""(j) Calibration at scale: the most-steps and the one-step plans calibrated on more and more calibration text
(2k, 8k and 32k tokens by default), with the weighting and ridge of (g), and each group's residual on its own
tokens and on held-out text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.g_calibrated import Calibration
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference
from reffuse.experiments.study import ScoredVariant, Study, format_kl, format_perplexity
from reffuse.formats.corpus import WindowsRecord
from reffuse.method.calibrate import GroupCalibration, calibrated_fuse, collect, fused_index
from reffuse.progress import Progress

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult


@dataclass(frozen=True)
class GroupResidual:
    """One group's relative residual ||H W^T - R||² / ||R||² on held-out streams, plain and calibrated."""
    group: tuple[int, int]
    plain: float
    calibrated: float

    def to_json(self) -> dict:
        return {"group": list(self.group), "plain": self.plain, "calibrated": self.calibrated}

    @classmethod
    def from_json(cls, raw: dict) -> GroupResidual:
        return cls(tuple(raw["group"]), raw["plain"], raw["calibrated"])


@dataclass(frozen=True)
class ScaleRow:
    """The plan of `steps` groups calibrated on the first `tokens` calibration tokens: its scores, what each fit
    did, and each group's residual on held-out text."""
    steps: int
    tokens: int
    scores: ScoredVariant
    fits: list[GroupCalibration]
    held_out_residual: list[GroupResidual]

    def to_json(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, **self.scores.to_json(),
                "fits": [f.as_dict() for f in self.fits],
                "held_out_residual": [g.to_json() for g in self.held_out_residual]}

    @classmethod
    def from_json(cls, raw: dict) -> ScaleRow:
        return cls(raw["steps"], raw["tokens"], ScoredVariant.from_json(raw),
                   [GroupCalibration.from_dict(f) for f in raw["fits"]],
                   [GroupResidual.from_json(g) for g in raw["held_out_residual"]])


@dataclass(frozen=True)
class CalibrationScale:
    """Finding (j)'s measurement: the calibration text sizes, the weighting and ridge of (g), the text, and a row
    for every plan and size."""
    sizes: list[int]
    ridge: float
    weighting: str
    text: WindowsRecord
    rows: list[ScaleRow]

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "ridge": self.ridge, "weighting": self.weighting, "text": self.text.to_json(),
                "rows": [row.to_json() for row in self.rows]}

    @classmethod
    def from_json(cls, raw: dict) -> CalibrationScale:
        return cls(raw["sizes"], raw["ridge"], raw["weighting"], WindowsRecord.from_json(raw["text"]),
                   [ScaleRow.from_json(row) for row in raw["rows"]])


def scale_plans(study: Study) -> list[int]:
    """The plans of the scale study: the most steps and one step (the narrowest and the widest groups)."""
    return sorted({max(study.counts), min(study.counts)}, reverse=True)


def held_out_residual(study: Study, groups, fused, weighting: str) -> list[GroupResidual]:
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
        rows.append(GroupResidual(tuple(group), errors[0] / energy, errors[1] / energy))
    return rows


def calibration_scale(study: Study, chosen: Calibration, sizes) -> CalibrationScale:
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
                calibrated, fits = calibrated_fuse(study.pre, study.plans[k], windows, ridge=chosen.ridge,
                                                   weighting=chosen.weighting)
                rows.append(ScaleRow(k, int(windows.size), study.scores(calibrated, a), fits,
                                     held_out_residual(study, study.plans[k], calibrated, chosen.weighting)))
                bar.update()
    return CalibrationScale([int(n) for n in sizes], chosen.ridge, chosen.weighting, text.describe(), rows)


def judge(r: StudyResult) -> Verdict | None:
    if r.calibration_scale is None:
        return None
    scale = r.calibration_scale
    plain = {row.steps: row.fold for row in r.intensity}
    here, more_helps, worse_nll = [], [], []
    for k in sorted({row.steps for row in scale.rows}, reverse=True):
        rows = sorted((row for row in scale.rows if row.steps == k), key=lambda row: row.tokens)
        gain = difference(rows[-1].scores, rows[0].scores)
        more_helps.append(gain)
        parts = []
        for row in rows:
            nll = difference(row.scores, plain[k], "nll")
            if nll.higher:
                worse_nll.append(f"{k} steps at {row.tokens} tokens")
            fit = np.mean([f.fit_error_calibrated for f in row.fits])
            held = np.mean([g.calibrated for g in row.held_out_residual])
            parts.append(f"{row.tokens} tokens KL {format_kl(row.scores.kl)}, perplexity "
                         f"{format_perplexity(row.scores.perplexity)} (plain {format_perplexity(plain[k].perplexity)}; "
                         f"calibrated - plain NLL {describe(nll)}), residual {fit:.3f} on its calibration tokens, "
                         f"{held:.3f} held-out")
        held_plain = np.mean([g.plain for g in rows[0].held_out_residual])
        here.append(f"{k} steps (plain residual {held_plain:.3f} held-out): " + "; ".join(parts)
                    + f"; {rows[-1].tokens} - {rows[0].tokens} tokens: {describe(gain)}")
    return Verdict(
        "j", "calibration at scale",
        paper="not in the paper (it distils on billions of tokens)",
        here="; ".join(here) + f"; weighting {scale.weighting}, ridge {scale.ridge:g}",
        rule="our addition: held if the most calibration text gives a resolved lower KL than the least at every k "
             "studied; partly if at some k and resolved higher at none; did not hold if resolved higher at some k "
             "and lower at none; else not resolved. Every resolved rise of the held-out negative log-likelihood "
             "over plain fusion is named in the note",
        verdict=decide_lower(more_helps),
        note=("calibration raised the held-out negative log-likelihood over plain fusion, resolved, at "
              + ", ".join(worse_nll)) if worse_nll else
             "calibration raised the held-out negative log-likelihood over plain fusion, resolved, nowhere")


def section(r: StudyResult) -> list[str]:
    """(j): each plan calibrated on more and more text, with its residuals."""
    if r.calibration_scale is None:
        return []
    scale = r.calibration_scale
    lines = ["", "## (j) Calibration at scale", "",
             f"The plans calibrated on the first {', '.join(map(str, scale.sizes))} calibration tokens (weighting "
             f"{scale.weighting}, ridge {scale.ridge:g}, as chosen for (g)). Residual: ||H W^T - R||² / ||R||² "
             "of the fused down-projection against the sequential run's update, mean over the groups, on the "
             "tokens it was fitted on and on the held-out streams entering each group in the pre-fusion model "
             "(plain fusion's in brackets).", "",
             "| steps | calibration tokens | KL | perplexity | residual, fitted tokens | residual, held-out (plain) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in scale.rows:
        fitted = sum(f.fit_error_calibrated for f in row.fits) / len(row.fits)
        held = sum(g.calibrated for g in row.held_out_residual) / len(row.held_out_residual)
        plain = sum(g.plain for g in row.held_out_residual) / len(row.held_out_residual)
        lines.append(f"| {row.steps} | {row.tokens} | {format_kl(row.scores.kl)} | "
                     f"{format_perplexity(row.scores.perplexity)} | {fitted:.3f} | {held:.3f} ({plain:.3f}) |")
    return lines
