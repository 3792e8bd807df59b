"""GGUF files against llama.cpp itself: attention biases and RoPE scaling (llama3, linear) as reffuse writes them,
a qwen2 file (rotate-half RoPE, q/k/v biases) as llama.cpp's converter writes it, and the block quantizations
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K), whose dequantization by the `gguf` package is
held bit for bit against ggml's own C functions.

Tolerance against llama.cpp: 1e-4 of the largest logit (its float32 kernels against reffuse's float64 on the same
float32 weights; measured ~2e-7 on these small models)."""

import ctypes
import dataclasses
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

import reffuse  # noqa: E402
from reffuse.core.config import RopeScaling  # noqa: E402
from reffuse.core.model import forward  # noqa: E402
from reffuse.core.patterns import PATTERN_CONFIG, build_pattern  # noqa: E402
from reffuse.evaluation.llamacpp import LlamaCpp  # noqa: E402
from reffuse.formats.checkpoint import model_to_tensors  # noqa: E402
from reffuse.formats.gguf import load_gguf  # noqa: E402
from reffuse.formats.gguf_export import gguf_name, save_gguf  # noqa: E402

pytestmark = pytest.mark.slow  # llama.cpp's library

LLAMACPP = 1e-4
IDS = np.random.default_rng(5).integers(0, PATTERN_CONFIG.vocab_size, 40)


def float32_weights(model):
    return reffuse.cast(reffuse.cast(model, "float32"), "float64")


def with_qkv_biases(model, o_bias=False):
    rng = np.random.default_rng(9)
    blocks = [dataclasses.replace(b, attention=dataclasses.replace(
        b.attention, **{f"{n}_bias": (0.3 * rng.standard_normal(getattr(b.attention, n).shape[0])).astype(np.float32)
                        for n in ("qkvo" if o_bias else "qkv")})) for b in model.blocks]
    config = dataclasses.replace(model.config, qkv_bias=True, o_bias=o_bias)
    return dataclasses.replace(model, config=config, blocks=blocks)


def relative_to_llamacpp(model, path) -> float:
    ours = forward(model, IDS)
    theirs = LlamaCpp(path, n_ctx=64, threads=1).logits(IDS)
    return float(np.abs(theirs - ours).max() / np.abs(ours).max())


PLAIN = ["attn+ffn", "attn+ffn"]
EXPORTS = {
    "llama, q/k/v and o biases": lambda: with_qkv_biases(build_pattern(PLAIN), o_bias=True),
    "llama, llama3 RoPE scaling": lambda: dataclasses.replace(build_pattern(PLAIN), config=dataclasses.replace(
        PATTERN_CONFIG, rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16))),
    "deci, linear RoPE scaling": lambda: dataclasses.replace(
        build_pattern(["attn+ffn", "-+ffn"]),
        config=dataclasses.replace(PATTERN_CONFIG, rope_scaling=RopeScaling("linear", 4.0))),
    "deci, biases and per-block kv heads": lambda: with_qkv_biases(build_pattern(["attn/1+ffn", "attn/4+-"])),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_reffuse_exports_run_in_llamacpp_with_reffuses_logits(name, tmp_path):
    model = float32_weights(EXPORTS[name]())
    path = save_gguf(model, tmp_path / "m.gguf", None)
    back = load_gguf(path, dtype="float64")
    assert back.config.rope_scaling == model.config.rope_scaling
    assert np.abs(forward(back, IDS) - forward(model, IDS)).max() <= 1e-10 * np.abs(forward(model, IDS)).max()
    error = relative_to_llamacpp(model, path)
    print(f"{name}: llama.cpp vs reffuse {error:.1e} of the largest logit")
    assert error <= LLAMACPP


def write_qwen2(model, path):
    """A qwen2 GGUF as llama.cpp's converter writes one: HF's q/k rows (rotate-half, llama.cpp's NEOX RoPE)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(len(model.blocks))
    writer.add_context_length(256)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(model.blocks[0].ffn.width)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("none")
    for name, array in model_to_tensors(model).items():
        writer.add_tensor(gguf_name(name), array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_qwen2_file_reads_and_agrees_with_llamacpp(tmp_path):
    model = float32_weights(with_qkv_biases(build_pattern(PLAIN)))
    path = write_qwen2(model, tmp_path / "qwen2.gguf")
    back = load_gguf(path, dtype="float64")
    assert back.config.qkv_bias and not back.config.o_bias
    np.testing.assert_array_equal(back.blocks[1].attention.k, model.blocks[1].attention.k)  # no permutation
    assert relative_to_llamacpp(back, path) <= LLAMACPP


# ---------------------------------------------------------------------------------------------------------------
# Block quantizations: the gguf package's dequantization against ggml's C code, bit for bit


GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def ggml():
    library = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    lib = ctypes.CDLL(str(library))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


@pytest.mark.parametrize("qtype", GGML_TYPES)
def test_block_quantizations_load_as_ggml_dequantizes_them(qtype, tmp_path):
    lib, kind = ggml(), gguf.GGMLQuantizationType[qtype]
    rows, width = 8, 512                                       # whole blocks of 32 and super-blocks of 256
    values = np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    packed = np.zeros((rows, width // block * size), np.uint8)
    lib.ggml_quantize_chunk(GGML_TYPES[qtype], values.ctypes.data, packed.ctypes.data, 0, rows, width, None)
    dequantize_row = getattr(lib, f"dequantize_row_{qtype.lower().replace('_k', '_K')}")
    expected = np.zeros_like(values)
    dequantize_row(ctypes.c_void_p(packed.ctypes.data), ctypes.c_void_p(expected.ctypes.data),
                   ctypes.c_int64(values.size))

    model = build_pattern(["-+ffn:256"], config=dataclasses.replace(PATTERN_CONFIG, dim=width))
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "deci")
    writer.add_block_count(1)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length([256])
    writer.add_head_count([0])
    writer.add_head_count_kv([0])
    writer.add_key_length(PATTERN_CONFIG.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("none")
    for name, array in model_to_tensors(model).items():
        if name.endswith("up_proj.weight"):
            array = np.concatenate([values] * 32)              # [256, 512]: 32 copies of the quantized rows
            writer.add_tensor(gguf_name(name), np.concatenate([packed] * 32), raw_shape=(256, width * size // block),
                              raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name(name), array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    up = load_gguf(tmp_path / "k.gguf").blocks[0].ffn.up
    np.testing.assert_array_equal(up[:rows], expected)
    assert np.abs(expected - values).max() < 0.5 * np.abs(values).max()   # a quantization of these values
