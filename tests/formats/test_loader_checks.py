"""What a loader or an export refuses before any work, each in one line that names the file, tensor or key and
what to do: weights that are not floats, files that are not regular files, GGUF tensors out of place or metadata
of the wrong type, Nemotron-NAS configs that contradict themselves, config keys reffuse does not read, an odd
head_dim, a config nested past reading; exports that cannot represent what they were given or that leave
something undone."""

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from reffuse.core.model import forward  # noqa: E402
from reffuse.core.patterns import build_pattern  # noqa: E402
from reffuse.errors import ReffuseError  # noqa: E402
from reffuse.formats.checkpoint import load_folder, save_model, save_nemotron_nas  # noqa: E402
from reffuse.formats.gguf import load_gguf  # noqa: E402
from reffuse.formats.gguf_export import plan_gguf, save_gguf  # noqa: E402
from reffuse.formats.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    return save_model(build_pattern(["attn+ffn", "attn/1+ffn"]), tmp_path / "model")


def edit(path, change):
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


# ---------------------------------------------------------------------------------------------------------------
# Weights and files


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int8])
def test_weights_that_are_not_floats_are_refused(folder, dtype):
    tensors = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(dtype)
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ReffuseError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight is (I32|BOOL|I8), not a "
                                           r"float type reffuse loads weights from \(F16, BF16, F32, F64"):
        load_folder(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_pipe_in_place_of_a_file_is_refused_without_reading_it(folder, name):
    (folder / name).unlink()
    os.mkfifo(folder / name)  # opening it to read would block until a writer comes: never
    with pytest.raises(ReffuseError, match=f"{name} is not a regular file"):
        load_folder(folder)


def test_a_pipe_in_place_of_a_gguf_is_refused(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    with pytest.raises(ReffuseError, match=r"model\.gguf is not a regular file"):
        load_gguf(tmp_path / "model.gguf")


# ---------------------------------------------------------------------------------------------------------------
# GGUF structure and metadata


@pytest.fixture
def gguf_file(tmp_path):
    return save_gguf(build_pattern(["attn+ffn", "-+ffn"]), tmp_path / "model.gguf", None)


def tensor_offsets(path):
    """name -> the writable offset field of each tensor's info (a view into the file)."""
    reader = gguf.GGUFReader(path, "r+")
    return reader, {t.name: t.field.parts[-1] for t in reader.tensors}


def test_overlapping_tensors_are_refused(gguf_file):
    reader, offsets = tensor_offsets(gguf_file)
    offsets["blk.1.ffn_up.weight"][0] = offsets["blk.1.ffn_gate.weight"][0]  # two tensors, one place
    reader.data.flush()
    with pytest.raises(ReffuseError, match=r"model\.gguf: tensors blk\.1\.ffn_(gate|up)\.weight and "
                                           r"blk\.1\.ffn_(gate|up)\.weight overlap"):
        load_gguf(gguf_file)


def test_a_misaligned_tensor_is_refused(gguf_file):
    reader, offsets = tensor_offsets(gguf_file)
    offsets["blk.0.ffn_down.weight"][0] += 4
    reader.data.flush()
    with pytest.raises(ReffuseError, match=r"tensor blk\.0\.ffn_down\.weight starts at offset \d+, not a multiple "
                                           r"of the file's alignment 32"):
        load_gguf(gguf_file)


def test_a_tensor_past_the_end_is_refused(gguf_file):
    reader, offsets = tensor_offsets(gguf_file)
    offsets["output_norm.weight"][0] = 1 << 40
    reader.data.flush()
    with pytest.raises(ReffuseError, match=r"model\.gguf is truncated: tensor output_norm\.weight"):
        load_gguf(gguf_file)


def write_metadata_variant(path, **changes):
    """A copy of a small GGUF with metadata values replaced (key -> value, written in the value's own type)."""
    model = build_pattern(["attn+ffn"])
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {"llama.block_count": 1, "llama.embedding_length": 32, "llama.feed_forward_length": 48,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
              "llama.attention.layer_norm_rms_epsilon": 1e-5} | changes
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    from reffuse.formats.checkpoint import model_to_tensors
    from reffuse.formats.gguf_export import gguf_name
    for name, array in model_to_tensors(model).items():
        writer.add_tensor(gguf_name(name), array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("changes, message", [
    ({"llama.embedding_length": "sixty-four"}, r"metadata llama\.embedding_length is 'sixty-four', not an integer"),
    ({"llama.attention.layer_norm_rms_epsilon": "tiny"}, r"layer_norm_rms_epsilon is 'tiny', not a number"),
    ({"reffuse.blocks": "[{not json"}, r"metadata reffuse\.blocks is not valid JSON"),
    ({"llama.rope.scaling.type": "yarn"}, r"rope\.scaling\.type is 'yarn', which reffuse does not compute"),
])
def test_metadata_of_the_wrong_type_is_named(tmp_path, changes, message):
    with pytest.raises(ReffuseError, match=message):
        load_gguf(write_metadata_variant(tmp_path / "m.gguf", **changes))


# ---------------------------------------------------------------------------------------------------------------
# Nemotron-NAS configs


@pytest.fixture
def nas(tmp_path):
    return save_nemotron_nas(build_pattern(["attn+ffn", "attn/1+ffn", "lin+ffn"]), tmp_path / "nas")


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.update(parallel_blocks=[[0, 1]]), "config.json has parallel_blocks, which reffuse does not read"),
    (lambda raw: raw["block_configs"][1].update(parallel_blocks=[{"attention": {}}]),
     "block 1 has parallel_blocks, which reffuse does not read"),
    (lambda raw: raw["block_configs"].__setitem__(1, "attention"), r"block_configs\[1\] is 'attention', not an object"),
    (lambda raw: raw["block_configs"][0].__setitem__("ffn", [1]), r"block 0's ffn is \[1\], not an object"),
    (lambda raw: raw["block_configs"][0]["attention"].update(n_heads_in_group=3),
     "n_heads_in_group = 3: it must be an integer >= 1 that divides num_attention_heads"),
    (lambda raw: [raw["block_configs"][1]["attention"].update(n_heads_in_group=2), raw.update(num_key_value_heads=4)],
     "num_key_value_heads is 4, but every block's n_heads_in_group is 2, which gives 2: the head counts contradict"),
    (lambda raw: raw["block_configs"][2]["ffn"].update(ffn_mult="wide"), "block 2's ffn has ffn_mult = 'wide'"),
])
def test_a_nemotron_config_that_reffuse_cannot_take_is_named(nas, change, message):
    edit(nas / "config.json", change)
    with pytest.raises(ReffuseError, match=message):
        load_folder(nas)


# ---------------------------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.update(head_dim=15), "head_dim 15 is odd: RoPE rotates pairs of dimensions"),
    (lambda raw: raw.update(quantization_config={"bits": 4}),
     "config.json's key 'quantization_config' is not one reffuse reads, and it may change what the model computes"),
    (lambda raw: raw.update(mlp_bias=True), "config.json's mlp_bias is true: reffuse's FFN has no biases"),
    (lambda raw: raw.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "rope_scaling has rope_type 'yarn', which reffuse does not compute"),
    (lambda raw: raw.update(rope_parameters={"rope_type": "llama3", "factor": 8.0, "beta_fast": 32}),
     "rope_parameters has 'beta_fast', which a llama3 RoPE does not take"),
    (lambda raw: raw.update(rope_parameters={"rope_theta": 1e4}, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "has both rope_parameters \\(transformers 5\\) and rope_scaling \\(transformers 4\\)"),
    (lambda raw: raw.update(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
     "rope_theta 10000.0 and rope_parameters's 500000.0 disagree"),
    (lambda raw: raw.update(partial_rotary_factor=0.5), "partial_rotary_factor is 0.5, which reffuse does not compute"),
])
def test_a_config_key_that_changes_the_arithmetic_is_read_or_refused_by_name(folder, change, message):
    edit(folder / "config.json", change)
    with pytest.raises(ReffuseError, match=message):
        load_folder(folder)


def test_both_rope_schemas_give_the_same_model(folder):
    """transformers 4's top-level rope_theta / rope_scaling and transformers 5's rope_parameters."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    edit(folder / "config.json", lambda raw: raw.update(rope_theta=500000.0, rope_scaling=scaling))
    old = load_folder(folder)
    edit(folder / "config.json", lambda raw: [raw.pop("rope_theta"), raw.pop("rope_scaling"),
                                              raw.update(rope_parameters=scaling | {"rope_theta": 500000.0})])
    new = load_folder(folder)
    assert old.config == new.config and new.config.rope_theta == 500000.0 and new.config.rope_scaling.factor == 8.0


def test_a_config_nested_past_reading_is_one_line(folder):
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ReffuseError, match="nests its JSON values too deeply to be a model config"):
        load_folder(folder)


def test_the_sliding_window_is_respected_not_ignored(folder):
    edit(folder / "config.json", lambda raw: raw.update(model_type="mistral", sliding_window=8))
    model = load_folder(folder)
    forward(model, np.arange(8))  # within the window: full attention is the same
    with pytest.raises(ReffuseError, match="9 positions exceed the sliding attention window of .*, 8"):
        forward(model, np.arange(9))


# ---------------------------------------------------------------------------------------------------------------
# Exports


def byte_tokenizer():
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return Tokenizer(backend, None, None, None, False, "256 bytes")


def test_an_export_refuses_a_tokenizer_of_another_vocabulary(tmp_path):
    with pytest.raises(ReffuseError, match=r"the tokenizer \(256 bytes\) has 256 tokens but pattern has 260"):
        save_gguf(build_pattern(["attn+ffn"]), tmp_path / "m.gguf", byte_tokenizer())
    assert not list(tmp_path.iterdir())


def test_a_q8_0_export_says_which_matrices_it_left_in_f32(tmp_path):
    model = build_pattern(["attn+ffn:40"])  # down [32, 40]: rows of 40 values, not whole Q8_0 blocks of 32
    plan = plan_gguf(model, "q8_0")
    assert plan.unquantized == ("blk.0.ffn_down.weight",)
    assert "1 matrix left F32, not Q8_0 (rows not a multiple of 32 values): blk.0.ffn_down.weight" in plan.notes()
    reader = gguf.GGUFReader(save_gguf(model, tmp_path / "m.gguf", None, "q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_a_q8_0_export_that_could_quantize_nothing_is_refused():
    from dataclasses import replace
    from reffuse.core.patterns import PATTERN_CONFIG
    model = build_pattern(["attn+ffn:40"], config=replace(PATTERN_CONFIG, dim=24, head_dim=6))
    with pytest.raises(ReffuseError, match="no matrix of pattern has rows of a multiple of 32 values .* export it as "
                                           "f32 or f16"):
        plan_gguf(model, "q8_0")


def test_a_model_without_attention_anywhere_exports_and_reads_back(tmp_path):
    model = build_pattern(["-+ffn", "-+ffn:64", "-+-"])
    back = load_gguf(save_gguf(model, tmp_path / "m.gguf", None), dtype="float64")
    assert back.layout().rows() == model.layout().rows()
    ids = np.arange(12)
    expected = forward(model, ids)
    assert np.abs(forward(back, ids) - expected).max() <= 1e-6 * np.abs(expected).max()  # stored as F32


def test_a_gguf_export_refuses_a_linear_ffn(tmp_path):
    with pytest.raises(ReffuseError, match="block 1 of pattern replaces the FFN by a linear map, which llama.cpp's "
                                           "deci graph does not compute"):
        save_gguf(build_pattern(["attn+ffn", "attn+lin"]), tmp_path / "m.gguf", None)
