"""The GGUF loader on small Llama files written here with gguf.GGUFWriter (llama.cpp's own writer), the q/k row
permutation, and every kind of bad file: truncated, corrupt, another architecture, an unsupported tensor type."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import reffuse  # noqa: E402
from reffuse.formats.checkpoint import model_from_tensors  # noqa: E402
from reffuse.errors import ReffuseError  # noqa: E402
from reffuse.formats.gguf import hf_name, load_gguf, rope_rows_to_interleaved, rope_rows_to_rotate_half  # noqa: E402
from reffuse.core.config import Config  # noqa: E402
from reffuse.core.rope import apply_rope, rope_tables  # noqa: E402

# Small enough to write in milliseconds; widths are multiples of 32 so rows can be Q8_0 blocks.
CONFIG = Config(vocab_size=96, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=10000.0, norm_eps=1e-5,
                tie_embeddings=True, name="gguf-test")
FFN_WIDTH, N_BLOCKS = 96, 2
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down"}


def hf_weights(tied=True, seed=0) -> dict[str, np.ndarray]:
    """Random weights under HF Llama names, in HF's layout (rotate-half q/k rows)."""
    rng = np.random.default_rng(seed)
    d, hd = CONFIG.dim, CONFIG.head_dim
    shapes = {"model.embed_tokens.weight": (CONFIG.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(N_BLOCKS):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                   f"{p}.self_attn.q_proj.weight": (CONFIG.n_heads * hd, d),
                   f"{p}.self_attn.k_proj.weight": (CONFIG.n_kv_heads * hd, d),
                   f"{p}.self_attn.v_proj.weight": (CONFIG.n_kv_heads * hd, d),
                   f"{p}.self_attn.o_proj.weight": (d, CONFIG.n_heads * hd),
                   f"{p}.mlp.gate_proj.weight": (FFN_WIDTH, d), f"{p}.mlp.up_proj.weight": (FFN_WIDTH, d),
                   f"{p}.mlp.down_proj.weight": (d, FFN_WIDTH)}
    if not tied:
        shapes["lm_head.weight"] = (CONFIG.vocab_size, d)
    return {name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else
                   rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
            for name, shape in shapes.items()}


def gguf_name(name: str) -> str:
    if name in HF_TO_GGUF:
        return HF_TO_GGUF[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def write_gguf(path, weights, arch="llama", qtypes=None, metadata=True, tensor_override=None):
    """A GGUF as llama.cpp's converter writes it: q/k rows permuted for interleaved RoPE, types per tensor."""
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata:
        writer.add_block_count(N_BLOCKS)
        writer.add_context_length(128)
        writer.add_embedding_length(CONFIG.dim)
        writer.add_feed_forward_length(FFN_WIDTH)
        writer.add_head_count(CONFIG.n_heads)
        writer.add_head_count_kv(CONFIG.n_kv_heads)
        writer.add_rope_freq_base(CONFIG.rope_theta)
        writer.add_layer_norm_rms_eps(CONFIG.norm_eps)
        writer.add_vocab_size(CONFIG.vocab_size)
    for name, w in weights.items():
        target = gguf_name(name)
        if target.endswith("attn_q.weight"):
            w = rope_rows_to_interleaved(w, CONFIG.n_heads)
        elif target.endswith("attn_k.weight"):
            w = rope_rows_to_interleaved(w, CONFIG.n_kv_heads)
        if tensor_override and target in tensor_override:
            w = tensor_override[target]
        qtype = (qtypes or {}).get(target)
        if qtype is None:
            writer.add_tensor(target, w)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, w.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------------------------------------------
# The q/k row permutation


def test_rope_rows_round_trip():
    w = np.random.default_rng(0).standard_normal((4 * 16, 8))
    assert np.array_equal(rope_rows_to_rotate_half(rope_rows_to_interleaved(w, 4), 4), w)
    assert np.array_equal(rope_rows_to_interleaved(rope_rows_to_rotate_half(w, 4), 4), w)


def test_rope_rows_order_on_one_head():
    # rotate-half pairs rows (i, i + 2) of a 4-row head; interleaved RoPE pairs (2i, 2i + 1): rows 0, 2, 1, 3
    rows = np.arange(4.0)[:, None]
    assert rope_rows_to_interleaved(rows, 1)[:, 0].tolist() == [0, 2, 1, 3]
    assert rope_rows_to_rotate_half(np.array([[0.0], [2.0], [1.0], [3.0]]), 1)[:, 0].tolist() == [0, 1, 2, 3]


def interleaved_rope(x, positions, theta):
    """llama.cpp's RoPE: rotate each pair (2i, 2i+1) of x [heads, T, hd] by position · theta^(-2i/hd)."""
    hd = x.shape[-1]
    angles = positions[:, None] * theta ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
    cos, sin = np.cos(angles), np.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def test_permuted_rows_with_interleaved_rope_give_the_same_attention_scores():
    # Why the permutation exists: llama.cpp's interleaved RoPE on permuted rows = HF's rotate-half on the originals
    rng = np.random.default_rng(1)
    heads, hd, d, T = 3, 8, 12, 5
    wq, wk, x = rng.standard_normal((heads * hd, d)), rng.standard_normal((heads * hd, d)), rng.standard_normal((T, d))
    positions = np.arange(T, dtype=np.float64)

    def heads_of(w):
        return (x @ w.T).reshape(T, heads, hd).transpose(1, 0, 2)  # -> [heads, T, hd]

    cos, sin = rope_tables(positions, hd, 10000.0, np.float64)
    q, k = apply_rope(heads_of(wq), cos, sin), apply_rope(heads_of(wk), cos, sin)
    q2 = interleaved_rope(heads_of(rope_rows_to_interleaved(wq, heads)), positions, 10000.0)
    k2 = interleaved_rope(heads_of(rope_rows_to_interleaved(wk, heads)), positions, 10000.0)
    np.testing.assert_allclose(q2 @ k2.transpose(0, 2, 1), q @ k.transpose(0, 2, 1), rtol=1e-12, atol=1e-12)


def test_hf_names():
    assert hf_name("blk.7.ffn_gate.weight") == "model.layers.7.mlp.gate_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.0.something_new.weight") == "blk.0.something_new.weight"  # left for the checker to name


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_load_gives_back_the_hf_weights_exactly(tmp_path):
    weights = hf_weights()
    model = load_gguf(write_gguf(tmp_path / "m.gguf", weights))
    # GGUF stores eps as float32, and the loader keeps the stored value (transformers does the same)
    assert model.config == Config(**{**CONFIG.__dict__, "name": "m", "norm_eps": float(np.float32(CONFIG.norm_eps)), "max_positions": 128})
    layout = [reffuse.BlockLayout(True, FFN_WIDTH)] * N_BLOCKS
    expected = model_from_tensors(model.config, layout, weights, "test")
    ids = np.arange(20) % CONFIG.vocab_size
    assert np.array_equal(reffuse.forward(model, ids), reffuse.forward(expected, ids))
    assert model.lm_head is model.embed  # tied: no output.weight in the file


def test_quantized_and_half_tensors_dequantize_like_llama_cpp(tmp_path):
    weights = hf_weights(tied=False)
    q8, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
    path = write_gguf(tmp_path / "q.gguf", weights, qtypes={"blk.0.ffn_up.weight": q8, "blk.1.attn_q.weight": q8,
                                                             "blk.0.attn_v.weight": f16})
    model = reffuse.load_model(path)  # a .gguf path through load_model
    up = weights["model.layers.0.mlp.up_proj.weight"]
    assert np.array_equal(model.blocks[0].ffn.up, gguf.quants.dequantize(gguf.quants.quantize(up, q8), q8))
    q = rope_rows_to_interleaved(weights["model.layers.1.self_attn.q_proj.weight"], CONFIG.n_heads)
    q_roundtrip = gguf.quants.dequantize(gguf.quants.quantize(q, q8), q8)
    assert np.array_equal(model.blocks[1].attention.q, rope_rows_to_rotate_half(q_roundtrip, CONFIG.n_heads))
    v = weights["model.layers.0.self_attn.v_proj.weight"]
    assert np.array_equal(model.blocks[0].attention.v, v.astype(np.float16).astype(np.float32))
    assert not model.config.tie_embeddings
    assert np.array_equal(model.lm_head, weights["lm_head.weight"])
    assert model.dtype == np.float32


# ---------------------------------------------------------------------------------------------------------------
# Bad files: each a ReffuseError that names the file and, where there is one, the tensor


def test_truncated_file_names_the_cut_tensor(tmp_path):
    path = write_gguf(tmp_path / "cut.gguf", hf_weights())
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * 0.7)])
    with pytest.raises(ReffuseError, match=r"cut\.gguf is truncated: tensor (blk\.\d+\.\w+|output_norm)\.weight"):
        load_gguf(path)


def test_file_cut_inside_its_metadata(tmp_path):
    path = write_gguf(tmp_path / "short.gguf", hf_weights())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ReffuseError, match=r"short\.gguf could not be read as a GGUF file"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ReffuseError, match=r"noise\.gguf could not be read as a GGUF file.*magic"):
        load_gguf(path)


def test_corrupt_tensor_values_are_named(tmp_path):
    weights = hf_weights()
    bad = weights["model.layers.1.mlp.down_proj.weight"].copy()
    bad[3, 5] = np.nan
    path = write_gguf(tmp_path / "nan.gguf", weights, tensor_override={"blk.1.ffn_down.weight": bad})
    with pytest.raises(ReffuseError, match=r"nan\.gguf: tensor blk\.1\.ffn_down\.weight .*non-finite"):
        load_gguf(path)


def test_another_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"model.norm.weight": np.ones(4, np.float32)}, arch="gpt2",
                      metadata=False)
    with pytest.raises(ReffuseError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    ints = np.arange(CONFIG.dim, dtype=np.int32)
    path = write_gguf(tmp_path / "int.gguf", hf_weights(), tensor_override={"blk.0.attn_norm.weight": ints})
    with pytest.raises(ReffuseError, match=r"int\.gguf: tensor blk\.0\.attn_norm\.weight has type I32"):
        load_gguf(path)


def test_missing_tensor_is_named(tmp_path):
    weights = hf_weights()
    del weights["model.layers.1.mlp.down_proj.weight"]
    path = write_gguf(tmp_path / "gap.gguf", weights)
    with pytest.raises(ReffuseError, match=r"gap\.gguf does not match.*missing tensors: model\.layers\.1\.mlp\.down"):
        load_gguf(path)


def test_missing_metadata_key(tmp_path):
    path = write_gguf(tmp_path / "bare.gguf", hf_weights(), metadata=False)
    with pytest.raises(ReffuseError, match=r"bare\.gguf: metadata key llama\.\S+ is missing"):
        load_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(ReffuseError, match="no such file"):
        reffuse.load_model(tmp_path / "absent.gguf")
