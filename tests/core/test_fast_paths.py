"""The fast paths of reffuse.core.model against the plain functions they replace.

Bit for bit where the operations are the same (in-place silu, the RoPE rows, a one-token step on one BLAS
thread); otherwise float64 to 1e-12, and float32 within the float32 targets of reffuse.evaluation.verify: a
stacked product or a sum over fewer masked zeros may round differently, never by more.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from reffuse.core import model as core
from reffuse.core.model import (FFN, Attention, KVCache, attention, attention_stacked, fast_paths, forward,
                                rope_rows, rope_tables, silu, silu_, swiglu, swiglu_stacked)
from reffuse.errors import ReffuseError
from reffuse.evaluation.verify import TARGETS
from reffuse.speed.timing import blas_threads


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_weights_read_together_are_views_of_one_array(tiny32):
    ffn, attn = tiny32.blocks[0].ffn, tiny32.blocks[0].attention
    assert np.shares_memory(ffn.gate, ffn.gate_up) and np.shares_memory(ffn.up, ffn.gate_up)
    np.testing.assert_array_equal(ffn.gate_up, np.concatenate([ffn.gate, ffn.up]))
    for name in ("q", "k", "v"):
        assert np.shares_memory(getattr(attn, name), attn.qkv)
    np.testing.assert_array_equal(attn.qkv, np.concatenate([attn.q, attn.k, attn.v]))
    # the views keep HF's shapes and orientation, and are the arrays they were built from
    gate = np.arange(12.0).reshape(3, 4)
    built = FFN(np.ones(4), gate, -gate, np.zeros((4, 3)))
    assert built.gate.shape == (3, 4) and built.gate.flags.c_contiguous
    np.testing.assert_array_equal(built.up, -gate)
    # a field cannot be re-pointed away from its stacked array
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.gate = gate


def test_weights_that_cannot_be_stacked_are_refused_by_name():
    with pytest.raises(ReffuseError, match=r"FFN weights gate \(3, 4\) float64, up \(3, 5\) float64"):
        FFN(np.ones(4), np.zeros((3, 4)), np.zeros((3, 5)), np.zeros((4, 3)))
    with pytest.raises(ReffuseError, match="Attention weights"):
        Attention(np.ones(4), np.zeros((4, 4)), np.zeros((2, 4), np.float32), np.zeros((2, 4)), np.zeros((4, 4)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_in_place_is_silu_bit_for_bit(dtype):
    z = np.random.default_rng(0).standard_normal((7, 33)).astype(dtype) * 30
    z[0, :3] = [-100.0, 0.0, 100.0]  # e^-z overflows at the first
    expected = silu(z)
    np.testing.assert_array_equal(silu_(z.copy()), expected)
    wide = np.concatenate([z, z], axis=1)
    silu_(wide[:, :33])  # a strided half, as swiglu_stacked passes it
    np.testing.assert_array_equal(wide[:, :33], expected)


def test_rope_rows_are_rope_tables_bit_for_bit():
    core._ROPE_TABLES.clear()
    for positions in (np.arange(5), 17 + np.arange(40), np.array([3, 1, 2000, 9]), np.arange(1500, 1501)):
        for made, cut in zip(rope_tables(positions, 16, 10000.0, np.float32), rope_rows(positions, 16, 10000.0,
                                                                                         np.float32)):
            np.testing.assert_array_equal(cut, made)
    assert core._ROPE_TABLES[(16, 10000.0, "<f4", "numpy", None)][0].shape[0] >= 2001  # grown, once per key


def test_stacked_swiglu(tiny64, tiny32):
    x64 = np.random.default_rng(2).standard_normal((37, tiny64.config.dim))
    for block in tiny64.blocks:
        assert relative(swiglu_stacked(block.ffn, x64), swiglu(block.ffn, x64)) < 1e-12
    x32 = x64.astype(np.float32)
    with blas_threads(1):
        for block in tiny32.blocks:
            np.testing.assert_array_equal(swiglu_stacked(block.ffn, x32[:1]), swiglu(block.ffn, x32[:1]))
            assert relative(swiglu_stacked(block.ffn, x32), swiglu(block.ffn, x32)) < TARGETS["float32"]["relative"]


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


def test_one_token_step_is_the_plain_step_bit_for_bit(tiny32):
    """A decode step reads the same weights in the same products: bit for bit (one BLAS thread, head_dim 16, so
    1/sqrt(head_dim) is a power of two)."""
    ids = np.random.default_rng(4).integers(0, tiny32.config.vocab_size, 20)
    steps = {}
    with blas_threads(1):
        for fast in (True, False):
            with fast_paths(fast):
                cache = KVCache(tiny32, 21)
                with fast_paths(False):  # the same cache contents for both
                    forward(tiny32, ids, cache=cache)
                steps[fast] = forward(tiny32, [7], cache=cache)
    np.testing.assert_array_equal(steps[True], steps[False])


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
