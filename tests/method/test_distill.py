"""Local distillation (reffuse.method.distill): the SwiGLU gradients against finite differences, and training
that lowers the local loss from where plain fusion leaves it."""

import numpy as np
import pytest

from reffuse.core.fusion import fuse
from reffuse.core.model import FFN
from reffuse.errors import ReffuseError
from reffuse.method.distill import distilled_fuse, local_loss_and_gradients, train_fused_ffn


def small_problem(seed=0, tokens=12, d=5, width=7):
    rng = np.random.default_rng(seed)
    ffn = FFN(np.ones(d), rng.standard_normal((width, d)), rng.standard_normal((width, d)),
              rng.standard_normal((d, width)) / 3)
    u, targets = rng.standard_normal((tokens, d)), rng.standard_normal((tokens, d))
    weights = rng.uniform(0.5, 2.0, (tokens, 1))
    return ffn, u, targets, weights


def test_gradients_match_finite_differences():
    ffn, u, targets, weights = small_problem()
    _, grads = local_loss_and_gradients(ffn, u, targets, weights)
    rng = np.random.default_rng(1)
    for index, name in enumerate(("gate", "up", "down")):
        weight = getattr(ffn, name)
        for _ in range(5):
            i, j = rng.integers(weight.shape[0]), rng.integers(weight.shape[1])
            step = 1e-6
            shifted = {}
            for sign in (1, -1):
                w = weight.copy()
                w[i, j] += sign * step
                arrays = {"gate": ffn.gate, "up": ffn.up, "down": ffn.down, name: w}
                shifted[sign] = local_loss_and_gradients(FFN(ffn.norm_gain, arrays["gate"], arrays["up"],
                                                             arrays["down"]), u, targets, weights)[0]
            numeric = (shifted[1] - shifted[-1]) / (2 * step)
            assert grads[index][i, j] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_training_lowers_the_local_loss():
    ffn, u, targets, weights = small_problem(seed=2)
    trained, losses = train_fused_ffn(ffn, u, targets, weights, steps=200, learning_rate=1e-2)
    assert len(losses) == 21 and losses[-1] < 0.8 * losses[0]
    assert trained.gate.shape == ffn.gate.shape and not np.shares_memory(trained.gate, ffn.gate)


def test_a_loss_that_is_not_finite_stops_the_run():
    ffn, u, targets, weights = small_problem(seed=3)
    u = u.astype(np.float32) * np.float32(1e20)  # float32 overflows at once
    with pytest.raises(ReffuseError, match="smaller learning rate"), np.errstate(all="ignore"):
        train_fused_ffn(FFN(*(a.astype(np.float32) for a in (ffn.norm_gain, ffn.gate, ffn.up, ffn.down))),
                        u, targets.astype(np.float32), weights.astype(np.float32), steps=5)


def test_distilled_fuse_on_the_tiny_model(tiny64):
    windows = [np.random.default_rng(s).integers(0, 256, 64) for s in range(3)]
    distilled, reports = distilled_fuse(tiny64, [(4, 6), (7, 8)], windows, steps=30, learning_rate=1e-3)
    plain = fuse(tiny64, [(4, 6), (7, 8)])
    assert len(distilled.blocks) == len(plain.blocks) and [r.group for r in reports] == [(4, 6), (7, 8)]
    assert all(r.losses[-1] <= r.losses[0] and r.tokens == 192 for r in reports)
    assert not np.array_equal(distilled.blocks[4].ffn.gate, plain.blocks[4].ffn.gate)


@pytest.mark.slow
def test_the_distillation_comparison_runs_on_the_tiny_model():
    """reffuse.experiments.distillation end to end on the synthetic model: three versions per plan, each scored with
    its per-prediction values, and the report's paired differences."""
    from reffuse.experiments.distillation import (STEP_COUNTS, DistillationResult, comparisons, markdown,
                                                  run_distillation)
    result = run_distillation("tiny", drop_count=2, held_out_tokens=256, calibration_tokens=1024, scoring_tokens=64,
                              dependency_tokens=64, window=64)
    assert [row.steps for row in result.rows] == list(STEP_COUNTS)
    for row in result.rows:
        assert set(row.scores) == {"plain", "refit", "distilled"}
        assert set(comparisons(row)) == {"distilled - plain", "refit - plain", "distilled - refit"}
        assert all(d.losses[-1] <= d.losses[0] for d in row.distillation)
    assert "| 1 |" in markdown(result, "test")
    assert DistillationResult.from_json(result.to_json()) == result
