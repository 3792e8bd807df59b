"""Calibrated fusion: refit a fused block's down-projection so that it reproduces the sequential run.

Plain fusion replaces the run's sequential update by the parallel one (eq. 5 for eq. 4), which no training
corrects (the paper recovers with knowledge distillation). Calibration is the cheapest correction there is:
keep the fused gate and up projections, and refit only the down-projection W* [d, Σdh] in closed form, on
calibration text, so that the fused block's update matches the sequential run's:

    x   [T, d]      the stream entering the run (in the fused model, earlier groups already calibrated)
    H   [T, Σdh]    the fused block's hidden activations, silu(u W_gate*^T) ⊙ (u W_up*^T), u = η*(x)
    R   [T, d]      the sequential run's total update, f_last(...f_first(x)) - x
    W*  = argmin_W ||H W^T - R||² + λ ||W - W0||²,    W0 = the plain fused down-projection (Theorem 3.1)

so λ → ∞ gives plain fusion back and λ → 0 the unregularised least-squares fit. Its normal equations,

    (HᵀH + λ I) (W - W0)^T = HᵀR - HᵀH W0^T,

are solved in float64. HᵀH [Σdh, Σdh], HᵀR [Σdh, d] and ||R||² are accumulated over `chunk` tokens at a time,
so memory is bounded by the Gram matrix, whatever the amount of text. With fewer calibration tokens T than hidden
units Σdh (a fused SmolLM2 group of 7 FFNs has Σdh = 10752), the same solution comes cheaper from the T x T form,
(W - W0)ᵀ = Hᵀ (HHᵀ + λI)⁻¹ (R - H W0ᵀ), whose memory, H itself, is then below the Gram matrix's. The ridge
is relative to the trace: λ = ridge · tr(HᵀH) / Σdh, i.e. `ridge` times the mean squared hidden activation
times T, so one value suits groups of every width and any number of tokens.

Token weighting. The first token of every sequence (the attention sink) carries a massive activation in trained
Llamas (in SmolLM2 its stream reaches a norm near 30000, other tokens' about 150), so in absolute squared error a
few sink tokens outweigh thousands of ordinary ones. weighting="relative" divides token t's rows of H and R by
||x_t + R_t||, the norm of the stream the update lands on, which is what the next RMSNorm divides by anyway.
DEFAULT_RIDGE and DEFAULT_WEIGHTING were chosen together on a validation part of the calibration split
(`reffuse experiments`, finding (g), records the sweep); they are never tuned on held-out text.

Groups are calibrated in order, each on the stream that the already calibrated groups before it produce. The
target of each is still its own run's sequential update on that stream, R = f_last(...f_first(x)) - x: a later
group is fitted where the earlier ones leave the stream, but it is not asked to undo their error.

The same refit for FFN removal (`calibrated_removal`), so that the baseline gets what fusion gets: each removed
FFN joins the nearest kept FFN of the span before it (or after it, at the span's start), and that kept FFN's
down-projection is refitted, with the same target, ridge and weighting, to reproduce the sequential update of
the blocks it now stands for; only its own hidden units are features (Σdh = dh). Calibration text must not overlap the held-out text
the result is evaluated on; `reffuse fuse`, `demo` and `experiments` take both from disjoint corpus splits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import array_module, to_numpy
from reffuse.errors import ReffuseError
from reffuse.core.fusion import fuse
from reffuse.core.layout import check_groups
from reffuse.core.model import FFN, Block, Model, check_token_ids, rms_norm, run_blocks, silu

DEFAULT_RIDGE = 0.1
WEIGHTINGS = ("none", "relative")
DEFAULT_WEIGHTING = "relative"
MIN_CALIBRATION_TOKENS = 128  # fewer tokens than this fit noise more than the run: a clear error, not a weak fit


@dataclass
class RunStatistics:
    """The sufficient statistics of one group's least-squares problem, accumulated in float64."""
    gram: np.ndarray        # HᵀH [Σdh, Σdh]
    cross: np.ndarray       # HᵀR [Σdh, d]
    target_energy: float    # ||R||²
    tokens: int

    def __add__(self, other: "RunStatistics") -> "RunStatistics":
        return RunStatistics(self.gram + other.gram, self.cross + other.cross,
                             self.target_energy + other.target_energy, self.tokens + other.tokens)


@dataclass
class GroupCalibration:
    """What calibrating one group did, for reports."""
    group: tuple[int, int]        # (first, last) in the unfused model's numbering
    tokens: int
    ridge: float                  # relative
    ridge_absolute: float         # λ
    fit_error_plain: float        # ||H W0^T - R||² / ||R||² on the calibration tokens
    fit_error_calibrated: float   # the same with the refitted W*
    form: str                     # which form of the normal equations was solved
    weighting: str                # "none" or "relative" (see collect)

    def as_dict(self) -> dict:
        return {"group": list(self.group), "tokens": self.tokens, "ridge": self.ridge,
                "ridge_absolute": self.ridge_absolute, "fit_error_plain": self.fit_error_plain,
                "fit_error_calibrated": self.fit_error_calibrated, "form": self.form, "weighting": self.weighting}

    @classmethod
    def from_dict(cls, raw: dict) -> GroupCalibration:
        return cls(**{**raw, "group": tuple(raw["group"])})


def check_calibration_tokens(tokens: int) -> None:
    """Refuse calibration text too short to refit a down-projection (before any long work, where callers can)."""
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ReffuseError(f"calibration text is too short: {tokens} tokens, at least {MIN_CALIBRATION_TOKENS} "
                           "are needed to refit a fused down-projection (give more calibration text)")


def hidden_activations(ffn: FFN, x, eps: float):
    """The SwiGLU hidden activations of `ffn` on the stream x [T, d] -> [T, dh] (before the down-projection)."""
    u = rms_norm(x, ffn.norm_gain, eps)
    return silu(u @ ffn.gate.T) * (u @ ffn.up.T)


def sequential_update(model: Model, first: int, last: int, x):
    """The total residual update of attention-free blocks first..last run one after another, [T, d]."""
    return run_blocks(model, x, start=first, stop=last + 1) - x  # attention-free blocks read no rotary tables


def collect(model: Model, group: tuple[int, int], fused_ffn: FFN, x, chunk: int = 512, weighting: str = "none"):
    """H [T, Σdh] and R [T, d] (float64) for one group on the stream x [T, d] entering it, `chunk` tokens at a
    time (the sequential run and the wide FFN never see more than `chunk` tokens at once).

    weighting="relative" scales token t's row of both by 1 / ||x_t + R_t||, so that the fit counts each token's
    error relative to the stream it lands on (what the next RMSNorm sees), not in absolute units.
    """
    check_weighting(weighting)
    first, last = group
    eps = model.config.norm_eps
    hidden, targets = [], []
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        h = to_numpy(hidden_activations(fused_ffn, xs, eps)).astype(np.float64)       # [c, Σdh]
        r = to_numpy(sequential_update(model, first, last, xs)).astype(np.float64)    # [c, d]
        if weighting == "relative":
            scale = 1.0 / np.linalg.norm(to_numpy(xs).astype(np.float64) + r, axis=-1, keepdims=True)  # [c, 1]
            h, r = h * scale, r * scale
        hidden.append(h)
        targets.append(r)
    return np.concatenate(hidden), np.concatenate(targets)


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ReffuseError(f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    return weighting


def run_statistics(model: Model, group: tuple[int, int], fused_ffn: FFN, x, chunk: int = 512,
                   weighting: str = "none") -> RunStatistics:
    """HᵀH, HᵀR and ||R||² for one group on the stream x [T, d] entering it, accumulated `chunk` tokens at a
    time: memory is the Gram matrix plus one chunk, however many tokens."""
    width, d = fused_ffn.width, model.config.dim
    stats = RunStatistics(np.zeros((width, width)), np.zeros((width, d)), 0.0, 0)
    for start in range(0, x.shape[0], chunk):
        h, r = collect(model, group, fused_ffn, x[start:start + chunk], chunk, weighting)  # [c, Σdh], [c, d]
        stats = stats + RunStatistics(h.T @ h, h.T @ r, float(np.sum(r * r)), h.shape[0])
    return stats


def fit_error(stats: RunStatistics, down) -> float:
    """||H W^T - R||² / ||R||² from the statistics alone: (tr(W HᵀH Wᵀ) - 2 tr(W HᵀR) + ||R||²) / ||R||²."""
    w = to_numpy(down).astype(np.float64)                                          # [d, Σdh]
    squared = np.sum((w @ stats.gram) * w) - 2.0 * np.sum(w * stats.cross.T) + stats.target_energy
    return float(max(squared, 0.0) / stats.target_energy)


def check_ridge(ridge: float) -> float:
    """A ridge that is a finite number > 0: an infinite one would give NaN weights, not a refit."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating)) \
            or not 0 < ridge < math.inf:
        raise ReffuseError(f"ridge {ridge!r} must be positive and finite (it is relative to the trace of HᵀH; "
                           f"default {DEFAULT_RIDGE:g})")
    return float(ridge)


def ridge_absolute(trace: float, width: int, ridge: float) -> float:
    """λ = ridge · tr(HᵀH) / Σdh."""
    return float(ridge * trace / width)


def solve_down(stats: RunStatistics, down0, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """The ridge solution W* [d, Σdh] (float64) from the normal equations, regularised towards `down0`."""
    w0 = to_numpy(down0).astype(np.float64)                                        # [d, Σdh]
    lam = ridge_absolute(np.trace(stats.gram), stats.gram.shape[0], check_ridge(ridge))
    system = stats.gram + lam * np.eye(stats.gram.shape[0])                        # [Σdh, Σdh]
    correction = np.linalg.solve(system, stats.cross - stats.gram @ w0.T)          # [Σdh, d]
    return w0 + correction.T


def solve_down_dual(hidden: np.ndarray, targets: np.ndarray, down0, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """The same W* from the T x T form, cheaper when there are fewer tokens than hidden units (T < Σdh):

        (HᵀH + λI)⁻¹ Hᵀ = Hᵀ (HHᵀ + λI)⁻¹,   so   (W - W0)ᵀ = Hᵀ (HHᵀ + λI)⁻¹ (R - H W0ᵀ),

    with the same λ (tr(HHᵀ) = tr(HᵀH)). hidden H [T, Σdh], targets R [T, d], float64.
    """
    w0 = to_numpy(down0).astype(np.float64)                                        # [d, Σdh]
    kernel = hidden @ hidden.T                                                     # [T, T]
    lam = ridge_absolute(np.trace(kernel), hidden.shape[1], check_ridge(ridge))
    residual = targets - hidden @ w0.T                                             # [T, d]
    weights = np.linalg.solve(kernel + lam * np.eye(kernel.shape[0]), residual)    # [T, d]
    return w0 + (hidden.T @ weights).T


def relative_fit_error(hidden: np.ndarray, targets: np.ndarray, down) -> float:
    """||H W^T - R||² / ||R||² computed directly from H [T, Σdh] and R [T, d]."""
    w = to_numpy(down).astype(np.float64)
    return float(np.sum((hidden @ w.T - targets) ** 2) / np.sum(targets * targets))


def refit_down(model: Model, group: tuple[int, int], ffn: FFN, streams: list, ridge: float = DEFAULT_RIDGE,
               chunk: int = 512, weighting: str = DEFAULT_WEIGHTING) -> tuple[np.ndarray, GroupCalibration]:
    """W* for one fused group from the streams [T_w, d] entering it, and what the fit did.

    The normal equations are solved in whichever form is smaller: the Σdh x Σdh form (HᵀH accumulated chunk by
    chunk) when there are at least as many tokens as hidden units, else the T x T form (H is then smaller than
    HᵀH would be). Both give the same W*.
    """
    ridge = check_ridge(ridge)
    tokens = sum(x.shape[0] for x in streams)
    if tokens >= ffn.width:
        stats = run_statistics(model, group, ffn, streams[0], chunk, weighting)
        for x in streams[1:]:
            stats = stats + run_statistics(model, group, ffn, x, chunk, weighting)
        down = solve_down(stats, ffn.down, ridge)
        lam = ridge_absolute(np.trace(stats.gram), ffn.width, ridge)
        errors = fit_error(stats, ffn.down), fit_error(stats, down)
        form = "normal equations, Σdh x Σdh"
    else:
        pairs = [collect(model, group, ffn, x, chunk, weighting) for x in streams]
        hidden = np.concatenate([h for h, _ in pairs])                   # [T, Σdh]
        targets = np.concatenate([r for _, r in pairs])                  # [T, d]
        down = solve_down_dual(hidden, targets, ffn.down, ridge)
        lam = ridge_absolute(float(np.sum(hidden * hidden)), ffn.width, ridge)
        errors = relative_fit_error(hidden, targets, ffn.down), relative_fit_error(hidden, targets, down)
        form = "normal equations, T x T"
    return down, GroupCalibration(tuple(group), tokens, ridge, lam, errors[0], errors[1], form, weighting)


def fused_index(groups: list[tuple[int, int]], group: tuple[int, int]) -> int:
    """Where `group` stands in the fused model: its first block, less the blocks earlier groups absorbed."""
    return group[0] - sum(last - first for first, last in groups if first < group[0])


def calibrated_fuse(model: Model, groups, windows, norm: str = "fold", ridge: float = DEFAULT_RIDGE,
                    chunk: int = 512, progress=None, weighting: str = DEFAULT_WEIGHTING
                    ) -> tuple[Model, list[GroupCalibration]]:
    """fuse(model, groups, norm) with every fused down-projection refitted on the calibration `windows`.

    windows: token ids, one 1-D array per window (each window is its own sequence, positions from 0).
    Returns the calibrated model and one GroupCalibration per group. `progress(n)`, if given, is called after
    each group.
    """
    def refit(group, ffn, streams):
        down, report = refit_down(model, group, ffn, streams, ridge, chunk, weighting)
        return FFN(ffn.norm_gain, ffn.gate, ffn.up, array_module(ffn.down).asarray(down, dtype=ffn.down.dtype)), report

    return fuse_group_by_group(model, groups, windows, norm, refit, progress)


def removal_groups(span: tuple[int, int], removed) -> list[tuple[tuple[int, int], int]]:
    """(group, kept block) for FFN removal inside `span`: each kept FFN with the removed ones after it up to the
    next kept one; removed FFNs before the span's first kept one join that one."""
    first, last = span
    removed = set(removed)
    kept = [k for k in range(first, last + 1) if k not in removed]
    if not kept or not removed <= set(range(first, last + 1)):
        raise ReffuseError(f"FFN removal {sorted(removed)} must leave at least one FFN of the span {first}-{last} "
                           "and lie inside it")
    bounds = [first] + kept[1:] + [last + 1]
    return [((start, end - 1), k) for start, end, k in zip(bounds, bounds[1:], kept) if end - 1 > start]


def calibrated_removal(model: Model, span: tuple[int, int], removed, windows, ridge: float = DEFAULT_RIDGE,
                       chunk: int = 512, weighting: str = DEFAULT_WEIGHTING) -> tuple[Model, list[GroupCalibration]]:
    """The FFNs `removed` of the attention-free `span` removed, each kept FFN that absorbs some refitted to
    reproduce the sequential update of its group (see the module doc): the model, one block per group."""
    pairs = removal_groups(span, removed)
    kept = dict(pairs)

    def refit(group, _fused_ffn, streams):
        ffn = model.blocks[kept[group]].ffn
        down, report = refit_down(model, group, ffn, streams, ridge, chunk, weighting)
        return FFN(ffn.norm_gain, ffn.gate, ffn.up, array_module(ffn.down).asarray(down, dtype=ffn.down.dtype)), report

    return fuse_group_by_group(model, [g for g, _ in pairs], windows, "fold", refit)


def fuse_group_by_group(model: Model, groups, windows, norm: str, fit, progress=None) -> tuple[Model, list]:
    """fuse(model, groups, norm) with each fused FFN replaced by fit(group, ffn, streams) -> (new FFN, report),
    group after group: `streams` are the calibration windows' streams entering the group in the model fitted so
    far. Returns the model and the reports. Shared by the closed-form refit and local distillation."""
    groups = check_groups(model, groups)
    windows = [check_token_ids(model, w) for w in windows]
    check_calibration_tokens(sum(len(w) for w in windows))
    fused = fuse(model, groups, norm=norm)
    xp = array_module(model.embed)
    streams = [model.embed[xp.asarray(ids)] for ids in windows]  # each window's stream entering block `position`
    rope = [model.rope(np.arange(len(ids))) for ids in windows]
    position, reports = 0, []
    for group in groups:
        index = fused_index(groups, group)
        streams = [run_blocks(fused, x, *rope[w], start=position, stop=index) for w, x in enumerate(streams)]
        position = index
        ffn, report = fit(group, fused.blocks[index].ffn, streams)
        reports.append(report)
        blocks = list(fused.blocks)
        blocks[index] = Block(None, ffn, fused.blocks[index].fused_from)
        fused = dataclasses.replace(fused, blocks=blocks)
        if progress is not None:
            progress(1)
    return fused, reports
