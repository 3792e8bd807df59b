"""Calibrated fusion: the ridge refit of a fused down-projection, checked on cases whose answer is known."""

import numpy as np
import pytest

import reffuse
from reffuse.method.calibrate import (MIN_CALIBRATION_TOKENS, RunStatistics, calibrated_fuse, calibrated_removal,
                                      fit_error, fused_index, refit_down, relative_fit_error, removal_groups,
                                      solve_down, solve_down_dual)
from reffuse.errors import ReffuseError
from reffuse.evaluation.scoring import evaluate
from reffuse.core.fusion import fuse
from reffuse.method.removal import drop_ffns
from reffuse.core.model import FFN, Block, Model, forward, run_blocks
from reffuse.core.tiny import build_tiny


def problem(tokens, width=40, dim=6, seed=0):
    """Random hidden activations H [T, Σdh], a known down-projection W [d, Σdh] and R = H Wᵀ."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((tokens, width))
    down = rng.standard_normal((dim, width))
    return hidden, down, hidden @ down.T


def statistics(hidden, targets):
    return RunStatistics(hidden.T @ hidden, hidden.T @ targets, float(np.sum(targets ** 2)), hidden.shape[0])


def test_recovers_a_known_down_projection():
    hidden, down, targets = problem(tokens=200)
    start = np.zeros_like(down)
    # With more tokens than unknowns and a vanishing ridge, least squares returns the true W; 1e-8 leaves room
    # for the ridge's bias (1e-12 of the trace) and float64 rounding in a 40 x 40 solve.
    np.testing.assert_allclose(solve_down(statistics(hidden, targets), start, ridge=1e-12), down, atol=1e-8)


def test_both_forms_of_the_normal_equations_agree():
    for tokens in (25, 200):  # fewer and more tokens than hidden units
        hidden, _, _ = problem(tokens)
        targets = np.random.default_rng(1).standard_normal((tokens, 6))
        start = np.random.default_rng(2).standard_normal((6, 40))
        primal = solve_down(statistics(hidden, targets), start, ridge=1e-2)
        dual = solve_down_dual(hidden, targets, start, ridge=1e-2)
        # two exact identities, solved in float64: they differ by rounding only
        np.testing.assert_allclose(primal, dual, rtol=1e-9, atol=1e-10)
        assert fit_error(statistics(hidden, targets), primal) == pytest.approx(
            relative_fit_error(hidden, targets, primal), rel=1e-9)


def test_a_huge_ridge_gives_plain_fusion_back():
    hidden, _, targets = problem(tokens=30)
    start = np.random.default_rng(3).standard_normal((6, 40))
    # the correction shrinks as 1/ridge: at 1e12 it is ~1e-12 of the unregularised one
    np.testing.assert_allclose(solve_down_dual(hidden, targets, start, ridge=1e12), start, atol=1e-9)


def test_ridge_must_be_positive():
    hidden, down, targets = problem(tokens=30)
    with pytest.raises(ReffuseError, match="ridge 0 must be positive"):
        solve_down(statistics(hidden, targets), down, ridge=0)


def calibration_ids(windows=3, length=64, seed=5):
    return np.random.default_rng(seed).integers(0, 256, (windows, length))


@pytest.mark.parametrize("norm", ["fold", "last"])
def test_calibration_lowers_the_fit_error_on_its_own_data(tiny64, norm):
    groups = [(4, 6), (7, 9)]
    windows = calibration_ids()
    calibrated, fits = calibrated_fuse(tiny64, groups, windows, norm=norm, ridge=1e-3)
    assert [f.group for f in fits] == groups
    for fit in fits:
        assert fit.tokens == windows.size
        assert fit.fit_error_calibrated < 0.1 * fit.fit_error_plain
    # and the whole model moves towards the sequential one on the same text
    plain = fuse(tiny64, groups, norm=norm)
    assert evaluate(calibrated, windows, tiny64).kl_from_base < evaluate(plain, windows, tiny64).kl_from_base
    # only the down-projections changed
    for group in groups:
        index = fused_index(groups, group)
        before, after = plain.blocks[index].ffn, calibrated.blocks[index].ffn
        for name in ("gate", "up", "norm_gain"):
            np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
        assert not np.array_equal(after.down, before.down)


def test_calibration_keeps_a_down_projection_that_is_already_exact(tiny64):
    """A run whose first FFN writes nothing: sequential and parallel coincide, so the fit has nothing to fix."""
    blocks = list(tiny64.blocks)
    f = blocks[4].ffn
    blocks[4] = Block(None, FFN(f.norm_gain, f.gate, f.up, np.zeros_like(f.down)))
    model = Model(tiny64.config, tiny64.embed, blocks, tiny64.norm_gain, tiny64.lm_head)
    calibrated, (fit,) = calibrated_fuse(model, [(4, 5)], calibration_ids(), ridge=1e-3)
    assert fit.fit_error_plain < 1e-25  # float64 rounding of an exact equality
    np.testing.assert_allclose(calibrated.blocks[4].ffn.down, fuse(model, [(4, 5)]).blocks[4].ffn.down, atol=1e-12)


def test_later_groups_are_fitted_on_the_stream_the_calibrated_earlier_groups_produce(tiny64):
    groups = [(4, 6), (7, 9)]
    windows = calibration_ids()
    calibrated, _ = calibrated_fuse(tiny64, groups, windows, ridge=1e-3)
    first_only, _ = calibrated_fuse(tiny64, groups[:1], windows, ridge=1e-3)
    np.testing.assert_array_equal(calibrated.blocks[4].ffn.down, first_only.blocks[4].ffn.down)
    assert calibrated.blocks[5].fused_from == (7, 8, 9)

    def entering_second_group(model):  # the stream entering block 5 (group (7, 9) in the fused numbering)
        return [run_blocks(model, model.embed[ids], *model.rope(np.arange(len(ids))), stop=5) for ids in windows]

    wide = fuse(tiny64, [groups[1]]).blocks[7].ffn
    expected, _ = refit_down(tiny64, groups[1], wide, entering_second_group(first_only), ridge=1e-3)
    np.testing.assert_array_equal(calibrated.blocks[5].ffn.down, expected)
    on_plain, _ = refit_down(tiny64, groups[1], wide, entering_second_group(fuse(tiny64, groups[:1])), ridge=1e-3)
    assert not np.allclose(calibrated.blocks[5].ffn.down, on_plain)  # the first group's refit is seen


def test_calibration_text_too_short(tiny64):
    with pytest.raises(ReffuseError, match="calibration text is too short"):
        calibrated_fuse(tiny64, [(4, 9)], calibration_ids(windows=1, length=MIN_CALIBRATION_TOKENS - 1))


def test_groups_spanning_attention_are_refused(tiny64):
    with pytest.raises(ReffuseError, match="contains block 3, which has attention"):
        calibrated_fuse(tiny64, [(3, 6)], calibration_ids())


def test_float32_model_stays_float32():
    model = build_tiny()
    calibrated, _ = calibrated_fuse(model, [(4, 9)], calibration_ids())
    assert calibrated.blocks[4].ffn.down.dtype == np.float32
    assert np.isfinite(forward(calibrated, calibration_ids()[0])).all()
    assert reffuse.layout(calibrated).blocks[4].fused_from == (4, 5, 6, 7, 8, 9)


def test_relative_weighting_fits_and_bad_weighting_is_refused(tiny64):
    windows = calibration_ids()
    _, fits = calibrated_fuse(tiny64, [(4, 9)], windows, ridge=1e-3, weighting="relative")
    assert fits[0].weighting == "relative"
    assert fits[0].fit_error_calibrated < 0.1 * fits[0].fit_error_plain  # errors in the weighted norm
    with pytest.raises(ReffuseError, match="weighting 'loud' is not one of none, relative"):
        calibrated_fuse(tiny64, [(4, 9)], windows, weighting="loud")


def test_removal_groups_give_each_removed_ffn_to_a_kept_one():
    assert removal_groups((4, 9), [5, 6]) == [((4, 6), 4)]
    assert removal_groups((4, 9), [4, 9]) == [((4, 5), 5), ((8, 9), 8)]       # the span's first joins the next kept
    assert removal_groups((4, 9), []) == []
    with pytest.raises(ReffuseError, match="at least one FFN"):
        removal_groups((4, 6), [4, 5, 6])
    with pytest.raises(ReffuseError, match="inside it"):
        removal_groups((4, 6), [7])


def test_refitted_removal_is_plain_removal_under_a_huge_ridge_and_fits_better_with_a_small_one(tiny64):
    windows = calibration_ids()
    removed = [5, 6, 9]
    plain = drop_ffns(tiny64, removed)
    huge, _ = calibrated_removal(tiny64, (4, 9), removed, windows, ridge=1e12)
    ids = windows[0]
    np.testing.assert_allclose(forward(huge, ids), forward(plain, ids), rtol=1e-6, atol=1e-9)
    refit, fits = calibrated_removal(tiny64, (4, 9), removed, windows, ridge=1e-3)
    assert [f.group for f in fits] == [(4, 6), (8, 9)]
    assert all(f.fit_error_calibrated < f.fit_error_plain for f in fits)
    assert evaluate(refit, windows, tiny64).kl_from_base < evaluate(plain, windows, tiny64).kl_from_base
