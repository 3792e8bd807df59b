"""Every backward of reffuse.training.backward and the losses against central finite differences in float64.

The check: for a random projection R of the output, L = Σ R ⊙ f(inputs) is a scalar whose gradient the backward
gives (dy = R). Central differences with step 1e-6 have a truncation error of order 1e-12 and a rounding error of
order 1e-16 · |L| / 1e-6 ≈ 1e-9 relative, so 1e-6 separates a right gradient from a wrong one by three orders."""

import numpy as np
import pytest

from reffuse.core.fusion import fuse_ffns
from reffuse.core.config import Config
from reffuse.core.model import FFN, Attention, rms_norm, swiglu
from reffuse.core.rope import apply_rope, rope_tables
from reffuse.training import backward as bw
from reffuse.training.gradcheck import numerical_gradient, relative_error
from reffuse.training.losses import head_loss

TOLERANCE = 1e-6


def assert_close(analytic, numeric):
    error = relative_error(analytic, numeric)
    print(f"relative error against central differences: {error:.1e}")
    assert error <= TOLERANCE, f"relative error {error:.2e}"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("T", [1, 5])
def test_rms_norm(rng, T):
    x, gain, dy = rng.standard_normal((T, 8)), 1 + 0.3 * rng.standard_normal(8), rng.standard_normal((T, 8))
    y, cache = bw.rms_norm_forward(x, gain, 1e-5)
    np.testing.assert_allclose(y, rms_norm(x, gain, 1e-5), rtol=1e-14)
    dx, d_gain = bw.rms_norm_backward(dy, cache, gain)
    assert_close(dx, numerical_gradient(lambda: (dy * rms_norm(x, gain, 1e-5)).sum(), x))
    assert_close(d_gain, numerical_gradient(lambda: (dy * rms_norm(x, gain, 1e-5)).sum(), gain))


def test_rope(rng):
    x, dy = rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 5, 8))
    cos, sin = rope_tables(np.arange(5), 8, 10000.0, np.float64)
    assert_close(bw.rope_backward(dy, cos, sin), numerical_gradient(lambda: (dy * apply_rope(x, cos, sin)).sum(), x))


def attention_case(rng, n_heads, n_kv, T, hd=4, d=8):
    config = Config(vocab_size=16, dim=d, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd)
    attn = Attention(norm_gain=np.ones(d), q=rng.standard_normal((n_heads * hd, d)),
                     k=rng.standard_normal((n_kv * hd, d)), v=rng.standard_normal((n_kv * hd, d)),
                     o=rng.standard_normal((d, n_heads * hd)))
    cos, sin = rope_tables(np.arange(T), hd, 10000.0, np.float64)
    return config, attn, cos, sin, rng.standard_normal((T, d)), rng.standard_normal((T, d))


@pytest.mark.parametrize("n_heads, n_kv, T", [(2, 2, 5), (3, 1, 5), (6, 2, 4), (3, 1, 1)])
def test_attention(rng, n_heads, n_kv, T):
    """GQA groups of 1 and of 3, and a single position."""
    from reffuse.core.model import attention
    config, attn, cos, sin, x, dy = attention_case(rng, n_heads, n_kv, T)
    out, cache = bw.attention_forward(attn, x, config, cos, sin)
    np.testing.assert_allclose(out, attention(attn, x, config, cos, sin), rtol=1e-12, atol=1e-12)
    dx, grads = bw.attention_backward(dy, cache, attn, cos, sin)

    def loss():
        return (dy * bw.attention_forward(attn, x, config, cos, sin)[0]).sum()
    assert_close(dx, numerical_gradient(loss, x))
    for name in "qkvo":
        assert_close(grads[name], numerical_gradient(loss, getattr(attn, name)))


def random_ffn(rng, width, d=8):
    return FFN(1 + 0.2 * rng.standard_normal(d), rng.standard_normal((width, d)), rng.standard_normal((width, d)),
               rng.standard_normal((d, width)))


@pytest.mark.parametrize("T", [1, 5])
def test_swiglu(rng, T):
    ffn, x, dy = random_ffn(rng, 6), rng.standard_normal((T, 8)), rng.standard_normal((T, 8))
    out, cache = bw.swiglu_forward(ffn, x)
    np.testing.assert_allclose(out, swiglu(ffn, x), rtol=1e-14)
    dx, grads = bw.swiglu_backward(dy, cache, ffn)

    def loss():
        return (dy * swiglu(ffn, x)).sum()
    assert_close(dx, numerical_gradient(loss, x))
    for name in ("gate", "up", "down"):
        assert_close(grads[name], numerical_gradient(loss, getattr(ffn, name)))


def test_fused_ffn_backward_is_its_parts_side_by_side(rng):
    """Theorem 3.1 in the backward: the fused FFN's weight gradients are its FFNs' gradients stacked as their
    weights are, and its input gradient is their sum (unequal widths 3, 5 and 4)."""
    ffns, x, dy = [random_ffn(rng, w) for w in (3, 5, 4)], rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    fused = fuse_ffns(ffns, norm="last")
    dx, grads = bw.swiglu_backward(dy, bw.swiglu_forward(fused, x)[1], fused)
    parts = [bw.swiglu_backward(dy, bw.swiglu_forward(f, x)[1], f) for f in ffns]
    np.testing.assert_allclose(dx, sum(p[0] for p in parts), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["gate"], np.concatenate([p[1]["gate"] for p in parts]), rtol=1e-12)
    np.testing.assert_allclose(grads["down"], np.concatenate([p[1]["down"] for p in parts], axis=1), rtol=1e-12)
    assert_close(grads["up"], numerical_gradient(lambda: (dy * swiglu(fused, x)).sum(), fused.up))


def test_embedding_scatter_adds_repeated_tokens(rng):
    embed, ids, dy = rng.standard_normal((7, 4)), np.array([3, 1, 3, 3, 0]), rng.standard_normal((5, 4))
    d_embed = bw.embedding_backward(dy, ids, 7)
    assert_close(d_embed, numerical_gradient(lambda: (dy * bw.embedding_forward(embed, ids)).sum(), embed))
    np.testing.assert_allclose(d_embed[3], dy[[0, 2, 3]].sum(axis=0))


@pytest.mark.parametrize("teacher, temperature", [(False, 1.0), (True, 1.0), (True, 2.5)])
def test_losses_in_chunks(rng, monkeypatch, teacher, temperature):
    """Cross-entropy and distillation through the LM head, over chunks of 2 positions (5 positions: 3 chunks)."""
    import reffuse.evaluation.scoring as scoring
    monkeypatch.setattr(scoring, "CHUNK_ROWS", 2)
    h, head, ids = rng.standard_normal((5, 4)), rng.standard_normal((11, 4)), rng.integers(0, 11, 5)
    teacher_logits = 3 * rng.standard_normal((5, 11)) if teacher else None

    def loss():
        return head_loss(h, head, ids, teacher_logits, temperature)[0]
    value, dh, d_head = head_loss(h, head, ids, teacher_logits, temperature)
    z = h @ head.T
    if teacher:
        p = np.exp(teacher_logits / temperature)
        p /= p.sum(-1, keepdims=True)
        q = np.exp(z / temperature)
        q /= q.sum(-1, keepdims=True)
        expected = temperature ** 2 * (p * np.log(p / q)).sum() / 5
    else:
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
        expected = -log_p[np.arange(4), ids[1:]].mean()
    assert value == pytest.approx(expected, rel=1e-12)
    assert_close(dh, numerical_gradient(loss, h))
    assert_close(d_head, numerical_gradient(loss, head))
