"""Paired comparisons of two variants scored on the same held-out predictions, with their uncertainty.

Both variants predict the same tokens, so what is compared is the per-prediction difference d = x - y (x, y:
KL to the reference, or negative log-likelihood), and its mean is the difference of the two reported means. Two
95% intervals of that mean, each a percentile bootstrap of RESAMPLES draws with a fixed seed (so a rule applied
twice to the same JSON gives the same verdict):

- over windows: whole held-out windows resampled with replacement, the mean taken over the drawn windows'
  predictions; with the sign count, in how many windows x is below y;
- over tokens: a block bootstrap, the predictions of every window cut into blocks of TOKEN_BLOCK consecutive ones
  (neighbouring tokens are not independent; blocks keep most of that dependence) and blocks resampled.

A difference is resolved when both intervals exclude 0; otherwise the data do not say which variant is better.
"""

from __future__ import annotations

import math

import numpy as np

from reffuse.errors import ReffuseError

RESAMPLES = 2000
TOKEN_BLOCK = 32
CONFIDENCE = 0.95


def _percentile_interval(draws: np.ndarray) -> list[float]:
    tail = (1 - CONFIDENCE) / 2
    return [float(q) for q in np.quantile(draws, [tail, 1 - tail])]


def paired_difference(x_windows, y_windows, seed: int = 0) -> dict:
    """The mean of x - y over all predictions, its two 95% intervals and the sign count (see the module doc).

    x_windows, y_windows: one sequence of per-prediction values per held-out window, the same lengths for both.
    """
    x = [np.asarray(w, dtype=np.float64) for w in x_windows]
    y = [np.asarray(w, dtype=np.float64) for w in y_windows]
    if len(x) != len(y) or any(a.shape != b.shape for a, b in zip(x, y)) or not x:
        raise ReffuseError("a paired comparison needs both variants scored on the same windows, "
                           f"got {[len(a) for a in x]} and {[len(b) for b in y]} predictions per window")
    d = [a - b for a, b in zip(x, y)]
    sums, counts = np.array([w.sum() for w in d]), np.array([w.size for w in d])
    rng = np.random.default_rng(seed)

    drawn = rng.integers(0, len(d), (RESAMPLES, len(d)))                       # windows, with replacement
    by_windows = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)

    blocks = [w[i:i + TOKEN_BLOCK] for w in d for i in range(0, w.size, TOKEN_BLOCK)]
    block_sums, block_counts = np.array([b.sum() for b in blocks]), np.array([b.size for b in blocks])
    drawn = rng.integers(0, len(blocks), (RESAMPLES, len(blocks)))
    by_tokens = block_sums[drawn].sum(axis=1) / block_counts[drawn].sum(axis=1)

    windows, tokens = _percentile_interval(by_windows), _percentile_interval(by_tokens)
    resolved = all(low > 0 or high < 0 for low, high in (windows, tokens))
    return {"mean": float(sums.sum() / counts.sum()), "windows_interval_95": windows, "tokens_interval_95": tokens,
            "x_below_y_windows": int((sums < 0).sum()), "windows": len(d), "resolved": resolved,
            "sign": int(np.sign(sums.sum())) if resolved else 0}


def describe(diff: dict) -> str:
    """'+0.0123 [+0.0050, +0.0190] over windows, [+0.0061, +0.0180] over tokens, lower in 2/8 windows', the
    numbers to three significant digits of the largest of them."""
    w, t = diff["windows_interval_95"], diff["tokens_interval_95"]
    largest = max(abs(v) for v in [diff["mean"], *w, *t])

    def number(v):
        if largest < 1e-3:
            return f"{v:+.2e}"
        return f"{v:+.{max(0, 2 - math.floor(math.log10(largest)))}f}"

    return (f"{number(diff['mean'])} [{number(w[0])}, {number(w[1])}] over windows, [{number(t[0])}, {number(t[1])}] "
            f"over tokens, lower in {diff['x_below_y_windows']}/{diff['windows']} windows"
            + ("" if diff["resolved"] else ", not resolved"))
