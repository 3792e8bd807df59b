"""Llama, Llama-3 RoPE scaling (llama3, linear), Qwen2 (q/k/v biases), Mistral (head_dim other than d / n_heads,
a sliding window) and an untied head with attention biases, each against transformers' own classes in float64,
in both directions: a random-weight model built and saved by transformers loads in reffuse with its logits, and
transformers' from_pretrained loads reffuse's HF export of it back with the same logits.

transformers computes RMSNorm, the RoPE tables and the eager softmax in float32 whatever the model's dtype; for a
float64 comparison those three are kept in float64 here with transformers' own formulas (its RoPE initialisation
functions, `_compute_llama3_parameters` included, evaluated with torch.float standing for float64). Both sides
then compute in float64 throughout: logits agree to ~1e-15 of the largest, so 1e-10 is a wide margin that still
catches any difference of formula (a wrong theta or scaling costs more than 1e-3).
"""

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reffuse  # noqa: E402
from reffuse.core.model import forward  # noqa: E402
from reffuse.formats.hf_config import ARITHMETIC_FREE_KEYS, READ_KEYS  # noqa: E402

pytestmark = pytest.mark.slow  # transformers and torch take seconds to import

TOLERANCE = 1e-10  # of the largest logit, float64 on both sides (see the module docstring)
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama, rope_theta 500000": lambda: transformers.LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama, llama3 RoPE scaling": lambda: transformers.LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 32}),  # short, medium and long wavelengths
    "llama, linear RoPE scaling": lambda: transformers.LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama, untied head, attention biases": lambda: transformers.LlamaConfig(
        **SMALL, attention_bias=True, tie_word_embeddings=False),
    "qwen2, q/k/v biases, tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "mistral, head_dim 24 (not 64 / 4)": lambda: transformers.MistralConfig(**SMALL, head_dim=24),
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


@contextlib.contextmanager
def float64_transformers():
    """transformers' RMSNorm, RoPE tables and eager softmax kept in the input's dtype, with its own formulas."""
    from transformers import modeling_rope_utils
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        init = (self.compute_default_rope_parameters if self.rope_type == "default"
                else modeling_rope_utils.ROPE_INIT_FUNCTIONS[self.rope_type])
        single, torch.float = torch.float, torch.float64  # its formulas name torch.float for their dtype
        try:
            inv_freq, scale = init(self.config)
        finally:
            torch.float = single
        angles = position_ids[..., None].to(torch.float64) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * scale).to(x.dtype), (angles.sin() * scale).to(x.dtype)

    replaced = [(getattr(module, prefix + part), "forward", function)
                for module, prefix in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2"),
                                       (modeling_mistral, "Mistral"))
                for part, function in (("RMSNorm", rms_norm), ("RotaryEmbedding", rotary))]
    replaced.append((torch.nn.functional, "softmax", lambda x, dim=-1, dtype=None, **_: torch.softmax(x, dim=dim)))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replaced]
    for owner, name, function in replaced:
        setattr(owner, name, function)
    try:
        yield
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)


def transformers_logits(model, ids) -> np.ndarray:
    with float64_transformers(), torch.no_grad():
        return model.to(torch.float64)(torch.as_tensor(ids)[None]).logits[0].numpy()


def relative(ours, theirs) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_against_transformers_in_float64_both_ways(family, tmp_path):
    config = FAMILIES[family]()
    torch.manual_seed(0)
    built = getattr(transformers, CLASSES[config.model_type])(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero; give them values that matter
        for name, parameter in built.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    built.save_pretrained(tmp_path / "theirs")
    ours = reffuse.load_model(tmp_path / "theirs", dtype="float64")
    ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], 200)
    logits = forward(ours, ids)
    error = relative(logits, transformers_logits(built, ids))
    print(f"{family}: reffuse vs transformers, float64, {error:.1e} of the largest logit")
    assert error <= TOLERANCE

    back = transformers.AutoModelForCausalLM.from_pretrained(
        reffuse.save_model(ours, tmp_path / "ours"), dtype=torch.float64, attn_implementation="eager").eval()
    assert type(back).__name__ == CLASSES[config.model_type]
    assert relative(logits, transformers_logits(back, ids)) <= TOLERANCE


@pytest.mark.parametrize("config_class", ["LlamaConfig", "Qwen2Config", "MistralConfig"])
def test_every_key_of_transformers_configs_is_read_or_known_not_to_change_the_arithmetic(config_class):
    keys = set(getattr(transformers, config_class)().to_dict())
    unaccounted = sorted(keys - READ_KEYS - set(ARITHMETIC_FREE_KEYS))
    assert not unaccounted, f"{config_class} keys neither read nor declared arithmetic-free: {unaccounted}"
