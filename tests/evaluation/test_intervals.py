"""Paired differences with their intervals (reffuse.stats.paired_difference) and their text
(reffuse.evaluation.intervals.describe)."""

import numpy as np
import pytest

from reffuse.errors import ReffuseError
from reffuse.evaluation.intervals import describe
from reffuse.stats import MIN_BOOTSTRAP_WINDOWS, RESAMPLES, TOKEN_BLOCK, paired_difference, t_quantile


def windows(rng, shift=0.0, n=8, length=100):
    return [rng.gamma(2.0, 0.05, length) + shift for _ in range(n)]


def test_a_clear_difference_is_resolved_with_its_sign_and_count():
    rng = np.random.default_rng(0)
    y = windows(rng)
    x = [w + 0.05 + 0.01 * rng.standard_normal(w.size) for w in y]
    d = paired_difference(x, y)
    assert d.resolved and d.sign == 1 and d.x_below_y_windows == 0 and d.windows == 8
    assert d.mean == pytest.approx(np.concatenate(x).mean() - np.concatenate(y).mean())
    for low, high in (d.windows_interval_95, d.tokens_interval_95):
        assert 0 < low < d.mean < high
    assert "not resolved" not in describe(d)


def test_noise_alone_is_not_resolved():
    rng = np.random.default_rng(2)  # (one seed in twenty resolves noise: that is what 95% means)
    x, y = windows(rng), windows(rng)
    d = paired_difference(x, y)
    assert not d.resolved and d.sign == 0 and describe(d).endswith("not resolved")


def test_the_window_interval_by_hand():
    """From enough windows, the interval over windows is the percentile interval of the pooled mean over
    resampled windows."""
    n = MIN_BOOTSTRAP_WINDOWS
    rng = np.random.default_rng(2)
    x, y = windows(rng, n=n, length=40), windows(rng, n=n, length=40)
    d = paired_difference(x, y, seed=3)
    draws = np.random.default_rng(3).integers(0, n, (RESAMPLES, n))
    diffs = [a - b for a, b in zip(x, y)]
    means = [sum(diffs[i].sum() for i in row) / sum(diffs[i].size for i in row) for row in draws]
    assert d.windows_interval_95 == pytest.approx(list(np.quantile(means, [0.025, 0.975])))
    assert d.windows_interval == "bootstrap" and "(t)" not in describe(d)
    assert TOKEN_BLOCK == 32


def test_few_windows_get_a_t_interval_over_their_means():
    """Below MIN_BOOTSTRAP_WINDOWS windows: mean ± t_0.975,n-1 · s / √n of the windows' own mean differences,
    wider than the bootstrap of so few windows, and the text says so."""
    rng = np.random.default_rng(2)
    x, y = windows(rng, n=5, length=40), windows(rng, n=5, length=40)
    d = paired_difference(x, y, seed=3)
    means = np.array([(a - b).mean() for a, b in zip(x, y)])
    half = t_quantile(0.975, 4) * means.std(ddof=1) / np.sqrt(5)
    assert d.windows_interval == "t"
    assert d.windows_interval_95 == pytest.approx([means.mean() - half, means.mean() + half])
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert " over windows (t), " in describe(d)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ReffuseError, match="same windows"):
        paired_difference([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ReffuseError, match="same windows"):
        paired_difference([], [])
