"""A model's configuration: what its weights do not say by their shapes (Config), and how RoPE is stretched past
the training length (RopeScaling). Every reffuse.core.model.Model holds one; reffuse.formats reads it from a
config.json (reffuse.formats.hf_config, whose check_config refuses one that cannot be computed) or a GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass


ROPE_SCALINGS = ("linear", "llama3", "factors")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are stretched past the training length (HF's rope_parameters / rope_scaling).

    linear   every frequency divided by `factor` (positions interpolated)
    llama3   Llama-3.1's rule: wavelengths shorter than original_max_positions / high_freq_factor kept, longer
             than original_max_positions / low_freq_factor divided by `factor`, a linear blend in between
    factors  frequency i divided by factors[i] (llama.cpp's rope_freqs tensor, the form a GGUF holds either in)
    """
    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    factors: tuple[float, ...] = ()

    def to_json(self) -> dict:
        if self.kind == "factors":
            return {"rope_type": "factors", "factors": list(self.factors)}
        scaling = {"rope_type": self.kind, "factor": self.factor}
        if self.kind == "llama3":
            scaling.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                           original_max_position_embeddings=self.original_max_positions)
        return scaling


@dataclass(frozen=True)
class Config:
    """What the weights do not say by their shapes."""
    vocab_size: int
    dim: int                    # d, the width of the residual stream
    n_heads: int                # query heads
    n_kv_heads: int             # key/value heads (grouped-query attention when fewer than n_heads); the
                                # blocks' own weights may hold other counts (Nemotron-NAS)
    head_dim: int               # need not be dim / n_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the LM head reuses the token embedding
    name: str = "model"
    max_positions: int | None = None  # the context length it was trained for (None: not recorded)
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False      # q, k and v projections add a bias (Qwen2; Llama's attention_bias)
    o_bias: bool = False        # the output projection adds a bias (Llama's attention_bias)
    attention_window: int | None = None  # sliding-window attention (Mistral): computed exactly up to this many
                                         # positions, where it equals full attention, and refused beyond
