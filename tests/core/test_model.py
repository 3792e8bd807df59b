"""The forward pass: attention, RoPE and the KV cache against direct, loop-based references."""

import numpy as np
import pytest

import reffuse
from reffuse.errors import ReffuseError
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import attention, check_token_ids, forward, rms_norm, silu
from reffuse.core.rope import apply_rope, rope_tables


def loop_attention(attn, x, cfg):
    """Causal GQA attention one head, one query, one key at a time; RoPE as explicit 2-D rotations of the
    pairs (i, i + head_dim/2)."""
    T, hd, n_heads, n_kv = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    half = hd // 2
    q = (x @ attn.q.T).reshape(T, n_heads, hd)
    k = (x @ attn.k.T).reshape(T, n_kv, hd)
    v = (x @ attn.v.T).reshape(T, n_kv, hd)

    def rotate(vec, pos):
        out = vec.copy()
        for i in range(half):
            angle = pos * cfg.rope_theta ** (-2 * i / hd)
            a, b = vec[i], vec[i + half]
            out[i], out[i + half] = a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)
        return out

    out = np.zeros((T, n_heads, hd))
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        for t in range(T):
            qt = rotate(q[t, h], t)
            scores = np.array([qt @ rotate(k[s, kv], s) / np.sqrt(hd) for s in range(t + 1)])
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[t, h] = sum(w * v[s, kv] for s, w in enumerate(weights))
    return out.reshape(T, n_heads * hd) @ attn.o.T


def test_attention_and_rope_match_loop_reference(tiny64):
    cfg, attn = tiny64.config, tiny64.blocks[0].attention
    x = np.random.default_rng(0).standard_normal((7, cfg.dim))
    cos, sin = rope_tables(np.arange(7), cfg.head_dim, cfg.rope_theta, np.float64)
    np.testing.assert_allclose(attention(attn, x, cfg, cos, sin), loop_attention(attn, x, cfg), rtol=1e-12, atol=1e-12)


def test_rope_is_a_rotation_that_preserves_norms():
    x = np.random.default_rng(0).standard_normal((3, 5, 16))
    cos, sin = rope_tables(np.arange(5), 16, 10000.0, np.float64)
    np.testing.assert_allclose(np.linalg.norm(apply_rope(x, cos, sin), axis=-1), np.linalg.norm(x, axis=-1))


def test_rms_norm_and_silu_match_their_definitions():
    x = np.random.default_rng(0).standard_normal((4, 8))
    gain = np.arange(1.0, 9.0)
    np.testing.assert_allclose(rms_norm(x, gain, 1e-5), x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * gain)
    z = np.linspace(-50, 50, 101)
    np.testing.assert_allclose(silu(z), z / (1 + np.exp(-z)), rtol=1e-13, atol=1e-300)


def test_kv_cache_decoding_equals_full_recomputation(tiny32, tiny_ids):
    full = forward(tiny32, tiny_ids)
    cache = KVCache(tiny32, max_tokens=len(tiny_ids))
    steps = [forward(tiny32, tiny_ids[:10], cache=cache)]
    steps += [forward(tiny32, tiny_ids[t:t + 1], cache=cache) for t in range(10, len(tiny_ids))]
    # float32: the cached path multiplies the same numbers in different shapes; 1e-5 of the logit scale
    # is ~100 float32 ulps, far above reordering noise and far below any indexing bug.
    assert np.max(np.abs(np.concatenate(steps) - full)) <= 1e-5 * np.max(np.abs(full))
    assert cache.length == len(tiny_ids)


def test_kv_cache_overflow_is_a_clear_error(tiny32, tiny_ids):
    cache = KVCache(tiny32, max_tokens=4)
    with pytest.raises(ReffuseError, match="KV cache holds 4 positions"):
        forward(tiny32, tiny_ids[:5], cache=cache)


def test_hidden_states_has_one_entry_per_step(tiny32, tiny_ids):
    states = []
    forward(tiny32, tiny_ids, hidden_states=states)
    assert len(states) == 1 + len(tiny32.blocks)
    states = []
    forward(tiny32, tiny_ids, parallel_groups=[(4, 8)], hidden_states=states)
    assert len(states) == 1 + len(tiny32.blocks) - 4


@pytest.mark.parametrize("ids, message", [
    ([1, 2, 256], "token id 256 at position 2 is out of range"),
    ([-1], "token id -1 at position 0 is out of range"),
    ([], "non-empty 1-D"),
    ([[1, 2]], "non-empty 1-D"),
    ([1.5, 2.0], "must be integers"),
])
def test_bad_token_ids(tiny32, ids, message):
    with pytest.raises(ReffuseError, match=message):
        check_token_ids(tiny32, ids)


def test_float64_and_float32_agree(tiny32, tiny64, tiny_ids):
    a, b = forward(tiny32, tiny_ids), forward(tiny64, tiny_ids)
    assert a.dtype == np.float32 and b.dtype == np.float64
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))


def test_unknown_model_name():
    with pytest.raises(ReffuseError, match="unknown model 'nope'"):
        reffuse.load_model("nope")
