"""How good a model is on real text, and how far it moved from a base model.

Each window of token ids is scored on its own: position t's logits predict token t+1, so a window of W
tokens gives W - 1 predictions (its first token has no context and gets none).

    perplexity      = exp(mean over predictions of -log p(next token))
    KL(base||model) = mean over predictions of Σ_v p_base(v) (log p_base(v) - log p_model(v)), in nats
    top-1 agreement = fraction of predictions where argmax p_model = argmax p_base

Log-probabilities come from a max-subtracted log-softmax in float64 (prefix.log_softmax), and sums are
accumulated in float64, so a KL of 1e-6 is not rounding noise. Positions are processed in chunks of rows,
so a long window's float64 log-probabilities never all exist at once.
"""

from __future__ import annotations

import math

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.errors import ReffuseError
from reffuse.core.model import Model, check_token_ids, forward
from reffuse.evaluation.prefix import kl_per_token, log_softmax

CHUNK_ROWS = 128  # positions per float64 log-softmax: 128 x 49152 x 8 bytes = 50 MB for SmolLM2


def _check_windows(model: Model, windows) -> list[np.ndarray]:
    windows = [check_token_ids(model, w) for w in windows]
    if not windows:
        raise ReffuseError("no token windows given: pass at least one window of token ids")
    short = [len(w) for w in windows if len(w) < 2]
    if short:
        raise ReffuseError(f"a window of {short[0]} token has nothing to predict: windows need at least 2 tokens")
    return windows


def _check_same_vocabulary(model: Model, base: Model) -> None:
    if base.config.vocab_size != model.config.vocab_size:
        raise ReffuseError(f"the base model's vocabulary ({base.config.vocab_size}) differs from the model's "
                           f"({model.config.vocab_size}): KL and agreement need the same tokenizer")


def _exp(mean_nll: float) -> float:
    """exp, saturating to inf: a model can be bad enough that its perplexity exceeds float range."""
    return math.exp(mean_nll) if mean_nll < math.log(np.finfo(np.float64).max) else math.inf


def evaluate(model: Model, windows, base: Model | None = None, progress=None) -> dict:
    """Perplexity of `model` on token windows; with a base model also KL(base || model), top-1 agreement
    and the base model's own perplexity. `progress`, if given, is called after each window."""
    windows = _check_windows(model, windows)
    if base is not None:
        _check_same_vocabulary(model, base)
    nll = base_nll = kl = 0.0
    agree = predictions = 0
    for ids in windows:
        targets = ids[1:]                                   # [W - 1]: what each position predicts
        logits = to_numpy(forward(model, ids))[:-1]         # [W, vocab] -> [W - 1, vocab]
        base_logits = to_numpy(forward(base, ids))[:-1] if base is not None else None
        for start in range(0, len(targets), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            log_probs = log_softmax(logits[rows])           # [rows, vocab] float64
            nll -= float(log_probs[np.arange(log_probs.shape[0]), targets[rows]].sum())
            if base is not None:
                base_log_probs = log_softmax(base_logits[rows])
                base_nll -= float(base_log_probs[np.arange(base_log_probs.shape[0]), targets[rows]].sum())
                kl += float(kl_per_token(base_log_probs, log_probs).sum())
                agree += int((logits[rows].argmax(-1) == base_logits[rows].argmax(-1)).sum())
        predictions += len(targets)
        if progress is not None:
            progress()
    result = {"perplexity": _exp(nll / predictions), "mean_nll": nll / predictions,
              "predictions": predictions}
    if base is not None:
        result.update({"base_perplexity": _exp(base_nll / predictions), "kl_from_base": kl / predictions,
                       "top1_agreement": agree / predictions})
    return result


def perplexity(model: Model, windows) -> float:
    """exp of the mean next-token negative log-likelihood over the windows (each scored on its own)."""
    return evaluate(model, windows)["perplexity"]
