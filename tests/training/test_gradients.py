"""reffuse.gradients on whole models against central finite differences of reffuse.forward (float64), for a model
with attention-free blocks, its fused form, tied and untied heads, both losses, and trainable subsets."""

import numpy as np
import pytest

import reffuse
from reffuse.core.config import Config
from reffuse.core.names import named_weights
from reffuse.core.tiny import build_synthetic
from reffuse.training.gradcheck import numerical_gradient

CONFIG = Config(vocab_size=13, dim=8, n_heads=3, n_kv_heads=1, head_dim=4, name="small")


def small_model(tied=True):
    cfg = Config(**{**CONFIG.__dict__, "tie_embeddings": tied})
    model = build_synthetic(cfg, [True, False, False, True], [6, 5, 7, 4], seed=3, dtype=np.float64)
    if not tied:
        model.lm_head = np.random.default_rng(4).standard_normal(model.embed.shape)
    return model


def reference_loss(model, ids, teacher_logits=None, temperature=1.0):
    """The loss from reffuse.forward's logits, written out on its own."""
    z = reffuse.forward(model, ids)
    if teacher_logits is None:
        log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        return -log_p[np.arange(len(ids) - 1), ids[1:]].mean()
    def log_softmax(a):
        a = a / temperature
        return a - a.max(-1, keepdims=True) - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_p, log_q = log_softmax(teacher_logits), log_softmax(z)
    return temperature ** 2 * (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()


def check_some_entries(model, grads, loss, rng, entries=4):
    """Central differences at a few random entries of every weight; the worst relative error over all of them,
    each relative to the largest entry of its tensor's gradient."""
    worst = 0.0
    for name, weight in named_weights(model).items():
        if name not in grads:
            continue
        assert grads[name].shape == weight.shape
        indices = list(zip(*(rng.integers(0, n, entries) for n in weight.shape)))
        numeric = numerical_gradient(loss, weight, indices=indices)
        scale = max(np.abs(grads[name]).max(), 1e-8)  # q and k have no gradient at T = 1
        rows = tuple(np.array(i) for i in zip(*indices))
        worst = max(worst, float(np.abs(numeric[rows] - grads[name][rows]).max() / scale))
    return worst


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_cross_entropy_gradients(tied, fused):
    model = small_model(tied)
    if fused:
        model = reffuse.fuse(model, [(1, 2)])
    ids = np.random.default_rng(5).integers(0, 13, 7)
    loss, grads = reffuse.gradients(model, ids)
    assert loss == pytest.approx(reference_loss(model, ids), rel=1e-12)
    assert set(grads) == set(named_weights(model))
    error = check_some_entries(model, grads, lambda: reference_loss(model, ids), np.random.default_rng(6))
    print(f"worst relative error of sampled whole-model entries, cross-entropy: {error:.1e}")
    assert error < 1e-6


@pytest.mark.parametrize("T, temperature", [(1, 1.0), (6, 2.0)])
def test_distillation_gradients(T, temperature):
    model = small_model()
    rng = np.random.default_rng(7)
    ids, teacher = rng.integers(0, 13, T), 2 * rng.standard_normal((T, 13))
    loss, grads = reffuse.gradients(model, ids, teacher_logits=teacher, temperature=temperature)
    assert loss == pytest.approx(reference_loss(model, ids, teacher, temperature), rel=1e-10)
    error = check_some_entries(model, grads, lambda: reference_loss(model, ids, teacher, temperature), rng)
    print(f"worst relative error of sampled whole-model entries, distillation: {error:.1e}")
    assert error < 1e-6


def test_a_trainable_subset_gets_the_same_gradients_and_only_those():
    model = small_model()
    ids = np.random.default_rng(8).integers(0, 13, 7)
    _, every = reffuse.gradients(model, ids)
    names = ["model.layers.2.mlp.down_proj.weight", "model.layers.2.post_attention_layernorm.weight",
             "model.layers.3.self_attn.k_proj.weight"]
    _, some = reffuse.gradients(model, ids, trainable=names)
    assert sorted(some) == sorted(names)
    for name in names:
        np.testing.assert_allclose(some[name], every[name], rtol=1e-12)


def test_refusals_name_the_problem():
    model = small_model()
    with pytest.raises(reffuse.ReffuseError, match="no weight named model.layers.9"):
        reffuse.gradients(model, [1, 2], trainable=["model.layers.9.mlp.up_proj.weight"])
    with pytest.raises(reffuse.ReffuseError, match="at least 2 tokens"):
        reffuse.gradients(model, [1])
    with pytest.raises(reffuse.ReffuseError, match=r"shape \(2, 5\)"):
        reffuse.gradients(model, [1, 2], teacher_logits=np.zeros((2, 5)))


def test_gradients_on_the_device_equal_the_cpu_ones(strict_device):
    """Through the backend: every array stays on the device (the strict stand-in refuses silent host copies)."""
    from reffuse.core.backend import to_numpy
    model = reffuse.build_tiny()
    fused = reffuse.fuse(model, [(4, 9)])
    rng = np.random.default_rng(9)
    ids, teacher = rng.integers(0, 256, 16), rng.standard_normal((16, 256)).astype(np.float32)
    loss, grads = reffuse.gradients(fused, ids, teacher_logits=teacher)
    on_device = reffuse.to_device(fused, "gpu")
    device_loss, device_grads = reffuse.gradients(on_device, ids, teacher_logits=strict_device.asarray(teacher))
    assert device_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert type(device_grads[name]).__module__.startswith("strict_cupy")
        np.testing.assert_allclose(to_numpy(device_grads[name]), g, rtol=1e-5, atol=1e-6 * np.abs(g).max())
