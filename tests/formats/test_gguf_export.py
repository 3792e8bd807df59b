"""GGUF export: reffuse reads its own F32 export back exactly, plain Llamas as `llama`, fused models as `deci`."""

import json

import numpy as np
import pytest

import reffuse
from reffuse.core.model import plain
from reffuse.formats.gguf import load_gguf, open_gguf, metadata_value
from reffuse.formats.gguf_export import save_gguf
from reffuse.method.removal import drop_attention

gguf = pytest.importorskip("gguf")


def test_a_fused_model_round_trips_exactly_through_a_deci_gguf(smollm2, smollm2_tokenizer, tmp_path):
    removed = drop_attention(smollm2, list(range(5, 13)))
    fused = reffuse.fuse(removed, [(5, 8), (9, 11)])
    path = save_gguf(fused, tmp_path / "fused.gguf", smollm2_tokenizer)
    reader = open_gguf(path)
    assert metadata_value(reader, "general.architecture") == "deci"
    assert metadata_value(reader, "deci.attention.head_count")[5] == 0
    assert metadata_value(reader, "deci.feed_forward_length")[5] == 4 * 1536
    back = load_gguf(path, reader=reader)
    assert reffuse.layout(back).rows() == reffuse.layout(fused).rows()  # fused_from included
    ids = np.arange(20)
    np.testing.assert_array_equal(reffuse.forward(back, ids), reffuse.forward(plain(fused), ids))  # read plain


def test_smollm2_round_trips_exactly_through_a_llama_gguf(smollm2, smollm2_tokenizer, tmp_path):
    path = save_gguf(smollm2, tmp_path / "smollm2.gguf", smollm2_tokenizer)
    reader = open_gguf(path)
    assert metadata_value(reader, "general.architecture") == "llama"
    assert metadata_value(reader, "tokenizer.ggml.pre") == "smollm"
    assert metadata_value(reader, "tokenizer.chat_template") == smollm2_tokenizer.chat_template
    back = load_gguf(path, reader=reader)
    ids = np.arange(20)
    np.testing.assert_array_equal(reffuse.forward(back, ids), reffuse.forward(plain(smollm2), ids))
    assert json.loads(metadata_value(reader, "reffuse.blocks"))[0]["ffn_width"] == 1536
