"""The healing study's findings (l)-(o): what each compares, and the rule that turns the numbers into a verdict.

Every comparison is a paired difference of held-out KL(original || model) between two points scored on the same
windows (reffuse.stats.paired_window_sums), formed seed by seed: seed s of one variant against seed s of the other
(the same training windows in the same order; an untrained start, one run, stands beside each). Each
seed's difference has an interval over texts (a t-interval over the held-out texts' own means: windows of one text
are correlated, so the texts are the independent units) and one over windows. A difference is resolved only when
the interval over texts of every seed lies on the same side: a seed is a replication of the healing run, and an
interval over texts alone cannot see how much a run's outcome moves with its seed. A finding whose points are not
all finished, every seed of them, is "pending".

The rules are fixed before the points they judge are run; the report names the commit of this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.experiments.findings import Verdict, decide
from reffuse.experiments.healing.plan import ATTENTION_REMOVED, Budgets
from reffuse.experiments.healing.points import HealingPoint, WindowScores
from reffuse.stats import ClusteredDifference, paired_window_sums, verdict

# (l): "most of the gap" is more than half of it. The gap is the fused model's extra KL over the attention-removed
# model before healing, measured in the same run; a fraction of it, not a number of nats, so that the rule does
# not depend on how large KL happens to be at this scale.
GAP_FRACTION = 0.5


@dataclass(frozen=True)
class Pooled:
    """A point's per-window sums, the mean over its seeds."""
    kl: np.ndarray
    nll: np.ndarray
    agree: np.ndarray
    predictions: np.ndarray
    text: np.ndarray
    seeds: tuple

    @property
    def mean_kl(self) -> float:
        return float(self.kl.sum() / self.predictions.sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.sum() / self.predictions.sum()))

    @property
    def top1(self) -> float:
        return float(self.agree.sum() / self.predictions.sum())

    def kl_interval(self) -> ClusteredDifference:
        """The mean KL with its intervals over windows and over texts (a difference from zero)."""
        return paired_window_sums(self.kl, np.zeros_like(self.kl), self.predictions, self.text)


class Points:
    """The finished held-out points, looked up by variant, objective, budget and seed."""

    def __init__(self, results: list[HealingPoint]):
        self.scores: dict[tuple[str, str, int, int], WindowScores] = {
            (r.point.variant, r.point.objective, r.point.tokens, r.point.seed): r.scores
            for r in results if r.point.split == "held-out"}

    def runs(self, variant: str, objective: str, tokens: int) -> dict[int, WindowScores]:
        """Seed -> scores of the point (budget 0 is the untrained start, seed 0)."""
        key = (variant, "start", 0) if tokens == 0 else (variant, objective, tokens)
        return {seed: s for (v, o, t, seed), s in self.scores.items() if (v, o, t) == key}

    def pooled(self, variant: str, objective: str, tokens: int) -> Pooled | None:
        """The point over every seed that finished (None if none did); budget 0 is the untrained start."""
        runs = self.runs(variant, objective, tokens)
        if not runs:
            return None
        seeds = tuple(sorted(runs))
        first = runs[seeds[0]]
        for seed in seeds[1:]:
            check_same_windows(first, runs[seed], f"{variant}, {objective}, {tokens:,} tokens, seed {seed}")

        def seeds_mean(field: str) -> np.ndarray:
            return np.mean([getattr(runs[s], field) for s in seeds], axis=0)

        return Pooled(seeds_mean("kl"), seeds_mean("nll"), seeds_mean("agree"),
                      np.asarray(first.predictions, dtype=np.float64),
                      np.asarray(first.text), seeds)

    def keys(self) -> list[tuple[str, str, int]]:
        """(variant, objective, tokens) of every finished point, seeds pooled."""
        return sorted({(v, o, t) for v, o, t, _ in self.scores}, key=lambda k: (k[0], k[1], k[2]))


def check_same_windows(x: WindowScores, y: WindowScores, what: str) -> None:
    """Refuse a paired comparison of points scored on different windows."""
    if (x.predictions, x.text, x.texts) != (y.predictions, y.text, y.texts):
        raise ReffuseError(f"{what} was scored on other held-out windows than the point it is paired with: "
                           "score both on the same text (delete its JSON and run the study again)")


@dataclass(frozen=True)
class Seeded:
    """A point's runs by seed, and its name for messages; an untrained start (one run, seed 0) stands for every
    seed of what it is compared with."""
    label: str
    runs: dict
    start: bool = False

    def at(self, seed: int) -> WindowScores:
        return self.runs[0] if self.start else self.runs[seed]

    @property
    def seeds(self) -> tuple:
        return tuple(sorted(self.runs))

    @property
    def mean_kl(self) -> float:
        return float(np.mean([r.mean_kl for r in self.runs.values()]))


def paired_seeds(x: Seeded, y: Seeded) -> tuple:
    """The seeds x - y is formed at: a start's single run pairs with each seed of the other side; two trained
    points pair seed with seed, and must have run the same seeds."""
    if x.start or y.start:
        return y.seeds if x.start else x.seeds
    if x.seeds != y.seeds:
        raise ReffuseError(f"{x.label} ran seeds {x.seeds} and {y.label} seeds {y.seeds}: a seed-by-seed "
                           "comparison needs the same seeds of both")
    return x.seeds


@dataclass(frozen=True)
class Compared:
    """x - y seed by seed, each with its intervals; resolved when every seed's interval over texts agrees."""
    per_seed: dict                     # seed -> ClusteredDifference

    def below(self, threshold: float = 0.0) -> bool:
        """Resolved below the threshold: every seed's interval over texts lies under it."""
        return all(verdict(d.clusters_interval_95, threshold, "<") == "met" for d in self.per_seed.values())

    def above(self, threshold: float = 0.0) -> bool:
        return all(verdict(d.clusters_interval_95, threshold, ">") == "met" for d in self.per_seed.values())

    def describe(self) -> str:
        return "; ".join(f"seed {seed}: {describe_comparison(d)}" for seed, d in self.per_seed.items())


def compare(x: Seeded, y: Seeded, margin: tuple[WindowScores, WindowScores] | None = None,
            scale: float = 0.0) -> Compared:
    """x - y in mean KL, seed by seed on the same windows. With `margin`, two scored points (a, b),
    x - y - scale (a - b) window by window, so that "resolved below 0" reads "x - y resolved below scale (a - b)",
    the margin's own window-to-window spread included."""
    out = {}
    for seed in paired_seeds(x, y):
        a, b = x.at(seed), y.at(seed)
        check_same_windows(a, b, f"{x.label} against {y.label}, seed {seed}")
        y_sums = np.asarray(b.kl, dtype=np.float64)
        if margin is not None:
            for scores in margin:
                check_same_windows(scores, a, f"the margin's points against {x.label}, seed {seed}")
            y_sums = y_sums + scale * (np.asarray(margin[0].kl, dtype=np.float64)
                                       - np.asarray(margin[1].kl, dtype=np.float64))
        out[seed] = paired_window_sums(a.kl, y_sums, a.predictions, a.text)
    return Compared(out)


def describe_comparison(d: ClusteredDifference) -> str:
    t, w = d.clusters_interval_95, d.windows_interval_95
    texts = f"[{t[0]:+.4f}, {t[1]:+.4f}] over {d.clusters} texts" if t else "no interval over texts"
    windows = f"[{w[0]:+.4f}, {w[1]:+.4f}] over {d.windows} windows" if w else "no interval over windows"
    return f"{d.mean:+.4f} nats ({texts}; {windows})"


def seeds_note(**runs: Seeded) -> str:
    return "; ".join(f"{label}: mean KL " + ", ".join(f"{r.mean_kl:.4f} (seed {s})" for s, r in sorted(p.runs.items()))
                     for label, p in runs.items())


def pending(finding: str, title: str, paper: str, rule: str, missing: list[str]) -> Verdict:
    return Verdict(finding, title, paper=paper, here="not all of its points have run", rule=rule,
                   verdict="pending", note="missing: " + "; ".join(missing))


def gathered(points: Points, wanted: dict, budgets: Budgets) -> tuple[dict, list[str]]:
    """The points named in `wanted` (label -> (variant, objective, tokens)) by seed, and what is missing: a point
    is missing until every seed the plan runs it with has finished (Budgets.seeds_of)."""
    found, missing = {}, []
    for label, (variant, objective, tokens) in wanted.items():
        runs = points.runs(variant, objective, tokens)
        needed = (0,) if tokens == 0 else budgets.seeds_of(variant, objective, tokens)
        absent = [seed for seed in needed if seed not in runs]
        if absent:
            missing.append(f"{label} ({variant}, {objective}, {tokens:,} tokens, seed "
                           f"{', '.join(map(str, absent))})")
        else:
            found[label] = Seeded(variant if tokens else f"{variant} (start)",
                                  {seed: runs[seed] for seed in needed}, start=tokens == 0)
    return found, missing


def pairs_at_largest_budget(finding: str, title: str, paper: str, rule: str, pairs, points: Points,
                            budgets: Budgets) -> Verdict:
    """A finding over pairs (x, y) of variants distilled (kd) on the largest budget, each judged by x's KL minus
    y's: held if x is resolved below in every pair, partly held if in some and y below in none, did not hold if y
    is resolved below in some and x in none, else not resolved."""
    wanted = {name: (name, "kd", max(budgets.kd)) for pair in pairs for name in pair}
    p, missing = gathered(points, wanted, budgets)
    if missing:
        return pending(finding, title, paper, rule, missing)
    diffs = [compare(p[x], p[y]) for x, y in pairs]
    here = "; ".join(f"{x} - {y}: {d.describe()}" for (x, y), d in zip(pairs, diffs))
    lows, highs = sum(d.below() for d in diffs), sum(d.above() for d in diffs)
    return Verdict(finding, title, paper=paper, here=here, rule=rule,
                   verdict=decide(lows == len(diffs), lows > 0 and highs == 0, highs > 0 and lows == 0),
                   note=seeds_note(**p))


# ---------------------------------------------------------------------------------------------------------------
# (l) healing closes most of the fusion gap


def gap_closed(points: Points, budgets: Budgets) -> Verdict:
    largest = max(budgets.kd)
    paper = ("a fused model, healed by distillation, keeps the quality of the model it came from (§3, §4: the "
             "fused 253B model is distilled on tens of billions of tokens)")
    rule = (f"at {largest:,} tokens of distillation: held if the 4-step fused model's held-out KL minus the "
            f"attention-removed model's, both healed, is resolved below {GAP_FRACTION} x the same difference "
            "before healing, for every seed (the interval over texts of healed difference minus "
            f"{GAP_FRACTION} x the unhealed one, window by window, lies below 0); did not hold if resolved above "
            "for every seed; else not resolved, and not resolved if the fused model is not above the "
            "attention-removed one before healing (no gap to close). The 1-step model is reported, not judged")
    wanted = {"fused": ("fused, 4 steps", "kd", largest), "removed": (ATTENTION_REMOVED, "kd", largest),
              "fused0": ("fused, 4 steps", "start", 0), "removed0": (ATTENTION_REMOVED, "start", 0)}
    p, missing = gathered(points, wanted, budgets)
    title = "healing closes most of the fusion gap"
    if missing:
        return pending("l", title, paper, rule, missing)
    gap = p["fused0"].mean_kl - p["removed0"].mean_kl
    if gap <= 0:
        return Verdict("l", title, paper=paper, rule=rule, verdict="not resolved",
                       here=f"before healing the fused model is {gap:+.4f} nats from the attention-removed model",
                       note="no fusion gap to close: the rule measures nothing here")
    d = compare(p["fused"], p["removed"], (p["fused0"].at(0), p["removed0"].at(0)), GAP_FRACTION)
    here = (f"before healing the fused model is {gap:+.4f} nats above the attention-removed model; after "
            f"{largest:,} tokens, healed difference minus {GAP_FRACTION} x that gap ({GAP_FRACTION * gap:+.4f} over "
            f"all windows): {d.describe()}; the healed difference itself: "
            f"{compare(p['fused'], p['removed']).describe()}")
    one, _ = gathered(points, {"one": ("fused, 1 step", "kd", largest), "one0": ("fused, 1 step", "start", 0)},
                      budgets)
    if len(one) == 2:
        here += (f"; 1 step: {one['one0'].mean_kl - p['removed0'].mean_kl:+.4f} before, "
                 f"{compare(one['one'], p['removed']).describe()} after")
    return Verdict("l", title, paper=paper, here=here, rule=rule, verdict=decide(d.below(), against=d.above()),
                   note=seeds_note(fused=p["fused"], removed=p["removed"]))


# ---------------------------------------------------------------------------------------------------------------
# (m) at an equal healing budget, fusion beats FFN removal at equal latency


def fusion_vs_removal(points: Points, budgets: Budgets) -> Verdict:
    largest = max(budgets.kd)
    paper = ("at a similar latency, fusion keeps more accuracy than removing FFNs (§4.2, removal vs fusion; the "
             "paper's models are healed before they are compared)")
    rule = (f"at {largest:,} tokens of distillation, the same trainable set (the region's FFNs): held if the fused "
            "model's KL is resolved below its matched removal's for both pairs (4 steps vs 3 FFNs removed, 1 step "
            "vs 6 removed: equal sequential FFN steps, and the nearest modelled latency); partly held if for one "
            "and removal is resolved below for neither; did not hold if removal is resolved below for some pair "
            "and fusion for none; else not resolved. Resolved: for every seed")
    pairs = (("fused, 4 steps", "3 FFNs removed"), ("fused, 1 step", "6 FFNs removed"))
    return pairs_at_largest_budget("m", "healed fusion vs healed FFN removal", paper, rule, pairs, points, budgets)


# ---------------------------------------------------------------------------------------------------------------
# (n) global distillation beats the local objective at equal tokens


def global_vs_local(points: Points, budgets: Budgets) -> Verdict:
    common = sorted(set(budgets.kd) & set(budgets.local))
    largest = budgets.compared
    paper = ("the paper heals with knowledge distillation of the whole model's outputs (§3); a local objective, "
             "each fused FFN fitted to the sequential run's update, is the cheap alternative")
    rule = (f"the 4-step fused model with its fused block trained, at {largest:,} tokens of each objective: held if "
            "global distillation's KL is resolved below local distillation's for every seed; did not hold if "
            "resolved above for every seed; else not resolved. The other budgets, and local distillation at 4x "
            "the tokens, are reported")
    wanted = {"global": ("fused, 4 steps", "kd-fused", largest), "local": ("fused, 4 steps", "local", largest)}
    p, missing = gathered(points, wanted, budgets)
    if missing:
        return pending("n", "global vs local distillation", paper, rule, missing)
    d = compare(p["global"], p["local"])
    here = [f"{largest:,} tokens: global - local, {d.describe()}"]
    for tokens in common[:-1]:
        q, _ = gathered(points, {"global": ("fused, 4 steps", "kd-fused", tokens),
                                 "local": ("fused, 4 steps", "local", tokens)}, budgets)
        if len(q) == 2:
            here.append(f"{tokens:,}: {compare(q['global'], q['local']).describe()}")
    if max(budgets.local) > largest:
        q, _ = gathered(points, {"local": ("fused, 4 steps", "local", max(budgets.local))}, budgets)
        if q:
            here.append(f"global at {largest:,} - local at {max(budgets.local):,}: "
                        f"{compare(Seeded('global', {0: p['global'].at(0)}), q['local']).describe()}")
    return Verdict("n", "global vs local distillation", paper=paper, here="; ".join(here), rule=rule,
                   verdict=decide(d.below(), against=d.above()), note=seeds_note(**p))


# ---------------------------------------------------------------------------------------------------------------
# (o) the calibrated refit is a better starting point than plain fusion


def refit_start(points: Points, budgets: Budgets) -> Verdict:
    largest = max(budgets.kd)
    paper = "the paper heals plainly fused models; reffuse's closed-form refit is an alternative starting point"
    rule = (f"at {largest:,} tokens of distillation: held if the refitted model's KL is resolved below the plainly "
            "fused model's for both 4 steps and 1 step; partly held if for one and plain fusion is resolved below "
            "for neither; did not hold if plain fusion is resolved below for some and the refit for none; else not "
            "resolved. Resolved: for every seed")
    pairs = (("fused, 4 steps, refit", "fused, 4 steps"), ("fused, 1 step, refit", "fused, 1 step"))
    return pairs_at_largest_budget("o", "the refit as a starting point", paper, rule, pairs, points, budgets)


FINDINGS = (gap_closed, fusion_vs_removal, global_vs_local, refit_start)


def verdicts(results: list[HealingPoint], budgets: Budgets) -> list[Verdict]:
    points = Points(results)
    return [finding(points, budgets) for finding in FINDINGS]
