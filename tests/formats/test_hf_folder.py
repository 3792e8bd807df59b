"""HF Llama checkpoint folders (config.json + *.safetensors): bfloat16 weights, sharded and incomplete folders,
and the same logits as transformers on a small random model."""

import json

import numpy as np
import pytest

import reffuse
from reffuse.core.layout import BlockLayout
from reffuse.formats.checkpoint import bfloat16_to_float32, tensor_shapes
from reffuse.errors import ReffuseError
from reffuse.core.config import Config

CONFIG = Config(vocab_size=96, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=10000.0, norm_eps=1e-5,
                tie_embeddings=False, name="hf-test")
FFN_WIDTH, N_BLOCKS = 96, 2
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": CONFIG.dim,
             "intermediate_size": FFN_WIDTH, "num_attention_heads": CONFIG.n_heads,
             "num_key_value_heads": CONFIG.n_kv_heads, "head_dim": CONFIG.head_dim, "num_hidden_layers": N_BLOCKS,
             "vocab_size": CONFIG.vocab_size, "rms_norm_eps": CONFIG.norm_eps, "rope_theta": CONFIG.rope_theta,
             "tie_word_embeddings": False, "max_position_embeddings": 128, "torch_dtype": "bfloat16"}


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch does)."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def random_weights(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(CONFIG, [BlockLayout(True, FFN_WIDTH)] * N_BLOCKS)
    return {name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else
                   rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
            for name, shape in shapes.items()}


def write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """The safetensors layout written by hand (8-byte header size, JSON header, raw little-endian data), so that
    dtypes NumPy lacks (BF16) can be written: tensors maps name -> (safetensors dtype, raw array)."""
    header, offset = {}, 0
    for name, (dtype, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(raw.shape), "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(raw.tobytes() for _, raw in tensors.values()))


def bf16_folder(folder, weights, shards=1):
    """An HF folder with bfloat16 weights, split over `shards` files with an index when shards > 1."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    names = sorted(weights)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else \
        ["model.safetensors"]
    weight_map = {name: files[i % shards] for i, name in enumerate(names)}
    for file in files:
        write_safetensors(folder / file, {n: ("BF16", bfloat16_bits(weights[n])) for n in names if weight_map[n] == file})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_bfloat16_conversion_is_exact():
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 2.0 ** -126, 2.0 ** -133], dtype=np.float32)  # all bfloat16
    assert np.array_equal(bfloat16_to_float32(bfloat16_bits(values)), values)


def test_bfloat16_folder_loads(tmp_path):
    weights = random_weights()
    model = reffuse.load_model(bf16_folder(tmp_path / "hf", weights, shards=2))
    rounded = bfloat16_to_float32(bfloat16_bits(weights["model.layers.1.mlp.down_proj.weight"]))
    assert model.dtype == np.float32
    assert np.array_equal(model.blocks[1].ffn.down, rounded)
    assert np.array_equal(model.lm_head, bfloat16_to_float32(bfloat16_bits(weights["lm_head.weight"])))


def test_missing_shard_is_named(tmp_path):
    folder = bf16_folder(tmp_path / "hf", random_weights(), shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ReffuseError, match=r"incomplete: 1 of the 3 weight files .* \(model-00002-of-00003"):
        reffuse.load_model(folder)


def test_missing_tensor_is_named(tmp_path):
    weights = random_weights()
    del weights["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ReffuseError, match=r"missing tensors: model\.layers\.0\.self_attn\.k_proj\.weight"):
        reffuse.load_model(bf16_folder(tmp_path / "hf", weights))


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ReffuseError, match=r"no \*\.safetensors weights \(reffuse reads no pickled"):
        reffuse.load_model(folder)


def test_truncated_safetensors_is_named(tmp_path):
    folder = bf16_folder(tmp_path / "hf", random_weights())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ReffuseError, match=r"model\.safetensors could not be read as safetensors"):
        reffuse.load_model(folder)


def test_same_logits_as_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = bf16_folder(tmp_path / "hf", random_weights())
    ids = np.random.default_rng(2).integers(0, CONFIG.vocab_size, 24)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)[None]).logits[0].numpy()
    logits = reffuse.forward(reffuse.load_model(folder), ids)
    # float32 on both sides, two small blocks: differences are a few roundings of values ~1
    assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_transformers_loads_a_saved_smollm2_folder_as_it_is(smollm2, tmp_path):
    """A plain Llama saved by reffuse is an HF folder: from_pretrained alone, the same logits (float32 targets)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = reffuse.save_model(smollm2, tmp_path / "smollm2")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    assert hf.config.intermediate_size == 1536 and hf.config.max_position_embeddings == 8192
    ids = np.array([504, 3575, 282, 4649, 314])
    with torch.inference_mode():
        theirs = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    ours = reffuse.forward(smollm2, ids)
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()
