"""Evaluating many variants of one model cheaply: cache the base model's residual stream, re-run only what changed.

Removing a sub-block, fusing a run or refitting a fused block changes the model from some block `first` on;
blocks 0..first-1 are the base model's, so their output (the residual stream entering block `first`) is the
base model's too. `cache_prefix` runs the base model once per token window and keeps the stream entering every
block; `variant_logits` then runs only a variant's blocks from `first` on, plus the final norm and LM head.
Scoring every block's removal costs about n²/2 block evaluations instead of n².

A variant may have fewer blocks than the base (a fused block stands where its run began), so `first` must be
a block at or before the first changed one, numbered the same in both models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_numpy
from .errors import ReffuseError
from .model import Model, block_forward, check_token_ids, forward, rms_norm, rope_tables


@dataclass
class Prefix:
    """The base model's residual stream on fixed token windows."""
    model: Model
    windows: list[np.ndarray]  # token ids, one 1-D array per window
    streams: list[list]        # streams[w][i]: the stream entering block i of window w, [T, d]; [n] is after the last
    log_probs: list[np.ndarray]  # the base model's next-token log-probabilities per window, [T, vocab]

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)


def log_softmax(logits) -> np.ndarray:
    """log p over the last axis, computed in float64 so that small KL divergences do not drown in rounding."""
    z = to_numpy(logits).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_token(base_log_probs, log_probs) -> np.ndarray:
    """KL(base || variant) at every position, [T], in nats."""
    return np.sum(np.exp(base_log_probs) * (base_log_probs - log_probs), axis=-1)


def cache_prefix(model: Model, windows) -> Prefix:
    """Run `model` once on every window of token ids and keep its stream entering each block."""
    windows = [check_token_ids(model, w) for w in windows]
    if not windows:
        raise ReffuseError("no token windows given: pass at least one window of token ids")
    streams, log_probs = [], []
    for ids in windows:
        hidden = []
        logits = forward(model, ids, hidden_states=hidden)  # hidden: after the embedding and after every block
        if len(hidden) != len(model.blocks) + 1:
            raise ReffuseError("cache_prefix needs a model whose blocks run one by one (no parallel groups)")
        streams.append(hidden)
        log_probs.append(log_softmax(logits))
    return Prefix(model, windows, streams, log_probs)


def run_from(model: Model, first: int, x, positions):
    """Blocks first.. of `model` on the stream x [T, d] entering block `first`; the next-token logits [T, vocab]."""
    cfg = model.config
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, model.dtype, array_module(x))
    for layer in range(first, len(model.blocks)):
        x = block_forward(model, layer, x, cos, sin)
    return rms_norm(x, model.norm, cfg.norm_eps) @ model.lm_head.T  # [T, d] -> [T, vocab]


def variant_logits(prefix: Prefix, variant: Model, first: int, window: int):
    """Logits of `variant`, which equals the base model on blocks 0..first-1, on one cached window."""
    if not 0 <= first <= len(variant.blocks):
        raise ReffuseError(f"first changed block {first} is out of range for a model of {len(variant.blocks)} "
                           "blocks")
    x = prefix.streams[window][first]
    return run_from(variant, first, x, np.arange(x.shape[0]))


def kl_from_base(prefix: Prefix, variant: Model, first: int) -> float:
    """Mean over every cached token of KL(base || variant) of the next-token distributions, in nats."""
    total = 0.0
    for w in range(len(prefix.windows)):
        total += float(kl_per_token(prefix.log_probs[w], log_softmax(variant_logits(prefix, variant, first, w))).sum())
    return total / prefix.tokens
