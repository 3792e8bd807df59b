"""Theorem 3.1: a fused run equals the parallel form, for equal and unequal widths and both norm modes."""

import numpy as np
import pytest

import reffuse
from reffuse.errors import ReffuseError
from reffuse.core.fusion import fuse, fuse_ffns, with_last_norm
from reffuse.core.model import FFN, Block, Model, forward, rms_norm, swiglu
from reffuse.core.tiny import TINY_FFN_WIDTHS, build_tiny


def relative_error(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def equal_width_tiny(dtype):
    """tiny with every FFN in the attention-free run cut to 64 hidden units."""
    model = reffuse.cast(build_tiny(), dtype)
    blocks = list(model.blocks)
    for i in range(4, 10):
        f = blocks[i].ffn
        blocks[i] = Block(None, FFN(f.norm_gain, f.gate[:64], f.up[:64], f.down[:, :64]))
    return Model(model.config, model.embed, blocks, model.norm_gain, model.lm_head)


# Tolerances: the fused and parallel forms sum the same products in a different order, so they differ by
# rounding only: float64 rounding (~1e-16) stays far below 1e-12, float32 (~6e-8) below 1e-5.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("norm", ["fold", "last"])
@pytest.mark.parametrize("widths", ["unequal", "equal"])
@pytest.mark.parametrize("groups", [[(4, 8)], [(4, 9)], [(4, 5), (7, 9)]])
def test_fused_equals_parallel(dtype, norm, widths, groups, tiny_ids):
    model = reffuse.cast(build_tiny(), dtype) if widths == "unequal" else equal_width_tiny(dtype)
    reference = model if norm == "fold" else with_last_norm(model, groups)
    parallel = forward(reference, tiny_ids, parallel_groups=groups)
    fused = forward(fuse(model, groups, norm=norm), tiny_ids)
    assert fused.dtype == np.dtype(dtype)
    assert relative_error(fused, parallel) <= TOLERANCE[dtype]


def test_acceptance_fused_model_equals_parallel_forms_float64(tiny64, tiny_ids):
    a = forward(fuse(tiny64, [(4, 9)]), tiny_ids)
    b = forward(tiny64, tiny_ids, parallel_groups=[(4, 9)])
    assert relative_error(a, b) <= 1e-12


def test_last_norm_differs_from_fold_when_gains_differ(tiny64, tiny_ids):
    fold = forward(fuse(tiny64, [(4, 8)], norm="fold"), tiny_ids)
    last = forward(fuse(tiny64, [(4, 8)], norm="last"), tiny_ids)
    assert relative_error(last, fold) > 1e-3  # tiny's gains are 1 ± 0.2, so dropping them shows


def test_single_block_fold_equals_the_block(tiny64):
    ffn = tiny64.blocks[5].ffn
    x = np.random.default_rng(0).standard_normal((9, tiny64.config.dim))
    folded = fuse_ffns([ffn], norm="fold")
    np.testing.assert_array_equal(folded.norm_gain, np.ones_like(ffn.norm_gain))
    eps = tiny64.config.norm_eps
    np.testing.assert_allclose(swiglu(folded, rms_norm(x, folded.norm_gain, eps)), swiglu(ffn, rms_norm(x, ffn.norm_gain, eps)),
                               rtol=1e-13, atol=1e-14)


def test_fused_layout_and_original_untouched(tiny64):
    before = [np.copy(b.ffn.gate) for b in tiny64.blocks]
    fused = fuse(tiny64, [(4, 6), (7, 9)])
    assert [b.ffn.width for b in fused.blocks] == (TINY_FFN_WIDTHS[:4] + [sum(TINY_FFN_WIDTHS[4:7]),
                                                    sum(TINY_FFN_WIDTHS[7:10])] + TINY_FFN_WIDTHS[10:])
    assert fused.blocks[4].fused_from == (4, 5, 6) and fused.blocks[5].fused_from == (7, 8, 9)
    assert len(tiny64.blocks) == 12
    for b, gate in zip(tiny64.blocks, before):
        np.testing.assert_array_equal(b.ffn.gate, gate)


def test_fusing_a_fused_model_records_original_layers(tiny64, tiny_ids):
    once = fuse(tiny64, [(4, 5)])           # blocks 4,5 -> block 4; old 6..9 are now 5..8
    twice = fuse(once, [(4, 6)])            # fused(4,5) + old 6 + old 7
    assert twice.blocks[4].fused_from == (4, 5, 6, 7)
    direct = fuse(tiny64, [(4, 7)])
    assert relative_error(forward(twice, tiny_ids), forward(direct, tiny_ids)) <= 1e-12


@pytest.mark.parametrize("groups, message", [
    ([(2, 5)], r"contains block 2, which has attention"),
    ([(4, 6), (6, 8)], r"overlap"),
    ([(4, 12)], r"out of range: the model has blocks 0..11"),
    ([(-1, 5)], r"out of range"),
    ([(5, 5)], r"fewer than 2 blocks"),
    ([(7, 5)], r"is reversed: first > last"),
    ([(4.7, 8.9)], r"not a pair of integer block indices"),
    ([(4,)], r"not a pair"),
])
def test_bad_groups(tiny64, tiny_ids, groups, message):
    with pytest.raises(ReffuseError, match=message):
        fuse(tiny64, groups)
    with pytest.raises(ReffuseError, match=message):
        forward(tiny64, tiny_ids, parallel_groups=groups)


def test_bad_norm_mode(tiny64):
    with pytest.raises(ReffuseError, match="not a fusion norm mode"):
        fuse(tiny64, [(4, 8)], norm="mean")
