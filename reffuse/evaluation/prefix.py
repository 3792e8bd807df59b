"""Evaluating many variants of one model cheaply: cache the base model's residual stream, re-run only what changed.

Removing a sub-block, fusing a run or refitting a fused block changes the model from some block `first` on;
blocks 0..first-1 are the base model's, so their output (the residual stream entering block `first`) is the
base model's too. `cache_prefix` runs the base model once per token window and keeps the stream entering every
block and the base model's next-token log-probabilities; `score_variant` then runs only a variant's blocks from
`first` on, plus the final norm and LM head. Scoring every block's removal costs about n²/2 block evaluations
instead of n² (and the base model runs once, not once per variant).

A variant may have fewer blocks than the base (a fused block stands where its run began), so `first` must be
a block at or before the first changed one, numbered the same in both models.

The scores are reffuse.evaluation.scoring's, with the same definitions (a window of W tokens gives W - 1 predictions;
perplexity, KL(base || variant) in nats, top-1 agreement), so score_variant(cache_prefix(base, windows),
variant, first) equals evaluate(variant, windows, base) up to float rounding (tests check it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import array_module, to_numpy
from reffuse.errors import ReffuseError
from reffuse.core.model import Model, block_forward, check_token_ids, forward, rms_norm, rope_tables

CHUNK_ROWS = 128  # positions per float64 log-softmax: 128 x 49152 x 8 bytes = 50 MB for SmolLM2


def log_softmax(logits) -> np.ndarray:
    """log p over the last axis, computed in float64 so that small KL divergences do not drown in rounding."""
    z = to_numpy(logits).astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def kl_per_token(base_log_probs, log_probs) -> np.ndarray:
    """KL(base || variant) at every position, [T], in nats."""
    return np.sum(np.exp(base_log_probs) * (base_log_probs - log_probs), axis=-1)


@dataclass
class Prefix:
    """The base model's residual stream and predictions on fixed token windows."""
    model: Model
    windows: list[np.ndarray]    # token ids, one 1-D array per window
    streams: list[list]          # streams[w][i]: the stream entering block i of window w, [W, d]
    log_probs: list[np.ndarray]  # the base model's log-probabilities of each window's predictions, [W - 1, vocab]
    base_nll: float              # the base model's summed negative log-likelihood of the next tokens

    @property
    def predictions(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def cache_prefix(model: Model, windows) -> Prefix:
    """Run `model` once on every window of token ids; keep its stream entering each block and its predictions.

    The log-probabilities are stored in the model's dtype (float32 for a float32 model: its logits carry no more)
    and used in float64.
    """
    windows = [check_token_ids(model, w) for w in windows]
    if not windows:
        raise ReffuseError("no token windows given: pass at least one window of token ids")
    if any(len(w) < 2 for w in windows):
        raise ReffuseError("a window of 1 token has nothing to predict: windows need at least 2 tokens")
    streams, log_probs, nll = [], [], 0.0
    for ids in windows:
        hidden = []
        logits = to_numpy(forward(model, ids, hidden_states=hidden))[:-1]  # after the embedding and every block
        if len(hidden) != len(model.blocks) + 1:
            raise ReffuseError("cache_prefix needs a model whose blocks run one by one (no parallel groups)")
        streams.append(hidden)
        lp = np.concatenate([log_softmax(logits[s:s + CHUNK_ROWS]) for s in range(0, len(logits), CHUNK_ROWS)])
        nll -= float(lp[np.arange(len(lp)), ids[1:]].sum())
        log_probs.append(lp.astype(model.dtype))
    return Prefix(model, windows, streams, log_probs, nll)


def run_from(model: Model, first: int, x, positions):
    """Blocks first.. of `model` on the stream x [T, d] entering block `first`; the next-token logits [T, vocab]."""
    cfg = model.config
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, model.dtype, array_module(x))
    for layer in range(first, len(model.blocks)):
        x = block_forward(model, layer, x, cos, sin)
    return rms_norm(x, model.norm, cfg.norm_eps) @ model.lm_head.T  # [T, d] -> [T, vocab]


def variant_logits(prefix: Prefix, variant: Model, first: int, window: int):
    """Logits [W, vocab] of `variant`, which equals the base model on blocks 0..first-1, on one cached window."""
    if not 0 <= first <= len(variant.blocks):
        raise ReffuseError(f"first changed block {first} is out of range for a model of {len(variant.blocks)} "
                           "blocks")
    x = prefix.streams[window][first]
    return run_from(variant, first, x, np.arange(x.shape[0]))


def score_variant(prefix: Prefix, variant: Model, first: int, kl_only: bool = False,
                  reference: Prefix | None = None) -> dict:
    """Perplexity, KL(base || variant) and top-1 agreement of `variant` on the cached windows (as `evaluate`).

    reference: another model's Prefix on the same windows (e.g. the original model's, when the base is the
    attention-removed one); its KL and top-1 agreement are added as kl_from_reference, top1_agreement_reference.
    """
    return score_logits(prefix, lambda w: variant_logits(prefix, variant, first, w), kl_only, reference)


def score_logits(prefix: Prefix, logits_of, kl_only: bool = False, reference: Prefix | None = None) -> dict:
    """score_variant for any way of computing a variant's logits: logits_of(window index) -> [W, vocab]."""
    if reference is not None and [len(w) for w in reference.windows] != [len(w) for w in prefix.windows]:
        raise ReffuseError("the reference prefix was cached on other windows than the base prefix")
    kl = nll = kl_ref = 0.0
    agree = agree_ref = 0
    for w, ids in enumerate(prefix.windows):
        logits = to_numpy(logits_of(w))[:-1]                               # [W, vocab] -> [W - 1, vocab]
        targets = ids[1:]
        for start in range(0, len(targets), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            log_probs = log_softmax(logits[rows])                          # [rows, vocab] float64
            base_log_probs = prefix.log_probs[w][rows].astype(np.float64)
            kl += float(kl_per_token(base_log_probs, log_probs).sum())
            if not kl_only:
                nll -= float(log_probs[np.arange(log_probs.shape[0]), targets[rows]].sum())
                agree += int((log_probs.argmax(-1) == base_log_probs.argmax(-1)).sum())
            if reference is not None:
                reference_log_probs = reference.log_probs[w][rows].astype(np.float64)
                kl_ref += float(kl_per_token(reference_log_probs, log_probs).sum())
                agree_ref += int((log_probs.argmax(-1) == reference_log_probs.argmax(-1)).sum())
    n = prefix.predictions
    scores = {"kl_from_base": kl / n, "predictions": n}
    if not kl_only:
        scores.update({"perplexity": _exp(nll / n), "mean_nll": nll / n, "base_perplexity": _exp(prefix.base_nll / n),
                       "top1_agreement": agree / n})
    if reference is not None:
        scores.update({"kl_from_reference": kl_ref / n, "top1_agreement_reference": agree_ref / n,
                       "reference_perplexity": _exp(reference.base_nll / n)})
    return scores


def kl_from_base(prefix: Prefix, variant: Model, first: int) -> float:
    """Mean over the cached predictions of KL(base || variant) of the next-token distributions, in nats."""
    return score_variant(prefix, variant, first, kl_only=True)["kl_from_base"]


def _exp(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < math.log(np.finfo(np.float64).max) else math.inf
