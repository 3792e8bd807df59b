"""The fast paths of reffuse.core.model against the plain functions they replace.

Bit for bit where the operations are the same (the RoPE rows, the FFN with its fast path off); otherwise
float64 to 1e-12, and float32 within the float32 targets of reffuse.evaluation.verify: a stacked product, a sum
in column blocks or over fewer masked zeros may round differently, never by more.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from reffuse.core import model as core
from reffuse.core.model import (Attention, KVCache, attention, attention_stacked, fast_paths, ffn_output, forward,
                                rope_rows, rope_tables, swiglu)
from reffuse.errors import ReffuseError
from reffuse.evaluation.verify import TARGETS


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_q_k_v_are_views_of_one_array(tiny32):
    attn = tiny32.blocks[0].attention
    for name in ("q", "k", "v"):
        assert np.shares_memory(getattr(attn, name), attn.qkv)
    np.testing.assert_array_equal(attn.qkv, np.concatenate([attn.q, attn.k, attn.v]))
    # the views keep HF's shapes and orientation, and the numbers they were built from
    q = np.arange(32.0).reshape(8, 4)
    built = Attention(np.ones(4), q, -q[:2], 2 * q[:2], np.zeros((4, 8)))
    assert built.q.shape == (8, 4) and built.k.flags.c_contiguous
    np.testing.assert_array_equal(built.v, 2 * q[:2])
    # a field cannot be re-pointed away from the stacked array
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.q = q


def test_weights_that_cannot_be_stacked_are_refused_by_name():
    with pytest.raises(ReffuseError, match=r"Attention weights q \(4, 4\) float64, k \(2, 5\) float64"):
        Attention(np.ones(4), np.zeros((4, 4)), np.zeros((2, 5)), np.zeros((2, 4)), np.zeros((4, 4)))
    with pytest.raises(ReffuseError, match="the same input width and dtype"):
        Attention(np.ones(4), np.zeros((4, 4)), np.zeros((2, 4), np.float32), np.zeros((2, 4)), np.zeros((4, 4)))


def test_rope_rows_are_rope_tables_bit_for_bit():
    core._ROPE_TABLES.clear()
    for positions in (np.arange(5), 17 + np.arange(40), np.array([3, 1, 2000, 9]), np.arange(1500, 1501)):
        for made, cut in zip(rope_tables(positions, 16, 10000.0, np.float32), rope_rows(positions, 16, 10000.0,
                                                                                         np.float32)):
            np.testing.assert_array_equal(cut, made)
    assert core._ROPE_TABLES[(16, 10000.0, "<f4", "numpy", None)][0].shape[0] >= 2001  # grown, once per key


def test_ffn_in_column_blocks(tiny64, monkeypatch):
    """Past the cache-sized threshold the FFN runs in column blocks; off, it is swiglu itself."""
    monkeypatch.setattr(core, "HIDDEN_ELEMENTS_IN_CACHE", 64)
    monkeypatch.setattr(core, "HIDDEN_BLOCK_ELEMENTS", 100)
    x = np.random.default_rng(2).standard_normal((9, tiny64.config.dim))
    for block in tiny64.blocks:
        assert relative(ffn_output(block.ffn, x), swiglu(block.ffn, x)) < 1e-12
        with fast_paths(False):
            np.testing.assert_array_equal(ffn_output(block.ffn, x), swiglu(block.ffn, x))


@pytest.mark.parametrize("query_block", [4, 64])
def test_stacked_attention_in_query_blocks(tiny64, monkeypatch, query_block):
    """Against the plain attention, in a prefill of several blocks (and a last, shorter one) after cached
    positions, and in the one-token steps that follow."""
    monkeypatch.setattr(core, "QUERY_BLOCK", query_block)
    cfg, attn = tiny64.config, tiny64.blocks[0].attention
    x = np.random.default_rng(3).standard_normal((30, cfg.dim))
    caches = {name: KVCache(tiny64, 40) for name in ("plain", "fast")}
    for start, stop in ((0, 7), (7, 25), (25, 26), (26, 27)):
        cos, sin = rope_tables(np.arange(start, stop), cfg.head_dim, cfg.rope_theta, np.float64)
        plain = attention(attn, x[start:stop], cfg, cos, sin, caches["plain"])
        fast = attention_stacked(attn, x[start:stop], cfg, cos, sin, caches["fast"])
        assert relative(fast, plain) < 1e-12
        for cache in caches.values():
            cache.length = stop
    np.testing.assert_array_equal(caches["fast"].keys[0], caches["plain"].keys[0])


def test_one_token_steps_after_a_cached_prefill(tiny64, tiny32):
    """Decode steps on the same cache contents, fast against plain: 1e-12 in float64, the float32 target in float32
    (the products are grouped per kv head, so their sums may run in another order)."""
    ids = np.random.default_rng(4).integers(0, tiny32.config.vocab_size, 20)
    for model, check in ((tiny64, lambda a, b: relative(a, b) < 1e-12),
                         (tiny32, lambda a, b: np.abs(a - b).max() < TARGETS["float32"]["logits_max_abs"])):
        steps = {}
        for fast in (True, False):
            cache = KVCache(model, 23)
            with fast_paths(False):  # the same cache contents for both
                forward(model, ids, cache=cache)
            with fast_paths(fast):
                steps[fast] = [forward(model, [token], cache=cache) for token in (7, 8, 9)]
        for fast_step, plain_step in zip(steps[True], steps[False]):
            assert check(fast_step, plain_step)


def test_forward_with_and_without_fast_paths(tiny64, tiny32, tiny_ids):
    for model, check in ((tiny64, lambda a, b: relative(a, b) < 1e-12),
                         (tiny32, lambda a, b: np.abs(a - b).max() < TARGETS["float32"]["logits_max_abs"])):
        with fast_paths(False):
            plain = forward(model, tiny_ids, parallel_groups=[(4, 6)])
        assert core.FAST_PATHS
        assert check(forward(model, tiny_ids, parallel_groups=[(4, 6)]), plain)


def test_fast_paths_switch_restores_and_the_environment_turns_them_off():
    with fast_paths(False):
        assert not core.FAST_PATHS
        with fast_paths(True):
            assert core.FAST_PATHS
        assert not core.FAST_PATHS
    assert core.FAST_PATHS
    code = "from reffuse.core import model; print(model.FAST_PATHS)"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "REFFUSE_PLAIN": "1"}).stdout.strip()
    assert printed == "False"
