"""The healing study's figure: held-out KL to the original against tokens of training, on a log axis, every
variant healed by distillation (left) and the objectives compared on the fused models (right), each point with
its 95% interval over held-out windows. Drawn from the study's JSON (reffuse.experiments.healing.report), so it
is redrawn without training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reffuse.experiments.healing.report import Curve
from reffuse.plots import pyplot, save_figure

STYLES = {  # variant -> colour in both panels; the refit variants dashed on the left, objectives by line on the right
    "attention removed": "black", "fused, 4 steps": "tab:blue", "fused, 4 steps, refit": "tab:blue",
    "3 FFNs removed": "tab:red", "fused, 1 step": "tab:green", "fused, 1 step, refit": "tab:green",
    "6 FFNs removed": "tab:purple", "original": "tab:gray"}
OBJECTIVE_LINES = {"kd": "-", "kd-fused": ":", "local": "-.", "ce": "--"}
KL_TICKS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20)   # labelled on the log KL axis, where data reach


def _x(tokens: np.ndarray, zero_at: float) -> np.ndarray:
    """Budget 0 (the untrained start) drawn at `zero_at` on the log axis."""
    return np.where(tokens == 0, zero_at, tokens)


def kl_ticks(curves: Sequence[Curve]) -> tuple[list, list]:
    """The KL_TICKS inside the curves' range (intervals included), and their labels: a log axis labels only its
    decades, and the curves here span less than one."""
    values = [v for c in curves for r in c.rows for v in ([r.kl, *r.interval] if r.interval else [r.kl]) if v > 0]
    low, high = (min(values), max(values)) if values else (KL_TICKS[0], KL_TICKS[-1])
    ticks = [t for t in KL_TICKS if low / 1.2 <= t <= high * 1.2]
    return ticks, [f"{t:g}" for t in ticks]


def recovery_figure(curves: Sequence[Curve], title: str):
    """The study's curves, budget 0 included. Left panel: objective "kd" for every variant; right: the other
    objectives and the kd curves of the fused 4-step model they are compared with."""
    plt = pyplot()
    budgets = sorted({r.tokens for c in curves for r in c.rows if r.tokens})
    zero_at = budgets[0] / 4 if budgets else 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for curve in curves:
        variant, objective = curve.variant, curve.objective
        fused_four = variant == "fused, 4 steps" and objective == "kd"
        for ax in ([left] if objective == "kd" else []) + ([right] if objective != "kd" or fused_four else []):
            tokens = np.array([r.tokens for r in curve.rows])
            kl = np.array([r.kl for r in curve.rows])
            errors = np.array([[r.kl - r.interval[0], r.interval[1] - r.kl] if r.interval else [0.0, 0.0]
                               for r in curve.rows]).T.clip(min=0)
            label = variant if ax is left else f"{variant}: {objective}"
            ax.errorbar(_x(tokens, zero_at), kl, yerr=errors, marker="o", markersize=3, capsize=2,
                        color=STYLES.get(variant, "tab:brown"), label=label,
                        linestyle="--" if ax is left and variant.endswith("refit") else OBJECTIVE_LINES[objective])
    for ax, heading in ((left, "healed by distillation from the original (kd)"),
                        (right, "objectives: whole-model kd, fused blocks only,\nlocal; the original trained by CE")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [zero_at] + budgets
        ax.set_xticks(ticks, ["0"] + [f"{t // 1024}k" if t < 2 ** 20 else f"{t / 2 ** 20:g}M" for t in budgets])
        ax.minorticks_off()
        ax.set_yticks(*kl_ticks(curves))
        ax.set_xlabel("training tokens")
        ax.set_title(heading, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=3.5)   # long enough to show the dashes
    left.set_ylabel("held-out KL(original || model), nats")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_recovery_figure(curves: Sequence[Curve], title: str, path) -> Path:
    return save_figure(recovery_figure(curves, title), Path(path))
