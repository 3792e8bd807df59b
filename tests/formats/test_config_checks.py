"""Configs and weights are checked before a model is built: each bad value is named, with what to do."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reffuse.core.generate import generate
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import forward
from reffuse.errors import ReffuseError
from reffuse.formats.checkpoint import load_folder, save_model
from reffuse.method.removal import drop_attention


@pytest.fixture
def folder(tmp_path, tiny32):
    return save_model(tiny32, tmp_path / "model")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 3}, "n_kv_heads 3 does not divide n_heads 4"),
    ({"num_attention_heads": 0}, "n_heads must be a positive integer, got 0"),
    ({"num_attention_heads": 2.5}, "num_attention_heads must be an integer, got 2.5"),
    ({"rms_norm_eps": 0}, "norm_eps must be a finite number > 0, got 0.0"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number, got '1e-5'"),
    ({"rope_theta": -1}, "rope_theta must be a finite number > 0, got -1.0"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number > 0, got inf"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"num_hidden_layers": 3}, "num_hidden_layers is 3 but blocks lists 12"),
    ({"format_version": 99}, "format_version 99 is not one this reffuse reads"),
    ({"max_position_embeddings": -4}, "max_positions must be a positive integer, got -4"),
])
def test_a_bad_config_value_is_named(folder, changes, message):
    edit_config(folder, **changes)
    with pytest.raises(ReffuseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_folder(folder)


def test_a_bad_block_entry_is_named(folder):
    config = json.loads((folder / "config.json").read_text())
    for blocks, message in [([{"attention": "yes", "ffn_width": 4}], "block 0: attention must be true or false"),
                            ([{"attention": True, "ffn_width": -1}], "ffn_width must be an integer >= 0"),
                            ([{"attention": False, "ffn_width": 4, "fused_from": [2, 1]}], "in increasing order"),
                            ([{"attention": False, "ffn_width": 4, "fused_from": [1, 2]},
                              {"attention": False, "ffn_width": 4, "fused_from": [2]}],
                             "block 1: fused_from names layer 2, which block 0 already stands for")]:
        (folder / "config.json").write_text(json.dumps(config | {"blocks": blocks, "num_hidden_layers": len(blocks)}))
        with pytest.raises(ReffuseError, match=message):
            load_folder(folder)


def test_non_finite_weights_are_refused(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = np.nan
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ReffuseError, match="tensor model.layers.3.mlp.down_proj.weight holds non-finite values"):
        load_folder(folder)


def test_a_sharded_checkpoint_loads_what_its_index_lists_and_nothing_else(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[5:]}, str(folder / "model-00002-of-00002.safetensors"))
    save_file({"stray.weight": np.zeros(2, np.float32)}, str(folder / "old-copy.safetensors"))
    weight_map = {n: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    load_folder(folder)  # the stray file is not merged in


def test_the_context_length_is_read_and_respected(folder, tiny32):
    edit_config(folder, max_position_embeddings=16)
    model = load_folder(folder)
    assert model.config.max_positions == 16
    with pytest.raises(ReffuseError, match="20 positions .* exceed the context length of .*, 16: shorten the prompt"):
        generate(model, [1] * 12, max_new_tokens=8)
    assert len(generate(model, [1] * 12, max_new_tokens=4)) == 4
    with pytest.raises(ReffuseError, match="needs .* GiB, more than this machine's"):
        generate(tiny32, [1], max_new_tokens=10 ** 12)


def test_a_kv_cache_of_another_model_is_refused(tiny32):
    other = drop_attention(tiny32, [0, 1])
    cache = KVCache(other, 8)
    with pytest.raises(ReffuseError, match="this KV cache was made for another model"):
        forward(tiny32, [1, 2], cache=cache)


@pytest.mark.parametrize("kwargs, message", [({"temperature": 1e-300}, "so small that logits / temperature overflow"),
                                             ({"seed": -1}, "seed must be an integer >= 0")])
def test_sampling_settings_that_cannot_work_are_refused(tiny32, kwargs, message):
    with pytest.raises(ReffuseError, match=message):
        generate(tiny32, [1, 2], 4, **({"temperature": 1.0} | kwargs))
