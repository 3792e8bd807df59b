"""Every Nemotron-NAS block pattern through the whole core: per-block key/value heads and FFN widths, a linear map
in place of either sub-block, attention biases and Llama-3 RoPE scaling; the fast kernels, the KV cache, the
layout, both folder formats, fusion, tensor-parallel sharding and the dependency metrics.

Tolerances: float64 throughout. The fast kernels and the cache reorder sums (query blocks, stacked q/k/v), so
they agree to rounding, ~1e-15 of the largest logit: 1e-12 leaves room and still catches any wrong weight.
"""

import dataclasses

import numpy as np
import pytest

import reffuse
from reffuse.core.fast import for_speed
from reffuse.core.layout import sharding_problems
from reffuse.core.config import RopeScaling
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import Linear, attention_output, ffn_output, forward, plain
from reffuse.core.rope import rope_frequencies
from reffuse.core.patterns import FUSED, PATTERN_CONFIG, PATTERNS, build_pattern
from reffuse.errors import ReffuseError
from reffuse.formats.checkpoint import load_folder, save_model, save_nemotron_nas
from reffuse.method.metrics import dependency
from reffuse.tp import shard_model
from reffuse.training.gradients import gradients

TIGHT = 1e-12  # float64, sums in another order (see the module docstring)
IDS = np.random.default_rng(3).integers(0, PATTERN_CONFIG.vocab_size, 20)


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def with_biases(model):
    """The model with q, k, v and o biases (Llama's attention_bias), random."""
    rng = np.random.default_rng(7)
    blocks = []
    for b in model.blocks:
        a = b.attention
        if a is not None and not isinstance(a, Linear):
            a = dataclasses.replace(a, **{f"{n}_bias": 0.3 * rng.standard_normal(getattr(a, n).shape[0])
                                          for n in "qkvo"})
        blocks.append(dataclasses.replace(b, attention=a))
    config = dataclasses.replace(model.config, qkv_bias=True, o_bias=True)
    return dataclasses.replace(model, config=config, blocks=blocks)


VARIANTS = {name: (lambda specs=specs: build_pattern(specs)) for name, (_, specs) in PATTERNS.items()}
VARIANTS["attention biases"] = lambda: with_biases(build_pattern(["attn+ffn", "attn/1+ffn", "lin+ffn"]))
VARIANTS["llama3 RoPE scaling"] = lambda: dataclasses.replace(
    build_pattern(["attn+ffn"] * 2), config=dataclasses.replace(
        PATTERN_CONFIG, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_kernels_and_the_kv_cache_compute_the_plain_forward(variant):
    model = VARIANTS[variant]()
    expected = forward(model, IDS)
    assert relative(forward(for_speed(model), IDS), expected) <= TIGHT
    for m in (model, for_speed(model)):
        cache = KVCache(m, len(IDS))
        steps = [forward(m, IDS[:8], cache=cache)] + [forward(m, IDS[i:i + 1], cache=cache) for i in range(8, 20)]
        assert relative(np.concatenate(steps), expected) <= TIGHT


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_folder_formats_read_back_bit_for_bit(variant, tmp_path):
    model = VARIANTS[variant]()
    expected = forward(model, IDS)
    for save in (save_model, save_nemotron_nas):
        if variant == "fused-wide-ffn":
            model = reffuse.fuse(VARIANTS[variant](), FUSED[variant])
            expected = forward(model, IDS)
        back = load_folder(save(model, tmp_path / save.__name__), dtype="float64")
        assert back.layout().rows() == model.layout().rows()
        np.testing.assert_array_equal(forward(back, IDS), expected)


def test_the_layout_names_heads_widths_and_linear_maps():
    rows = build_pattern(["attn/1+ffn:64", "lin+ffn", "attn+lin", "-+-"]).layout().rows()
    assert rows[0] == {"block": 0, "attention": True, "ffn_width": 64, "fused_from": [], "kv_heads": 1}
    assert rows[1]["linear_attention"] and rows[1]["attention"] and rows[1]["ffn_width"] == 48
    assert rows[2]["linear_ffn"] and rows[2]["ffn_width"] == 0
    assert rows[3] == {"block": 3, "attention": False, "ffn_width": 0, "fused_from": []}


def test_fusing_a_run_of_varying_widths_equals_its_parallel_form():
    model = build_pattern(PATTERNS["fused-wide-ffn"][1])
    fused = reffuse.fuse(model, FUSED["fused-wide-ffn"])
    assert fused.layout().blocks[1].ffn_width == 128 + 256 + 384
    assert relative(forward(fused, IDS), forward(model, IDS, parallel_groups=FUSED["fused-wide-ffn"])) <= TIGHT


def test_a_linear_ffn_does_not_fuse():
    model = build_pattern(["attn+ffn", "-+lin", "-+ffn", "attn+ffn"])
    with pytest.raises(ReffuseError, match="contains block 1, whose FFN is a linear map: only SwiGLU FFNs fuse"):
        reffuse.fuse(model, [(1, 2)])


@pytest.mark.parametrize("variant", ["varying-heads-and-widths", "linear-attention", "linear-ffn", "attention biases"])
def test_tensor_parallel_shards_sum_to_each_sub_block(variant):
    """Each sub-block's output is the sum of its shards' (the all-reduce), for N = 2 and 4: kv heads of 1 are
    replicated, a linear map is split by its input features, o's bias is added by rank 0 only."""
    model = VARIANTS[variant]()
    x = np.random.default_rng(4).standard_normal((6, PATTERN_CONFIG.dim))
    cos, sin = model.rope(np.arange(6))
    for n_ranks in (2, 4):
        shards = [shard_model(model, r, n_ranks) for r in range(n_ranks)]
        for i, block in enumerate(model.blocks):
            if block.attention is not None:
                parts = [attention_output(s, s.blocks[i].attention, x, cos, sin) for s in shards]
                assert relative(sum(parts), attention_output(model, block.attention, x, cos, sin)) <= TIGHT
            if block.ffn is not None:
                parts = [ffn_output(s, s.blocks[i].ffn, x) for s in shards]
                assert relative(sum(parts), ffn_output(model, block.ffn, x)) <= TIGHT


def test_sharding_names_the_blocks_whose_heads_do_not_divide():
    model = build_pattern(["attn/4+ffn:64", "attn/1+ffn:64", "attn/2+ffn:64"],
                          config=dataclasses.replace(PATTERN_CONFIG, n_heads=12, n_kv_heads=2))
    problems = sharding_problems(model, 3)
    assert any("4 key/value heads of block 0 neither divide by N=3" in p for p in problems)
    assert any("2 key/value heads of block 2" in p for p in problems)
    assert not any("block 1" in p for p in problems)  # 1 head divides N: replicated
    with pytest.raises(ReffuseError, match="cannot shard .* over N=3 ranks: .*key/value heads of block 0"):
        shard_model(model, 0, 3)


def test_dependency_metrics_measure_blocks_with_linear_maps():
    model = build_pattern(["attn+ffn", "lin+ffn", "attn+lin", "-+ffn"])
    result = dependency(model, [IDS[:12]], granularities=("block", "ffn"))
    for matrix in result.matrices.values():
        assert np.isfinite(matrix[np.triu_indices(4, 1)][~np.isnan(matrix[np.triu_indices(4, 1)])]).all()


@pytest.mark.parametrize("variant, message", [("linear-attention", "replaced by a linear map, which reffuse's "
                                                                     "backward does not differentiate"),
                                               ("attention biases", "attention biases, which reffuse's backward")])
def test_training_refuses_what_its_backward_does_not_differentiate(variant, message):
    with pytest.raises(ReffuseError, match=message):
        gradients(VARIANTS[variant](), IDS)


def test_llama3_scaling_keeps_short_wavelengths_and_stretches_long_ones():
    scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=64)
    base, scaled = rope_frequencies(16, 10000.0), rope_frequencies(16, 10000.0, scaling)
    wavelength = 2 * np.pi / base
    np.testing.assert_array_equal(scaled[wavelength < 16], base[wavelength < 16])          # < 64 / 4: kept
    np.testing.assert_allclose(scaled[wavelength > 64], base[wavelength > 64] / 8, rtol=1e-15)  # > 64 / 1
    middle = (wavelength >= 16) & (wavelength <= 64)
    assert middle.any() and np.all((scaled[middle] < base[middle]) & (scaled[middle] > base[middle] / 8))


def test_plain_forward_reads_linear_maps_and_biases():
    model = VARIANTS["attention biases"]()
    assert relative(forward(plain(for_speed(model)), IDS), forward(model, IDS)) <= TIGHT
