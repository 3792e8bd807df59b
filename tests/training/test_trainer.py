"""The trainer on tiny: it lowers the loss, trains only what it is told to, and a resumed run ends bit for bit
where an uninterrupted one does."""

import numpy as np
import pytest

import reffuse
from reffuse.core.names import named_weights, with_weights
from reffuse.training import trainer as trainer_module
from reffuse.training.trainer import TrainingOptions, teacher_logits, train, window_index

FUSED_NAMES = ["model.layers.4.mlp.gate_proj.weight", "model.layers.4.mlp.up_proj.weight",
               "model.layers.4.mlp.down_proj.weight"]


@pytest.fixture(scope="module")
def setup():
    teacher = reffuse.build_tiny()
    fused = reffuse.fuse(teacher, [(4, 9)])
    down = fused.blocks[4].ffn.down
    noise = 5 * np.abs(down).mean() * np.random.default_rng(1).standard_normal(down.shape).astype(down.dtype)
    student = with_weights(fused, {FUSED_NAMES[2]: down + noise})  # something to heal
    windows = np.random.default_rng(0).integers(0, 256, (5, 32))
    return teacher, student, windows


def test_distillation_lowers_the_loss_and_trains_only_the_trainable_weights(setup):
    teacher, student, windows = setup
    before = {n: w.copy() for n, w in named_weights(student).items()}
    options = TrainingOptions(steps=12, windows_per_step=2, learning_rate=1e-3, warmup=2, weight_decay=0.01)
    healed, log = train(student, windows, FUSED_NAMES, options, teacher=teacher, progress=False)
    assert log.losses[-1] < 0.01 * log.losses[0] and log.tokens == 12 * 2 * 32 and len(log.learning_rates) == 12
    for name, w in named_weights(healed).items():
        changed = not np.array_equal(w, before[name])
        assert changed == (name in FUSED_NAMES), name
        np.testing.assert_array_equal(named_weights(student)[name], before[name])  # the student is untouched


def test_kept_teacher_streams_give_the_same_logits_and_the_same_run_bit_for_bit(setup):
    """A study shares the teacher's streams between runs over the same windows: the second run reads them, and
    its logits, losses and weights are those of a run that computed the teacher in full."""
    teacher, student, windows = setup
    ids = windows[0]
    streams = {}
    first, again = teacher_logits(teacher, ids, streams), teacher_logits(teacher, ids, streams)
    np.testing.assert_array_equal(first, reffuse.forward(teacher, ids))
    np.testing.assert_array_equal(again, first)
    assert list(streams) == [ids.tobytes()]

    options = TrainingOptions(steps=6, learning_rate=1e-3, warmup=1)
    plain_run, plain_log = train(student, windows, FUSED_NAMES, options, teacher=teacher, progress=False)
    shared = {}
    train(student, windows, FUSED_NAMES, options, teacher=teacher, progress=False, teacher_streams=shared)
    assert len(shared) == len(windows)
    kept_run, kept_log = train(student, windows, FUSED_NAMES, options, teacher=teacher, progress=False,
                               teacher_streams=shared)
    assert kept_log.losses == plain_log.losses
    for name, w in named_weights(plain_run).items():
        np.testing.assert_array_equal(named_weights(kept_run)[name], w)


def test_window_order_is_a_seeded_permutation_per_epoch():
    order = [window_index(i, 5, seed=3) for i in range(10)]
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5)) and order[:5] != order[5:]
    assert order == [window_index(i, 5, seed=3) for i in range(10)]


def test_resume_gives_the_uninterrupted_run_bit_for_bit(setup, tmp_path, monkeypatch):
    teacher, student, windows = setup
    options = TrainingOptions(steps=6, learning_rate=1e-3, warmup=1, weight_decay=0.1, clip=0.5)
    straight, straight_log = train(student, windows, FUSED_NAMES, options, teacher=teacher, progress=False)

    calls = {"n": 0}
    real = trainer_module.gradients

    def killed_at_the_fourth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "gradients", killed_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        train(student, windows, FUSED_NAMES, options, teacher=teacher, checkpoint_folder=tmp_path,
              checkpoint_every=2, progress=False)
    monkeypatch.setattr(trainer_module, "gradients", real)
    resumed, resumed_log = train(student, windows, FUSED_NAMES, options, teacher=teacher, checkpoint_folder=tmp_path,
                                 checkpoint_every=2, resume=True, progress=False)
    assert resumed_log.losses == straight_log.losses
    for name, w in named_weights(straight).items():
        np.testing.assert_array_equal(named_weights(resumed)[name], w)

    other = TrainingOptions(steps=6, learning_rate=2e-3)
    with pytest.raises(reffuse.ReffuseError, match="other options"):
        train(student, windows, FUSED_NAMES, other, teacher=teacher, checkpoint_folder=tmp_path, resume=True,
              progress=False)


def test_a_fast_model_computes_with_its_trained_weights(setup):
    """On a model with the fast kernels (q, k and v stacked in one array), the trained model's fast forward
    equals its plain forward: the updates reach every arrangement of the weights."""
    from reffuse.core.fast import for_speed
    from reffuse.core.model import plain
    teacher, _, windows = setup
    fast = for_speed(reffuse.build_tiny(seed=1))
    trained, _ = train(fast, windows, None, TrainingOptions(steps=2, learning_rate=1e-2), teacher=teacher,
                       progress=False)
    assert not np.array_equal(trained.blocks[0].attention.q, fast.blocks[0].attention.q)
    ids = windows[0]
    np.testing.assert_allclose(reffuse.forward(trained, ids), reffuse.forward(plain(trained), ids), rtol=1e-4,
                               atol=1e-4 * np.abs(reffuse.forward(plain(trained), ids)).max())
