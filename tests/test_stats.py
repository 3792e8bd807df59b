"""The statistics module (reffuse.stats): the verdict rule, the seeded bootstrap and the paired comparisons, the
Student t quantile and interval, and the rank correlation."""

import math

import numpy as np
import pytest

from reffuse.errors import ReffuseError
from reffuse.stats import (MIN_PAIRS, RESAMPLES, bootstrap, excludes, paired_ratio, ranks, resampled_spearman,
                           spearman, spearman_interval, t_interval, t_quantile, verdict)


# verdict


def test_a_closed_side_counts_its_threshold_and_a_strict_one_does_not():
    assert verdict([0.7, 0.8], 0.8, "<=") == "met"
    assert verdict([0.7, 0.8], 0.8, "<") == "unresolved"
    assert verdict([0.0, 1.0], 0.0, ">=") == "met"
    assert verdict([0.0, 1.0], 0.0, ">") == "unresolved"
    assert verdict([-1.0, 0.0], 0.0, ">") == "not met"


def test_an_interval_across_the_threshold_or_none_is_unresolved():
    assert verdict([0.79, 0.81], 0.8, "<=") == "unresolved"
    assert verdict([2.4, 2.49], 2.5, ">=") == "not met"
    assert verdict([2.5, 2.7], 2.5, ">=") == "met"
    assert verdict(None, 2.5, ">=") == "unresolved"


def test_excludes_asks_for_the_whole_interval_strictly_on_one_side():
    assert excludes([0.1, 0.2], 0.0) and excludes([-0.2, -0.1], 0.0)
    assert not excludes([-0.1, 0.2], 0.0) and not excludes([0.0, 0.2], 0.0) and not excludes(None, 0.0)


# bootstrap


def test_the_bootstrap_is_the_percentile_interval_of_seeded_draws():
    values = np.random.default_rng(1).gamma(2.0, 1.0, 12)
    interval = bootstrap(lambda drawn: values[drawn].mean(axis=1), values.size, seed=3)
    drawn = np.random.default_rng(3).integers(0, values.size, (RESAMPLES, values.size))
    assert interval == pytest.approx(list(np.quantile(values[drawn].mean(axis=1), [0.025, 0.975])))
    assert interval == bootstrap(lambda drawn: values[drawn].mean(axis=1), values.size, seed=3)  # same seed


def test_strata_are_drawn_in_order_from_one_stream_and_a_generator_continues_it():
    seen = []
    bootstrap(lambda a, b: seen.extend([a, b]) or a[:, 0], 3, 5, seed=0)
    rng = np.random.default_rng(0)
    assert (seen[0] == rng.integers(0, 3, (RESAMPLES, 3))).all() and seen[0].shape == (RESAMPLES, 3)
    assert (seen[1] == rng.integers(0, 5, (RESAMPLES, 5))).all()
    stream = np.random.default_rng(0)
    first = bootstrap(lambda d: d[:, 0], 3, seed=stream)
    second = bootstrap(lambda d: d[:, 0], 5, seed=stream)
    assert first == bootstrap(lambda d: d[:, 0], 3, seed=0)
    assert second == pytest.approx(list(np.quantile(seen[1][:, 0], [0.025, 0.975])))


def test_undefined_resamples_are_left_out_and_none_defined_gives_no_interval():
    assert bootstrap(lambda drawn: [None] * len(drawn), 4) is None
    half = bootstrap(lambda drawn: np.where(np.arange(len(drawn)) % 2, np.nan, 1.0), 4)
    assert half == [1.0, 1.0]


# paired ratio


def test_a_paired_ratio_is_the_ratio_of_medians_with_a_bootstrap_of_resampled_pairs():
    numerator, denominator = [1.2, 1.25, 1.21, 1.3, 1.22, 1.24, 1.23], [1.0, 1.01, 0.99, 1.0, 1.02, 1.0, 0.98]
    ratio = paired_ratio(numerator, denominator)
    drawn = np.random.default_rng(0).integers(0, 7, (RESAMPLES, 7))  # the repeats drawn as pairs
    ratios = np.median(np.array(numerator)[drawn], axis=1) / np.median(np.array(denominator)[drawn], axis=1)
    assert ratio.interval_95 == pytest.approx(list(np.quantile(ratios, [0.025, 0.975])))
    assert ratio.median == pytest.approx(np.median(numerator) / np.median(denominator))
    assert ratio.resolved and ratio.repeats == 7


def test_a_paired_ratio_agrees_with_the_medians_where_the_median_of_pair_ratios_does_not():
    numerator = [0.7, 0.5, 1.2, 1.2, 0.7, 0.8, 1.4]
    denominator = [0.6, 1.4, 1.0, 1.0, 0.8, 1.0, 1.1]
    assert np.median(np.divide(numerator, denominator)) > 1.1  # the pairs' own ratios say "numerator slower"
    ratio = paired_ratio(numerator, denominator)
    assert ratio.median == pytest.approx(0.8 / 1.0)  # the medians, as rates printed from them say: faster
    low, high = ratio.interval_95
    assert low <= ratio.median <= high


def test_a_paired_ratio_lies_inside_its_interval_on_noisy_repeats():
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(6, 12))
        load = rng.lognormal(0, 0.3, n)  # shared by a pair
        numerator, denominator = load * rng.lognormal(0, 0.3, n), load * rng.lognormal(0.05, 0.3, n)
        ratio = paired_ratio(numerator, denominator)
        assert ratio.interval_95[0] <= ratio.median <= ratio.interval_95[1]


def test_a_paired_ratio_from_too_few_pairs_has_no_interval():
    few = paired_ratio([1.5] * (MIN_PAIRS - 1), [1.0] * (MIN_PAIRS - 1))
    assert few.interval_95 is None and not few.resolved and few.median == 1.5


# Student's t


@pytest.mark.parametrize("p, dof, table", [(0.975, 7, 2.3646), (0.975, 1, 12.706), (0.975, 2, 4.3027),
                                           (0.975, 30, 2.0423), (0.95, 10, 1.8125), (0.995, 3, 5.8409)])
def test_the_t_quantile_matches_the_tables(p, dof, table):
    assert t_quantile(p, dof) == pytest.approx(table, abs=5e-4)
    assert t_quantile(1 - p, dof) == pytest.approx(-t_quantile(p, dof), abs=1e-12)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_the_t_quantile_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)     # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)


def test_the_t_quantile_tends_to_the_normal_one_and_refuses_impossible_arguments():
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.5, 4) == pytest.approx(0.0, abs=1e-12)
    for p, dof in ((0.0, 3), (1.0, 3), (0.9, 0)):
        with pytest.raises(ReffuseError):
            t_quantile(p, dof)


def test_the_t_interval_of_a_mean_by_hand():
    low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])       # mean 3, s = √2.5, t_0.975,4 = 2.7764
    assert (low + high) / 2 == pytest.approx(3.0)
    assert (high - low) / 2 == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), abs=1e-4)
    assert t_interval([1.0]) is None


# rank correlation


def test_ties_share_the_mean_of_their_ranks():
    assert list(ranks([3.0, 1.0, 2.0, 2.0, 5.0])) == [4.0, 1.0, 2.5, 2.5, 5.0]
    assert list(ranks([7.0, 7.0, 7.0])) == [2.0, 2.0, 2.0]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 1, 0, -5]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)          # ranks, not values
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))  # a tie in b


def test_spearman_is_none_where_it_is_undefined():
    assert spearman([1, 2], [2, 1]) is None                                      # fewer than 3 pairs
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None                          # a constant sequence
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    with pytest.raises(ReffuseError, match="one length"):
        spearman([1, 2, 3], [1, 2])


def test_the_spearman_interval_resamples_pairs_and_leaves_out_undefined_draws():
    a, b = np.arange(4.0), np.array([0.0, 2.0, 1.0, 3.0])
    drawn = np.random.default_rng(0).integers(0, 4, (RESAMPLES, 4))
    rhos = resampled_spearman(a, b, drawn)
    assert all(rho == spearman(a[d], b[d]) or (np.isnan(rho) and spearman(a[d], b[d]) is None)
               for rho, d in zip(rhos, drawn))
    assert np.isnan(rhos).any()                      # draws of one pair four times rank nothing: left out
    assert spearman_interval(a, b) == pytest.approx(list(np.quantile(rhos[np.isfinite(rhos)], [0.025, 0.975])))
    assert spearman_interval(a, np.ones(4)) is None
