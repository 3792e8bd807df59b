"""`tiny`: a small synthetic Llama, built from a seed, for fast tests and the offline path.

It is random, not trained: it shows that code runs and that fusion is exact, never what a real model does.
Its layout has an attention-free run (blocks 4-9, six blocks) with unequal FFN widths, so fusion can be shown.
"""

from __future__ import annotations

import numpy as np

from reffuse.core.config import Config
from reffuse.core.model import FFN, Attention, Block, Model

TINY_CONFIG = Config(vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=10000.0,
                     norm_eps=1e-5, tie_embeddings=True, name="tiny (synthetic, random weights)")
TINY_ATTENTION = [True] * 4 + [False] * 6 + [True] * 2      # blocks 4..9 are attention-free
TINY_FFN_WIDTHS = [128, 96, 160, 128, 64, 192, 96, 128, 160, 112, 144, 128]


# SmolLM2-135M's exact shapes with random weights: what a GPU run measures speed on where no weights can be
# fetched (it computes nothing meaningful).
SMOLLM2_SHAPED_CONFIG = Config(vocab_size=49152, dim=576, n_heads=9, n_kv_heads=3, head_dim=64, rope_theta=100000.0,
                               norm_eps=1e-5, tie_embeddings=True, name="synthetic-smollm2 (random weights)")


def build_synthetic(cfg: Config, attention: list[bool], ffn_widths: list[int], seed: int = 0,
                    dtype=np.float32) -> Model:
    """A random Llama of the given config and per-block layout; the same seed gives the same weights everywhere."""
    rng = np.random.default_rng(seed)
    d, hd = cfg.dim, cfg.head_dim

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def gain():  # gains away from 1, so that folding them into the weights is visible
        return (1.0 + 0.2 * rng.standard_normal(d)).astype(dtype)

    blocks = []
    for has_attention, width in zip(attention, ffn_widths):
        attention_weights = None
        if has_attention:
            attention_weights = Attention(norm_gain=gain(), q=normal(cfg.n_heads * hd, d, scale=d ** -0.5),
                                          k=normal(cfg.n_kv_heads * hd, d, scale=d ** -0.5),
                                          v=normal(cfg.n_kv_heads * hd, d, scale=d ** -0.5),
                                          o=normal(d, cfg.n_heads * hd, scale=0.25 * (cfg.n_heads * hd) ** -0.5))
        ffn = FFN(norm_gain=gain(), gate=normal(width, d, scale=d ** -0.5), up=normal(width, d, scale=d ** -0.5),
                  down=normal(d, width, scale=0.25 * width ** -0.5))
        blocks.append(Block(attention_weights, ffn))
    embed = normal(cfg.vocab_size, d, scale=1.0)
    return Model(cfg, embed, blocks, gain(), embed)


def build_tiny(seed: int = 0, dtype=np.float32) -> Model:
    """The synthetic tiny model; the same seed gives the same weights on every machine."""
    return build_synthetic(TINY_CONFIG, TINY_ATTENTION, TINY_FFN_WIDTHS, seed, dtype)


def build_smollm2_shaped(seed: int = 0, dtype=np.float32) -> Model:
    """SmolLM2-135M's shapes (30 blocks, d 576, 9 heads, 3 kv heads, FFN 1536), random weights."""
    return build_synthetic(SMOLLM2_SHAPED_CONFIG, [True] * 30, [1536] * 30, seed, dtype)
