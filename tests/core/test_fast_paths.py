"""The fast kernels (reffuse.core.fast) against the plain functions (reffuse.core.model, reffuse.core.rope) they
replace.

Bit for bit where the operations are the same (the RoPE rows, the FFN below its threshold); otherwise
float64 to 1e-12, and float32 within the float32 targets of reffuse.evaluation.verify: a stacked product, a sum
in column blocks or over fewer masked zeros may round differently, never by more.
"""

import dataclasses
import inspect
import sys

import numpy as np
import pytest

import reffuse
from reffuse.core import fast
from reffuse.core import model as core
from reffuse.core import rope
from reffuse.core.fast import FAST, StackedAttention, attention_stacked, for_speed, rope_rows, stacked, swiglu_in_cache
from reffuse.core.fusion import fuse
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import PLAIN, Attention, attention, forward, plain, swiglu
from reffuse.core.rope import rope_tables
from reffuse.core.names import named_weights, with_weights
from reffuse.errors import ReffuseError
from reffuse.evaluation.verify import TARGETS
from reffuse.method.removal import drop_attention, drop_ffns
from reffuse.tp.sharding import shard_model


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def float_checks(tiny64, tiny32):
    """Each tiny model with the check its precision allows between two arrangements of the same arithmetic."""
    return ((tiny64, lambda a, b: relative(a, b) < 1e-12),
            (tiny32, lambda a, b: np.abs(a - b).max() < TARGETS["float32"]["logits_max_abs"]))


def test_q_k_v_are_views_of_one_array(tiny32):
    attn = tiny32.blocks[0].attention
    held = stacked(attn)
    for name in ("q", "k", "v"):  # HF's shapes and orientation, and the numbers they were built from
        assert np.shares_memory(getattr(held, name), held.qkv) and getattr(held, name).flags.c_contiguous
        np.testing.assert_array_equal(getattr(held, name), getattr(attn, name))
    np.testing.assert_array_equal(held.qkv, np.concatenate([attn.q, attn.k, attn.v]))
    assert stacked(held) is held
    with pytest.raises(dataclasses.FrozenInstanceError):
        held.qkv = held.qkv.copy()
    arranged = for_speed(tiny32)  # every weight a view of one arena, q, k and v of an attention as one array
    attentions = [b.attention for b in arranged.blocks if b.attention is not None]
    assert attentions and all(isinstance(a, StackedAttention) for a in attentions)
    assert all(a.qkv.base is arranged.embed.base is arranged.blocks[0].ffn.down.base for a in attentions)


def test_weights_that_cannot_be_stacked_are_refused_by_name():
    with pytest.raises(ReffuseError, match=r"Attention weights q \(4, 4\) float64, k \(2, 5\) float64"):
        stacked(Attention(np.ones(4), np.zeros((4, 4)), np.zeros((2, 5)), np.zeros((2, 4)), np.zeros((4, 4))))
    with pytest.raises(ReffuseError, match="the same input width and dtype"):
        stacked(Attention(np.ones(4), np.zeros((4, 4)), np.zeros((2, 4), np.float32), np.zeros((2, 4)),
                          np.zeros((4, 4))))


def test_rope_rows_are_rope_tables_bit_for_bit():
    fast._ROPE_TABLES.clear()
    for positions in (np.arange(5), 17 + np.arange(40), np.array([3, 1, 2000, 9]), np.arange(1500, 1501)):
        for made, cut in zip(rope_tables(positions, 16, 10000.0, np.float32), rope_rows(positions, 16, 10000.0,
                                                                                         np.float32)):
            np.testing.assert_array_equal(cut, made)
    assert fast._ROPE_TABLES[(16, 10000.0, None, "<f4", "numpy", None)][0].shape[0] >= 2001  # grown, once per key


def test_ffn_in_column_blocks(tiny64, monkeypatch):
    """Past the cache-sized threshold the FFN runs in column blocks; below it, it is swiglu itself."""
    x = np.random.default_rng(2).standard_normal((9, tiny64.config.dim))
    for block in tiny64.blocks:
        np.testing.assert_array_equal(swiglu_in_cache(block.ffn, x), swiglu(block.ffn, x))
    monkeypatch.setattr(fast, "HIDDEN_ELEMENTS_IN_CACHE", 64)
    monkeypatch.setattr(fast, "HIDDEN_BLOCK_ELEMENTS", 100)
    for block in tiny64.blocks:
        assert relative(swiglu_in_cache(block.ffn, x), swiglu(block.ffn, x)) < 1e-12


@pytest.mark.parametrize("query_block", [4, 64])
def test_stacked_attention_in_query_blocks(tiny64, monkeypatch, query_block):
    """Against the plain attention, in a prefill of several blocks (and a last, shorter one) after cached
    positions, and in the one-token steps that follow."""
    monkeypatch.setattr(fast, "QUERY_BLOCK", query_block)
    cfg, attn = tiny64.config, tiny64.blocks[0].attention
    x = np.random.default_rng(3).standard_normal((30, cfg.dim))
    caches = {name: KVCache(tiny64, 40) for name in ("plain", "fast")}
    for start, stop in ((0, 7), (7, 25), (25, 26), (26, 27)):
        cos, sin = rope_tables(np.arange(start, stop), cfg.head_dim, cfg.rope_theta, np.float64)
        plain_out = attention(attn, x[start:stop], cfg, cos, sin, caches["plain"])
        fast_out = attention_stacked(stacked(attn), x[start:stop], cfg, cos, sin, caches["fast"])
        assert relative(fast_out, plain_out) < 1e-12
        for cache in caches.values():
            cache.length = stop
    # The same keys, to float64 rounding: one product x W_qkv^T and three x W^T give the same sums, but OpenBLAS
    # picks its kernel (and so the order of the additions) by the product's shape, so the last bit may differ.
    assert relative(caches["fast"].keys[0], caches["plain"].keys[0]) < 1e-14


def test_one_token_steps_after_a_cached_prefill(tiny64, tiny32):
    """Decode steps on the same cache contents, fast against plain: 1e-12 in float64, the float32 target in float32
    (the products are grouped per kv head, so their sums may run in another order)."""
    ids = np.random.default_rng(4).integers(0, tiny32.config.vocab_size, 20)
    for model, check in float_checks(tiny64, tiny32):
        steps = {}
        for kernels, on in (("fast", for_speed(model)), ("plain", model)):
            cache = KVCache(model, 23)
            forward(model, ids, cache=cache)  # the same cache contents for both
            steps[kernels] = [forward(on, [token], cache=cache) for token in (7, 8, 9)]
        for fast_step, plain_step in zip(steps["fast"], steps["plain"]):
            assert check(fast_step, plain_step)


def test_forward_on_the_fast_kernels_and_on_the_plain_ones(tiny64, tiny32, tiny_ids):
    for model, check in float_checks(tiny64, tiny32):
        assert model.kernels is PLAIN and for_speed(model).kernels is FAST
        assert check(forward(for_speed(model), tiny_ids, parallel_groups=[(4, 6)]),
                     forward(model, tiny_ids, parallel_groups=[(4, 6)]))


def test_the_plain_forward_calls_the_plain_functions_and_nothing_in_fast(tiny64, tiny32, tiny_ids, monkeypatch):
    """Step through `forward` on plain(model) with every function of reffuse.core.fast made to raise and every call
    recorded: it reaches attention and swiglu of reffuse.core.model and rope_tables of reffuse.core.rope, and gives
    the fast model's logits."""
    cases = [(plain(for_speed(model)), check, forward(for_speed(model), tiny_ids, parallel_groups=[(4, 6)]))
             for model, check in float_checks(tiny64, tiny32)]

    def refuse(name):
        def raising(*args, **kwargs):
            raise AssertionError(f"the plain forward called reffuse.core.fast.{name}")
        return raising

    for name, fn in inspect.getmembers(fast, inspect.isfunction):
        if fn.__module__ == fast.__name__:
            monkeypatch.setattr(fast, name, refuse(name))
    for model, check, fast_logits in cases:
        called = set()

        def record(frame, event, arg):
            called.add((frame.f_code.co_filename, frame.f_code.co_name))

        before = sys.gettrace()
        sys.settrace(record)
        try:
            logits = forward(model, tiny_ids, parallel_groups=[(4, 6)])
        finally:
            sys.settrace(before)
        assert not {name for file, name in called if file == fast.__file__}
        assert {(core.__file__, "attention"), (core.__file__, "swiglu"), (rope.__file__, "rope_tables")} <= called
        assert check(logits, fast_logits)


def test_the_kernels_choice_survives_every_change_of_the_model(tiny32):
    model = for_speed(tiny32)
    q_name = "model.layers.0.self_attn.q_proj.weight"
    changed = with_weights(model, {q_name: 2 * named_weights(model)[q_name]})
    np.testing.assert_array_equal(changed.blocks[0].attention.q, 2 * model.blocks[0].attention.q)
    for made in (reffuse.cast(model, "float64"), core.map_arrays(model, np.copy), fuse(model, [(4, 6)]),
                 drop_attention(model, [1]), drop_ffns(model, [1]), shard_model(model, 1, 2), changed):
        assert made.kernels is FAST
        assert all(isinstance(b.attention, StackedAttention) for b in made.blocks if b.attention is not None)
    assert reffuse.load_model("tiny").kernels is FAST
    on_plain = plain(model)
    assert on_plain.kernels is PLAIN
    assert all(type(b.attention) is Attention for b in on_plain.blocks if b.attention is not None)
    assert drop_attention(on_plain, [1]).kernels is PLAIN and shard_model(on_plain, 0, 2).kernels is PLAIN
