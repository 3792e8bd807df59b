"""How good a model is on real text, and how far it moved from a base model.

Each window of token ids is scored on its own: position t's logits predict token t+1, so a window of W
tokens gives W - 1 predictions (its first token has no context and gets none).

    perplexity      = exp(mean over predictions of -log p(next token))
    KL(base||model) = mean over predictions of Σ_v p_base(v) (log p_base(v) - log p_model(v)), in nats
    top-1 agreement = fraction of predictions where argmax p_model = argmax p_base

Log-probabilities come from a max-subtracted log-softmax in float64 (log_softmax), and sums are
accumulated in float64, so a KL of 1e-6 is not rounding noise. Positions are processed in chunks of rows,
so a long window's float64 log-probabilities never all exist at once.

`score_windows` is the one scoring loop: `evaluate` gives it a model (and a base model) to run, and
reffuse.evaluation.prefix gives it a variant's logits and the base model's cached log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.model import Model, check_token_ids, forward
from reffuse.errors import ReffuseError

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


def exp_saturating(mean_nll: float) -> float:
    """exp, saturating to inf: a model can be bad enough that its perplexity exceeds float range."""
    return math.exp(mean_nll) if mean_nll < math.log(np.finfo(np.float64).max) else math.inf


def row_chunks(n_rows: int):
    """Slices of at most CHUNK_ROWS positions covering 0..n_rows-1."""
    return [slice(start, start + CHUNK_ROWS) for start in range(0, n_rows, CHUNK_ROWS)]


def chunked_log_softmax(logits) -> np.ndarray:
    """log_softmax of logits [T, vocab] CHUNK_ROWS positions at a time (float64 [T, vocab])."""
    return np.concatenate([log_softmax(logits[rows]) for rows in row_chunks(len(logits))])


LogProbsOf = Callable[[slice], np.ndarray]  # rows of one window -> float64 log-probabilities [rows, vocab]


@dataclass
class Totals:
    """Sums over the predictions of some windows; divide by `predictions` for means."""
    predictions: int = 0
    nll: float = 0.0              # -Σ log p_model(next token)
    base_nll: float = 0.0         # -Σ log p_base(next token)
    kl: float = 0.0               # Σ KL(base || model)
    agree: int = 0                # predictions where argmax p_model = argmax p_base
    kl_reference: float = 0.0     # the same against a second reference distribution
    agree_reference: int = 0
    # the same per prediction, one array per window: KL(base || model), -log p_model(next token), agreement (0/1)
    window_kl: list = field(default_factory=list)
    window_nll: list = field(default_factory=list)
    window_agree: list = field(default_factory=list)


def score_windows(windows, logits_of: Callable[[int], object], base_of: Callable[[int], LogProbsOf] | None = None,
                  reference_of: Callable[[int], LogProbsOf] | None = None, kl_only: bool = False,
                  progress=None) -> Totals:
    """The scoring loop: for every window w of token ids, the logits logits_of(w) [W, vocab] against its next
    tokens and, if given, against base_of(w) and reference_of(w) (functions from rows to float64 log-probs).

    kl_only: only KL(base || model) is summed (the base is then required). `progress()` after each window.
    """
    totals = Totals()
    for w, ids in enumerate(windows):
        logits = to_numpy(logits_of(w))[:-1]                   # [W, vocab] -> [W - 1, vocab]: position t predicts t+1
        targets = ids[1:]
        base_rows = base_of(w) if base_of is not None else None
        reference_rows = reference_of(w) if reference_of is not None else None
        kl, nll, agree = [], [], []
        for rows in row_chunks(len(targets)):
            log_probs = log_softmax(logits[rows])              # [rows, vocab] float64
            positions = np.arange(log_probs.shape[0])
            if not kl_only:
                nll.append(-log_probs[positions, targets[rows]])
                totals.nll += float(nll[-1].sum())
            if base_rows is not None:
                base_log_probs = base_rows(rows)
                kl.append(kl_per_token(base_log_probs, log_probs))
                totals.kl += float(kl[-1].sum())
                if not kl_only:
                    totals.base_nll -= float(base_log_probs[positions, targets[rows]].sum())
                    agree.append(log_probs.argmax(-1) == base_log_probs.argmax(-1))
                    totals.agree += int(agree[-1].sum())
            if reference_rows is not None:
                reference_log_probs = reference_rows(rows)
                totals.kl_reference += float(kl_per_token(reference_log_probs, log_probs).sum())
                totals.agree_reference += int((log_probs.argmax(-1) == reference_log_probs.argmax(-1)).sum())
        for per_window, values in ((totals.window_kl, kl), (totals.window_nll, nll), (totals.window_agree, agree)):
            if values:
                per_window.append(np.concatenate(values))
        totals.predictions += len(targets)
        if progress is not None:
            progress()
    return totals


@dataclass(frozen=True)
class PerToken:
    """Each held-out prediction's KL(base || model), negative log-likelihood (nats) and top-1 agreement with the
    base (0/1), one list per window in window order; None where not measured."""
    kl: list
    nll: list | None = None
    top1: list | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, record: dict) -> PerToken:
        return cls(**record)


@dataclass(frozen=True)
class Scores:
    """A model's scores on held-out windows (evaluate, reffuse.evaluation.prefix.score_variant): perplexity and
    mean negative log-likelihood of the next tokens; against a base model KL(base || model) in nats, top-1
    agreement and the base's perplexity; against a second reference the same; each None where not measured."""
    predictions: int
    kl_from_base: float | None = None
    perplexity: float | None = None
    mean_nll: float | None = None
    base_perplexity: float | None = None
    top1_agreement: float | None = None
    kl_from_reference: float | None = None
    top1_agreement_reference: float | None = None
    reference_perplexity: float | None = None
    per_token: PerToken | None = None

    def to_json(self) -> dict:
        record = {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}
        if self.per_token is not None:
            record["per_token"] = self.per_token.to_json()
        return record

    @classmethod
    def from_json(cls, record: dict) -> Scores:
        per_token = record.get("per_token")
        return cls(**(record | {"per_token": PerToken.from_json(per_token) if per_token is not None else None}))


def check_windows(model: Model, windows) -> list[np.ndarray]:
    """Token windows as int64 arrays, each of at least 2 tokens (1 token has nothing to predict)."""
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


def evaluate(model: Model, windows, base: Model | None = None, progress=None) -> Scores:
    """Perplexity of `model` on token windows; with a base model also KL(base || model), top-1 agreement
    and the base model's own perplexity. `progress`, if given, is called after each window."""
    windows = check_windows(model, windows)
    if base is not None:
        _check_same_vocabulary(model, base)

    def base_of(w):
        base_logits = to_numpy(forward(base, windows[w]))[:-1]  # [W - 1, vocab]
        return lambda rows: log_softmax(base_logits[rows])

    t = score_windows(windows, lambda w: forward(model, windows[w]), base_of if base is not None else None,
                      progress=progress)
    n = t.predictions
    if base is None:
        return Scores(n, perplexity=exp_saturating(t.nll / n), mean_nll=t.nll / n)
    return Scores(n, perplexity=exp_saturating(t.nll / n), mean_nll=t.nll / n,
                  base_perplexity=exp_saturating(t.base_nll / n), kl_from_base=t.kl / n, top1_agreement=t.agree / n)


def perplexity(model: Model, windows) -> float:
    """exp of the mean next-token negative log-likelihood over the windows (each scored on its own)."""
    return evaluate(model, windows).perplexity
