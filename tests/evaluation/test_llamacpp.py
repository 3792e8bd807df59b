"""llama.cpp as the second reference: SmolLM2, with attention removed, fused and calibrated, each exported as an
F32 GGUF (llama or deci) and run by llama.cpp's own kernels, give reffuse's logits and greedy ids."""

import numpy as np
import pytest

import reffuse
from reffuse.evaluation.activations import DEFAULT_TEXT
from reffuse.evaluation.verify import verify
from reffuse.method.calibrate import calibrated_fuse
from reffuse.method.pipeline import load_texts

pytest.importorskip("llama_cpp")


def test_llamacpp_agrees_on_the_original_removed_fused_and_calibrated_models(smollm2, smollm2_tokenizer, tmp_path):
    removed = reffuse.drop_attention(smollm2, list(range(5, 13)))
    groups = [(5, 8), (9, 11)]
    texts = load_texts("smollm2", smollm2, 512, 256)
    variants = {"attention removed": removed, "fused": reffuse.fuse(removed, groups),
                "calibrated": calibrated_fuse(removed, groups, texts.calibration.ids)[0]}
    sources = {"original": "smollm2"} | {name: str(reffuse.save_model(model, tmp_path / name.replace(" ", "-"),
                                                                      tokenizer=smollm2_tokenizer))
                                         for name, model in variants.items()}
    ids = np.asarray(smollm2_tokenizer.encode(DEFAULT_TEXT)[:64])
    for name, source in sources.items():
        result = verify(source, "llama.cpp", ids, generate_tokens=32)
        assert result.comparison.logits.relative <= 1e-4, name
        assert result.greedy.identical_prefix == 32, name
        assert ("deci" in result.against) == (name != "original")
