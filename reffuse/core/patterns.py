"""Small random models of each block pattern a Nemotron-NAS (DeciLM) model may hold: the test models of the
conformance kit (`reffuse conformance`) and of reffuse's own tests.

A pattern is a list of blocks, each written as a short spec:

    "attn+ffn"          attention with the model's key/value heads, and a SwiGLU FFN of the default width
    "-+ffn"             attention absent (no_op), an FFN                       "attn+-"     FFN absent
    "-+-"               both absent                                              "lin+ffn"    linear attention
    "attn+lin"          linear FFN (a d x d map in place of the sub-block)
    "attn/1+ffn:32"     attention with 1 key/value head, an FFN of 32 units     (either part may carry these)

PATTERNS names the kit's patterns; FUSED names the one whose attention-free run is fused into a wide FFN. Widths
that vary are multiples of 256, so that a Nemotron-NAS folder, whose widths follow from ffn_mult in steps of 256,
holds them as different ffn_mult values (reffuse.formats.nemotron_nas).
"""

from __future__ import annotations


import numpy as np

from reffuse.core.config import Config
from reffuse.core.model import FFN, Attention, Block, Linear, Model
from reffuse.errors import ReffuseError

PATTERN_CONFIG = Config(vocab_size=260, dim=32, n_heads=4, n_kv_heads=2, head_dim=8, rope_theta=10000.0,
                        norm_eps=1e-5, tie_embeddings=False, name="pattern", max_positions=256)
DEFAULT_WIDTH = 48

# name -> (what it exercises, the blocks); every pattern starts and ends with a plain block so that the pattern
# sits between two ordinary ones, as it does in a real model.
PATTERNS = {
    "both-sub-blocks": ("every block with attention and an FFN (a plain Llama)", ["attn+ffn"] * 3),
    "attention-no-op": ("a block whose attention is absent", ["attn+ffn", "-+ffn", "attn+ffn"]),
    "ffn-no-op-attention-kept": ("a block that keeps attention and has no FFN (what FFN removal leaves)",
                                 ["attn+ffn", "attn+-", "attn+ffn"]),
    "both-no-op": ("a block with neither sub-block", ["attn+ffn", "-+-", "attn+ffn"]),
    "linear-attention": ("attention replaced by one d x d linear map", ["attn+ffn", "lin+ffn", "attn+ffn"]),
    "linear-ffn": ("the FFN replaced by one d x d linear map", ["attn+ffn", "attn+lin", "attn+ffn"]),
    "varying-heads-and-widths": ("key/value heads (n_heads_in_group) and FFN widths (ffn_mult) that differ by block",
                                 ["attn/1+ffn:256", "attn/4+ffn:768", "attn/2+ffn:512"]),
    "fused-wide-ffn": ("an attention-free run fused into one wide FFN (Theorem 3.1)",
                       ["attn+ffn", "-+ffn:128", "-+ffn:256", "-+ffn:384", "attn+ffn"]),
}
FUSED = {"fused-wide-ffn": [(1, 3)]}


def parse_block(spec: str) -> tuple[str | None, int | None, str | None, int]:
    """"attn/1+ffn:64" -> ("attn", 1, "ffn", 64): attention kind, its kv heads (None: the model's), FFN kind, width."""
    try:
        attention, ffn = spec.split("+")
        attention, _, kv = attention.partition("/")
        ffn, _, width = ffn.partition(":")
        if attention not in ("attn", "lin", "-") or ffn not in ("ffn", "lin", "-"):
            raise ValueError
        return (None if attention == "-" else attention, int(kv) if kv else None, None if ffn == "-" else ffn,
                int(width) if width else DEFAULT_WIDTH)
    except ValueError:
        raise ReffuseError(f"block spec {spec!r} is not ATTENTION+FFN with ATTENTION one of attn[/KV], lin, - and "
                           "FFN one of ffn[:WIDTH], lin, -") from None


def build_pattern(specs: list[str], seed: int = 0, config: Config = PATTERN_CONFIG, dtype=np.float64) -> Model:
    """A random model of the given block specs; the same seed gives the same weights on every machine. Scales keep
    every block's contribution of the order of the stream, so that a wrong sub-block shows in the logits."""
    rng = np.random.default_rng(seed)
    d, hd, heads = config.dim, config.head_dim, config.n_heads

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def gain():
        return (1.0 + 0.2 * rng.standard_normal(d)).astype(dtype)

    blocks = []
    for spec in specs:
        attention_kind, kv, ffn_kind, width = parse_block(spec)
        kv = kv or config.n_kv_heads
        attention = ffn = None
        if attention_kind == "attn":
            attention = Attention(gain(), normal(heads * hd, d, scale=d ** -0.5), normal(kv * hd, d, scale=d ** -0.5),
                                  normal(kv * hd, d, scale=d ** -0.5),
                                  normal(d, heads * hd, scale=0.5 * (heads * hd) ** -0.5))
        elif attention_kind == "lin":
            attention = Linear(gain(), normal(d, d, scale=0.5 * d ** -0.5))
        if ffn_kind == "ffn":
            ffn = FFN(gain(), normal(width, d, scale=d ** -0.5), normal(width, d, scale=d ** -0.5),
                      normal(d, width, scale=0.5 * width ** -0.5))
        elif ffn_kind == "lin":
            ffn = Linear(gain(), normal(d, d, scale=0.5 * d ** -0.5))
        blocks.append(Block(attention, ffn))
    embed = normal(config.vocab_size, d, scale=1.0)
    lm_head = embed if config.tie_embeddings else normal(config.vocab_size, d, scale=d ** -0.5)
    return Model(config, embed, blocks, gain(), lm_head)
