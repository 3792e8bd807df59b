"""Predictors of fusion damage: numbers computed from the pre-fusion model alone, one per candidate group, and how
well each ranks the damage that fusing the group actually does.

For a group [i, j] of attention-free blocks (contiguous, inside one run), with x_k the stream entering block k
and h_k = FFN_k(η_k(x_k)) its update, on calibration text, the first token (the attention sink) left out unless
named:

- cosine-M: Σ_{i≤k<l≤j} M[k, l], the FFN-level dependency left inside the group (reffuse.method.metrics; what the
  planner minimises, reffuse.method.planning.inside_dependency);
- cosine-M, sink: the same on the matrix of the first token alone;
- neighbour damage: Σ_{k=i..j-1} KL(pre || pre with FFNs k, k+1 fused), the direct damage of each adjacent pair;
- block influence (ShortGPT, Men et al. 2024): Σ_{k=i+1..j} (1 - cos(x_k, x_{k+1})), how much the blocks after
  the first turn the stream;
- angular distance (Gromov et al. 2024): arccos(cos(x_i, x_{j+1})) / π between the streams entering and leaving;
- first-order error: ||Σ_{k=i+1..j} J_k(x_i) [Σ_{l=i..k-1} h_l]|| / ||Σ_k h_k||, mean over tokens: fusion feeds
  block k the stream x_i instead of x_i + Σ_{l<k} h_l, and to first order its update then misses the Jacobian of
  FFN_k∘η_k applied to the updates it no longer sees (JVPs by central differences in float64).

Measured damage: KL(pre || pre with [i, j] fused, norm "fold") on the same calibration text. `compare` gives each
predictor's Spearman rank correlation with the damage over the groups (reffuse.stats.spearman) and a bootstrap
interval over groups.

The planner's predictor. `choose_predictor` applies one rule to the groups of several runs (regions): for each
predictor, its rank correlation minus cosine-M's, averaged over the regions, with a 95% paired bootstrap interval
(the groups of each region resampled, the same draw for both predictors); the planner takes the predictor with
the highest mean correlation among those whose lead over cosine-M is resolved (interval above 0), and cosine-M
when none is. On the four regions of the committed SmolLM2 experiments (reports/experiments/smollm2_regions) the rule
picks the neighbour damage: +0.105 [+0.030, +0.211] over cosine-M (tests recompute it from the committed JSON).
That comparison chose the planner, so it cannot test it; later runs, on other text, do. It also counts the six
adjacent pairs of each region, whose neighbour damage is their measured damage itself: without them the lead is
+0.105 [-0.022, +0.262], not resolved, and the same rule would pick the angular distance (the experiments' (h)
leaves the pairs out). The neighbour damage is also the only predictor that sees the attention sink's channel,
since it is a KL over every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.fusion import fuse
from reffuse.core.model import Model, rms_norm, swiglu
from reffuse.evaluation.prefix import Prefix, kl_from_base
from reffuse.method.metrics import cosine_distance
from reffuse.method.planning import inside_dependency
from reffuse.records import FlatRecord
from reffuse.stats import spearman, spearman_interval, spearman_lead, verdict

PREDICTORS = ("cosine-M", "cosine-M, sink", "neighbour damage", "block influence", "angular distance",
              "first-order error")
PLANNER_PREDICTOR = "neighbour damage"   # what reffuse's planner minimises (choose_predictor's pick)
JVP_STEP = 1e-4          # relative step of the central differences


def candidate_groups(first: int, last: int) -> list[tuple[int, int]]:
    """Every contiguous group of 2 or more blocks inside the span first..last."""
    return [(i, j) for i in range(first, last + 1) for j in range(i + 1, last + 1)]


def _ffn_update(model: Model, k: int, x):
    ffn = model.blocks[k].ffn
    return swiglu(ffn, rms_norm(x, ffn.norm_gain, model.config.norm_eps))


def first_order_error(model: Model, group: tuple[int, int], x_first) -> float:
    """The first-order error term of the module doc for one group on the streams x_first [T, d] entering it."""
    i, j = group
    x = np.asarray(to_numpy(x_first), dtype=np.float64)
    updates = [np.asarray(to_numpy(_ffn_update(model, i, x)), dtype=np.float64)]
    missed = np.zeros_like(x)
    for k in range(i + 1, j + 1):
        seen = sum(updates)                                           # what block k no longer sees
        scale = JVP_STEP * np.linalg.norm(x, axis=-1, keepdims=True) / np.maximum(
            np.linalg.norm(seen, axis=-1, keepdims=True), 1e-30)
        forward = np.asarray(to_numpy(_ffn_update(model, k, x + scale * seen)), dtype=np.float64)
        backward = np.asarray(to_numpy(_ffn_update(model, k, x - scale * seen)), dtype=np.float64)
        missed += (forward - backward) / (2 * scale)                  # J_k(x)[seen]
        updates.append(np.asarray(to_numpy(_ffn_update(model, k, x)), dtype=np.float64))
    total = np.linalg.norm(sum(updates), axis=-1)
    return float(np.mean(np.linalg.norm(missed, axis=-1) / np.maximum(total, 1e-30)))


def predictor_values(model: Model, prefix: Prefix, M, M_sink, groups, measured: dict | None = None) -> dict:
    """{group: {predictor: value}} for the candidate groups, on the prefix's windows (the pre-fusion model's
    cached streams); the first token of each window is left out of the stream measures.

    measured: damage() already measured on the same prefix; the adjacent pairs found in it are not fused again
    (for a group of two, its neighbour damage is its damage)."""
    first, last = min(i for i, _ in groups), max(j for _, j in groups)
    streams = [{k: np.asarray(to_numpy(window[k][1:]), dtype=np.float64) for k in range(first, last + 2)}
               for window in prefix.streams]                          # the span's streams, the sink left out
    known = measured or {}
    pairs = sorted({(k, k + 1) for i, j in groups for k in range(i, j)})
    neighbour = damage(model, prefix, [p for p in pairs if p not in known]) | {p: known[p] for p in pairs if p in known}
    values = {}
    for i, j in groups:
        turns = [np.concatenate([cosine_distance(w[k], w[k + 1]) for w in streams]) for k in range(i + 1, j + 1)]
        across = np.concatenate([1 - cosine_distance(w[i], w[j + 1]) for w in streams])  # cos(x_i, x_{j+1})
        x_first = np.concatenate([w[i] for w in streams])
        values[(i, j)] = {
            "cosine-M": inside_dependency(M, i, j),
            "cosine-M, sink": inside_dependency(M_sink, i, j),
            "neighbour damage": sum(neighbour[(k, k + 1)] for k in range(i, j)),
            "block influence": float(sum(np.mean(t) for t in turns)),
            "angular distance": float(np.mean(np.arccos(np.clip(across, -1, 1)) / math.pi)),
            "first-order error": first_order_error(model, (i, j), x_first)}
    return values


def damage(model: Model, prefix: Prefix, groups) -> dict:
    """{group: KL(pre || pre with the group fused)} on the prefix's windows."""
    return {(i, j): kl_from_base(prefix, fuse(model, [(i, j)]), i) for i, j in groups}


def neighbour_damage_matrix(model: Model, prefix: Prefix, runs) -> np.ndarray:
    """The planner's cost matrix C [m, m] for the neighbour damage: C[k, k+1] = KL(pre || pre with FFNs k, k+1
    fused) on the prefix's windows for every adjacent pair inside the runs (first, last), 0 for the other pairs
    inside a run, NaN outside the runs (reffuse.method.planning sums C inside each candidate group)."""
    m = len(model.blocks)
    C = np.full((m, m), np.nan)
    pairs = []
    for first, last in runs:
        C[first:last + 1, first:last + 1] = 0.0
        pairs += [(k, k + 1) for k in range(first, last)]
    for (k, l), kl in damage(model, prefix, pairs).items():
        C[k, l] = kl
    return C


@dataclass(frozen=True)
class RankCorrelation(FlatRecord):
    """A predictor's Spearman correlation with the measured damage over the groups (None where undefined) and its
    95% bootstrap interval over groups (None where no resample defines it)."""
    spearman: float | None
    interval_95: list[float] | None

    @classmethod
    def from_json(cls, raw: dict) -> RankCorrelation:
        """Read from its own keys: a predictor's JSON in finding (h) holds its lead over group size beside them."""
        return cls(raw["spearman"], raw["interval_95"])


def compare(values: dict, measured: dict, seed: int = 0) -> dict[str, RankCorrelation]:
    """Each predictor's Spearman correlation with the measured damage over the groups, and its 95% percentile
    bootstrap interval over groups (groups resampled with replacement, the same draws for every predictor)."""
    groups = sorted(measured)
    target = [measured[g] for g in groups]
    result = {}
    for name in PREDICTORS:
        predicted = [values[g][name] for g in groups]
        result[name] = RankCorrelation(spearman(predicted, target), spearman_interval(predicted, target, seed))
    return result


@dataclass(frozen=True)
class GroupPrediction:
    """One candidate group: its measured damage and each predictor's value (predictor name -> value)."""
    group: tuple[int, int]
    damage: float                 # KL(pre || pre with the group fused), nats
    values: dict[str, float]

    def to_json(self) -> dict:
        return {"group": list(self.group), "damage": self.damage, **self.values}

    @classmethod
    def from_json(cls, raw: dict) -> GroupPrediction:
        values = {name: value for name, value in raw.items() if name not in ("group", "damage")}
        return cls(tuple(raw["group"]), raw["damage"], values)


@dataclass(frozen=True)
class PredictorLead:
    """A predictor's mean rank correlation over the regions, and its lead over cosine-M with the 95% interval."""
    mean_spearman: float
    lead_over_cosine_m: float
    interval_95: list[float] | None


@dataclass(frozen=True)
class PredictorChoice:
    """choose_predictor's answer: the predictor chosen, from how many regions, every predictor's lead, the rule."""
    chosen: str
    regions: int
    predictors: dict[str, PredictorLead]
    rule: str


def choose_predictor(regions: list[list[GroupPrediction]], seed: int = 0) -> PredictorChoice:
    """The rule of the module doc applied to regions, each a list of groups (as `reffuse experiments` records them
    under predictors.groups). Returns the chosen predictor and, for each predictor, its mean rank correlation over
    the regions and its lead over cosine-M with the interval."""
    target = [np.array([g.damage for g in groups]) for groups in regions]
    cosine = [np.array([g.values["cosine-M"] for g in groups]) for groups in regions]
    table = {}
    for name in PREDICTORS:
        values = [np.array([g.values[name] for g in groups]) for groups in regions]
        # an undefined correlation (None) becomes NaN, and so does its mean over the regions
        correlations = np.array([spearman(v, t) for v, t in zip(values, target)], dtype=np.float64)
        lead = spearman_lead(values, cosine, target, seed)
        table[name] = PredictorLead(float(np.mean(correlations)), lead.lead, lead.interval_95)
    resolved = [name for name, row in table.items()
                if name != "cosine-M" and verdict(row.interval_95, 0.0, ">") == "met"]
    chosen = max(resolved, key=lambda name: table[name].mean_spearman) if resolved else "cosine-M"
    return PredictorChoice(chosen, len(regions), table,
                           "the highest mean rank correlation among the predictors whose lead over cosine-M (mean "
                           "over regions, paired bootstrap over groups) has a 95% interval above 0; cosine-M if "
                           "none has")
