"""(j) Calibration at scale: the most-steps and the one-step plans calibrated on more and more calibration text
(2k, 8k and 32k tokens by default), with the weighting and ridge of (g), and each group's residual on its own
tokens and on held-out text.
"""

from __future__ import annotations

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference, higher
from reffuse.experiments.study import Study, format_kl, format_perplexity
from reffuse.method.calibrate import calibrated_fuse, collect, fused_index
from reffuse.progress import Progress


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


def judge(r: dict) -> Verdict | None:
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


def section(r: dict) -> list[str]:
    """(j): each plan calibrated on more and more text, with its residuals."""
    if "calibration_scale" not in r:
        return []
    scale = r["calibration_scale"]
    lines = ["", "## (j) Calibration at scale", "",
             f"The plans calibrated on the first {', '.join(map(str, scale['sizes']))} calibration tokens (weighting "
             f"{scale['weighting']}, ridge {scale['ridge']:g}, as chosen for (g)). Residual: ||H W^T - R||² / ||R||² "
             "of the fused down-projection against the sequential run's update, mean over the groups, on the "
             "tokens it was fitted on and on the held-out streams entering each group in the pre-fusion model "
             "(plain fusion's in brackets).", "",
             "| steps | calibration tokens | KL | perplexity | residual, fitted tokens | residual, held-out (plain) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in scale["rows"]:
        fitted = sum(f["fit_error_calibrated"] for f in row["fits"]) / len(row["fits"])
        held = sum(g["calibrated"] for g in row["held_out_residual"]) / len(row["held_out_residual"])
        plain = sum(g["plain"] for g in row["held_out_residual"]) / len(row["held_out_residual"])
        lines.append(f"| {row['steps']} | {row['tokens']} | {format_kl(row['kl'])} | "
                     f"{format_perplexity(row['perplexity'])} | {fitted:.3f} | {held:.3f} ({plain:.3f}) |")
    return lines
