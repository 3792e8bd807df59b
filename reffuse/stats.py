"""The statistics every result of reffuse is judged by, in one place: one seeded percentile bootstrap, the paired
comparisons built on it, a Student t interval for few units, Spearman's rank correlation and the lead of one rank
correlation over another, and one rule (verdict) that says whether an interval lies on a side of a threshold.

Every interval is a 95% interval (CONFIDENCE). A bootstrap draws RESAMPLES resamples from a fixed seed, so a rule
applied twice to the same numbers gives the same interval and the same verdict.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.records import FlatRecord

CONFIDENCE = 0.95
RESAMPLES = 2000
TOKEN_BLOCK = 32   # predictions per block of paired_difference's interval over tokens
# Fewer pairs than this give no 95% interval for a median: all n ratios fall on one side of the true median with
# probability 2 / 2^n, so even the span from the smallest to the largest covers it only 1 - 2 / 2^n of the time
# (75% for 3 pairs, 94% for 5, 97% for 6).
MIN_PAIRS = 6
# Fewer windows than this get a t-interval over the windows' own means instead of a bootstrap over windows: a
# percentile bootstrap of few units is too narrow (with 8 windows it covered about 90% of the time, not 95%, when
# the 64 windows of a larger run were subsampled).
MIN_BOOTSTRAP_WINDOWS = 20

SIDES = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def verdict(interval, threshold: float, side: str) -> str:
    """Where an interval [low, high] lies against the claim `value <side> threshold` (side ">", ">=", "<" or
    "<="): "met" when every value of the interval satisfies the claim, "not met" when none does, "unresolved"
    when it holds values of both kinds or there is no interval (None).

    A strict side suits a difference that must exclude its threshold (x - y > 0); a closed one a target that its
    threshold meets (a time ratio of at most 0.8). The claim holds on a half-line, so the two ends decide."""
    if interval is None:
        return "unresolved"
    holds = [SIDES[side](bound, threshold) for bound in interval]
    return "met" if all(holds) else "not met" if not any(holds) else "unresolved"


def excludes(interval, value: float) -> bool:
    """The interval lies wholly above or wholly below value: a difference from value is resolved."""
    return any(verdict(interval, value, side) == "met" for side in (">", "<"))


# ---------------------------------------------------------------------------------------------------------------
# The bootstrap and the paired comparisons


def bootstrap(statistic, *sizes: int, seed: int | np.random.Generator = 0) -> list[float] | None:
    """The percentile-bootstrap 95% interval [q_α/2, q_1-α/2] of a statistic, α = 1 - CONFIDENCE, None when no
    resample defines it.

    Each of RESAMPLES resamples draws, with replacement, as many units from every one of the independent sets
    whose sizes are `sizes` (one set usually; one per stratum for a stratified bootstrap): statistic(*indices)
    gets the drawn indices of each set as an integer array [RESAMPLES, size] and returns one value per resample,
    None or NaN where the statistic is undefined (those resamples are left out). The quantiles are NumPy's
    linear ones. A Generator as seed continues its stream (two intervals from one seed)."""
    rng = np.random.default_rng(seed)
    indices = [rng.integers(0, size, (RESAMPLES, size)) for size in sizes]
    values = np.asarray(statistic(*indices), dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    tail = (1 - CONFIDENCE) / 2
    return [float(q) for q in np.quantile(values, [tail, 1 - tail])]


def _pooled_mean_interval(sums: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[float]:
    """The bootstrap interval of Σ sums / Σ counts over units resampled with replacement (a cluster bootstrap of
    the mean: each unit brings the sum and the count of its values)."""
    return bootstrap(lambda drawn: sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1), sums.size, seed=rng)


@dataclass(frozen=True)
class PairedDifference(FlatRecord):
    """paired_difference's answer: the mean of x - y, its two 95% intervals (each [low, high], or None where it
    cannot be formed), which interval over windows it is ("bootstrap" or "t"), the sign count, and whether the
    data say which variant is lower (resolved, and then sign, -1 or +1; else 0)."""
    mean: float
    windows_interval_95: list[float] | None
    windows_interval: str
    tokens_interval_95: list[float] | None
    x_below_y_windows: int
    windows: int
    resolved: bool
    sign: int

    @property
    def lower(self) -> bool:
        """x resolved below y."""
        return self.resolved and self.mean < 0

    @property
    def higher(self) -> bool:
        """x resolved above y."""
        return self.resolved and self.mean > 0


def paired_difference(x_windows, y_windows, seed: int = 0) -> PairedDifference:
    """The mean of d = x - y over all predictions of two variants scored on the same held-out windows, with two
    95% intervals of that mean and the sign count.

    x_windows, y_windows: one sequence of per-prediction values (KL, negative log-likelihood) per window, the same
    lengths for both. The intervals, from one seeded stream:
    - over windows: whole windows resampled, the mean Σ_drawn Σ d / Σ_drawn count; from fewer than
      MIN_BOOTSTRAP_WINDOWS windows instead the t-interval over the windows' own means Σ d / count (t_interval);
      windows_interval names which ("bootstrap" or "t"); x_below_y_windows counts the windows whose Σ d is
      below 0;
    - over tokens: a block bootstrap, each window's predictions cut into blocks of TOKEN_BLOCK consecutive ones
      (neighbouring tokens are not independent; blocks keep most of that dependence), blocks resampled.
    Resolved when both intervals exclude 0 (otherwise the data do not say which variant is better); the sign is
    then the sign of the mean, else 0."""
    x = [np.asarray(w, dtype=np.float64) for w in x_windows]
    y = [np.asarray(w, dtype=np.float64) for w in y_windows]
    if len(x) != len(y) or any(a.shape != b.shape for a, b in zip(x, y)) or not x:
        raise ReffuseError("a paired comparison needs both variants scored on the same windows, "
                           f"got {[len(a) for a in x]} and {[len(b) for b in y]} predictions per window")
    d = [a - b for a, b in zip(x, y)]
    sums, counts = np.array([w.sum() for w in d]), np.array([w.size for w in d])
    blocks = [w[i:i + TOKEN_BLOCK] for w in d for i in range(0, w.size, TOKEN_BLOCK)]
    rng = np.random.default_rng(seed)
    method = "bootstrap" if len(d) >= MIN_BOOTSTRAP_WINDOWS else "t"
    windows = _pooled_mean_interval(sums, counts, rng) if method == "bootstrap" else t_interval(sums / counts)
    tokens = _pooled_mean_interval(np.array([b.sum() for b in blocks]), np.array([b.size for b in blocks]), rng)
    resolved = excludes(windows, 0.0) and excludes(tokens, 0.0)
    return PairedDifference(mean=float(sums.sum() / counts.sum()), windows_interval_95=windows,
                            windows_interval=method, tokens_interval_95=tokens,
                            x_below_y_windows=int((sums < 0).sum()), windows=len(d), resolved=resolved,
                            sign=int(np.sign(sums.sum())) if resolved else 0)


@dataclass(frozen=True)
class ClusteredDifference(FlatRecord):
    """paired_window_sums's answer: the mean of x - y and its 95% intervals over windows and over clusters."""
    mean: float
    windows_interval_95: list[float] | None
    clusters_interval_95: list[float] | None
    windows: int
    clusters: int


def paired_window_sums(x_sums, y_sums, counts, clusters, seed: int = 0) -> ClusteredDifference:
    """The mean of d = x - y over all predictions of two variants scored on the same windows, from per-window
    sums (Σ over a window's predictions of x and of y, and their count), with two 95% intervals:
    - windows_interval_95: whole windows resampled, Σ_drawn Σ d / Σ_drawn count (a cluster bootstrap);
    - clusters_interval_95: a t-interval over the clusters' own means Σ d / count (the windows of one text
      are correlated, so its texts are the independent units; few units, hence t, not a bootstrap). It is
      centred on the clusters' unweighted mean, not on `mean`, which weighs each prediction alike.
    Either is None where it cannot be formed (fewer than 2 clusters)."""
    d = np.asarray(x_sums, dtype=np.float64) - np.asarray(y_sums, dtype=np.float64)
    counts, clusters = np.asarray(counts, dtype=np.float64), np.asarray(clusters)
    if not (d.shape == counts.shape == clusters.shape) or not d.size:
        raise ReffuseError("a paired comparison needs both variants scored on the same windows, "
                           f"got {d.shape} sums for {counts.shape} windows")
    labels = list(dict.fromkeys(clusters.tolist()))
    per_cluster = [d[clusters == c].sum() / counts[clusters == c].sum() for c in labels]
    return ClusteredDifference(mean=float(d.sum() / counts.sum()),
                               windows_interval_95=_pooled_mean_interval(d, counts, np.random.default_rng(seed)),
                               clusters_interval_95=t_interval(per_cluster), windows=int(d.size),
                               clusters=len(labels))


@dataclass(frozen=True)
class PairedRatio(FlatRecord):
    """paired_ratio's answer: the ratio of the medians, its 95% interval (None from too few pairs), the number of
    pairs, and whether the interval excludes 1."""
    median: float
    interval_95: list[float] | None
    repeats: int
    resolved: bool


def paired_ratio(numerator, denominator, seed: int = 0) -> PairedRatio:
    """The ratio of the medians, median(numerator) / median(denominator), with the bootstrap 95% interval of that
    ratio, the repeats resampled as pairs (repeat i of both together, so that a load shared by a pair stays
    shared); resolved when the interval excludes 1. With fewer than MIN_PAIRS pairs the interval is
    None and nothing is resolved.

    The ratio of the medians is the ratio of the rates printed beside it (tokens / median seconds), so the two
    never disagree; the median of the per-pair ratios can lie on the other side of 1. The interval holds the
    ratio unless fewer than 2.5% of the resamples fall on one side of it; with 6 to 8 pairs, however their ranks
    pair up, at least 11% of these resamples keep the numerator's median at or above its own and the
    denominator's at or below, and as many the other way round."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if numerator.shape != denominator.shape or numerator.ndim != 1:
        raise ReffuseError(f"a paired ratio needs two equally long series of repeats, got {numerator.shape} and "
                           f"{denominator.shape}")
    interval = (bootstrap(lambda drawn: np.median(numerator[drawn], axis=1) / np.median(denominator[drawn], axis=1),
                          numerator.size, seed=seed) if numerator.size >= MIN_PAIRS else None)
    return PairedRatio(median=float(np.median(numerator) / np.median(denominator)), interval_95=interval,
                       repeats=int(numerator.size), resolved=excludes(interval, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Student's t, for a mean over few units


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), from its continued fraction
    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d_1 / (1 + d_2 / (1 + ...))), with
    d_2m = m (b-m) x / ((a+2m-1)(a+2m)) and d_2m+1 = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)), evaluated by Lentz's
    method. The fraction converges fast for x < (a+1)/(a+b+2); above, I_x(a, b) = 1 - I_1-x(b, a)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)

    def coefficient(k: int) -> float:
        m = k // 2
        if k % 2 == 0:
            return m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))

    tiny = 1e-300  # stands in for a zero denominator
    fraction, c, d = 1.0, 1.0, 0.0
    for k in range(1, 1000):
        step = coefficient(k)
        d = 1.0 + step * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + step / c
        c = c if abs(c) > tiny else tiny
        fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) / (a * fraction)


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t distribution with dof degrees of freedom: the t with F(t) = p, by bisection on
    F(t) = 1 - I_dof/(dof+t²)(dof/2, 1/2) / 2 for t >= 0 (and F(-t) = 1 - F(t)), I the regularized incomplete
    beta function. NumPy has no t distribution, and reffuse needs no SciPy."""
    if not 0.0 < p < 1.0 or dof <= 0:
        raise ReffuseError(f"a t quantile needs 0 < p < 1 and dof > 0, got p={p}, dof={dof}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)

    def cdf(t: float) -> float:
        return 1.0 - 0.5 * _incomplete_beta(dof / (dof + t * t), dof / 2, 0.5)

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    middle = (low + high) / 2
    while low < middle < high:  # until the bracket is as narrow as floating point allows
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
        middle = (low + high) / 2
    return middle


def t_interval(values) -> list[float] | None:
    """The 95% interval of a mean over few units, mean ± t_(1+c)/2, n-1 · s / √n (c = CONFIDENCE, s the standard
    deviation with n - 1 in its denominator): exact for normally distributed units, where a bootstrap of a few
    units is too narrow. None for fewer than 2 values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    half = t_quantile((1 + CONFIDENCE) / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return [float(values.mean() - half), float(values.mean() + half)]


# ---------------------------------------------------------------------------------------------------------------
# Rank correlation


def ranks(values) -> np.ndarray:
    """The ranks 1..n of values along their last axis (each row of a 2-D array ranked on its own), tied values
    given the mean of the ranks they share (two values in ranks 2 and 3 both get 2.5), as Spearman's correlation
    ranks them."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    flat = values.reshape(-1)
    row = np.arange(flat.size) // n
    order = np.lexsort((flat, row))                                      # by row, then by value
    ordered, ordered_row = flat[order], row[order]
    # where each run of equal values of one row begins
    starts = np.flatnonzero(np.r_[True, (ordered[1:] != ordered[:-1]) | (ordered_row[1:] != ordered_row[:-1])])
    ends = np.r_[starts[1:], flat.size]
    result = np.empty(flat.size)
    # the mean of ranks start+1 .. end, counted from the start of the row
    result[order] = np.repeat((starts + 1 + ends) / 2 - ordered_row[starts] * n, ends - starts)
    return result.reshape(values.shape)


def spearman(a, b) -> float | None:
    """Spearman's rank correlation of two equally long sequences, Pearson's correlation of their ranks r, s:
    ρ = Σ (r_i - r̄)(s_i - s̄) / √(Σ (r_i - r̄)² · Σ (s_i - s̄)²). None where it is undefined: fewer than 3
    pairs, or a sequence whose values are all equal (it ranks nothing)."""
    if len(a) != len(b):
        raise ReffuseError(f"a rank correlation needs two sequences of one length, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return None
    r, s = ranks(a), ranks(b)
    if r.min() == r.max() or s.min() == s.max():
        return None
    r, s = r - r.mean(), s - s.mean()
    return float(np.dot(r, s) / math.sqrt(np.dot(r, r) * np.dot(s, s)))


def resampled_spearman(a, b, drawn: np.ndarray) -> np.ndarray:
    """spearman(a, b) on every resample of the pairs, each row of drawn the indices of one, as a bootstrap
    statistic: NaN where it is undefined, so that bootstrap leaves that resample out. All rows at once: Pearson's
    correlation of each row's ranks."""
    drawn = np.asarray(drawn)
    if drawn.shape[-1] < 3:
        return np.full(drawn.shape[0], np.nan)
    r, s = (ranks(np.asarray(v, dtype=np.float64)[drawn]) for v in (a, b))
    r, s = r - r.mean(axis=1, keepdims=True), s - s.mean(axis=1, keepdims=True)
    scale = np.sqrt(np.sum(r * r, axis=1) * np.sum(s * s, axis=1))
    # a row whose ranks are all equal (a value drawn n times) ranks nothing: NaN
    return np.where(scale > 0, np.sum(r * s, axis=1) / np.where(scale > 0, scale, 1.0), np.nan)


def spearman_interval(a, b, seed: int = 0) -> list[float] | None:
    """The bootstrap 95% interval of spearman(a, b), the pairs resampled together; resamples where ρ is undefined
    are left out, and None when all are."""
    return bootstrap(lambda drawn: resampled_spearman(a, b, drawn), len(a), seed=seed)


@dataclass(frozen=True)
class RankLead(FlatRecord):
    """spearman_lead's answer: the mean lead of one rank correlation over another and its 95% interval."""
    lead: float
    interval_95: list[float] | None


def spearman_lead(a_sets, b_sets, targets, seed: int = 0) -> RankLead:
    """How much better a ranks the target than b does: spearman(a, t) - spearman(b, t), averaged over independent
    sets (regions, each a sequence of a values, of b values and of targets over the same units), with its paired
    bootstrap 95% interval (every set's units resampled, the same draw for a and b). A lead whose interval lies
    above 0 is resolved."""
    a_sets, b_sets, targets = ([np.asarray(v, dtype=np.float64) for v in sets] for sets in (a_sets, b_sets, targets))
    # an undefined correlation (None) becomes NaN, and so does the lead
    leads = [np.float64(spearman(a, t)) - np.float64(spearman(b, t)) for a, b, t in zip(a_sets, b_sets, targets)]

    def mean_lead(*drawn):  # the lead averaged over the sets, on each resample of every set's units
        return sum(resampled_spearman(a, t, d) - resampled_spearman(b, t, d)
                   for a, b, t, d in zip(a_sets, b_sets, targets, drawn)) / len(targets)

    return RankLead(lead=float(np.mean(np.asarray(leads, dtype=np.float64))),
                    interval_95=bootstrap(mean_lead, *(t.size for t in targets), seed=seed))
