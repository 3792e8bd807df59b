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

from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.layout import original_layers
from reffuse.core.model import Model, forward, lm_logits, run_blocks
from reffuse.errors import ReffuseError
from reffuse.evaluation.scoring import (PerToken, Scores, check_windows, chunked_log_softmax, exp_saturating,
                                       score_windows)


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
    windows = check_windows(model, windows)
    streams, log_probs, nll = [], [], 0.0
    for ids in windows:
        hidden = []
        logits = to_numpy(forward(model, ids, hidden_states=hidden))[:-1]  # after the embedding and every block
        if len(hidden) != len(model.blocks) + 1:
            raise ReffuseError("cache_prefix needs a model whose blocks run one by one (no parallel groups)")
        streams.append(hidden)
        lp = chunked_log_softmax(logits)
        nll -= float(lp[np.arange(len(lp)), ids[1:]].sum())
        log_probs.append(lp.astype(model.dtype))
    return Prefix(model, windows, streams, log_probs, nll)


def run_from(model: Model, first: int, x, positions, parallel=(), whole_blocks: bool = False):
    """Blocks first.. of `model` on the stream x [T, d] entering block `first` (runs `parallel` in the parallel
    form, whole blocks if `whole_blocks`); the next-token logits [T, vocab]."""
    cos, sin = model.rope(positions)
    return lm_logits(model, run_blocks(model, x, cos, sin, start=first, parallel=parallel, whole_blocks=whole_blocks))


def variant_logits(prefix: Prefix, variant: Model, first: int, window: int, parallel=(), whole_blocks=False):
    """Logits [W, vocab] of `variant`, which equals the base model on blocks 0..first-1, on one cached window."""
    if not 0 <= first <= len(variant.blocks):
        raise ReffuseError(f"first changed block {first} is out of range for a model of {len(variant.blocks)} "
                           "blocks")
    x = prefix.streams[window][first]
    return run_from(variant, first, x, np.arange(x.shape[0]), parallel, whole_blocks)


def score_variant(prefix: Prefix, variant: Model, first: int, kl_only: bool = False,
                  reference: Prefix | None = None, parallel=(), whole_blocks: bool = False,
                  per_token: bool = False) -> Scores:
    """Perplexity, KL(base || variant) and top-1 agreement of `variant` on the cached windows (as `evaluate`).

    reference: another model's Prefix on the same windows (e.g. the original model's, when the base is the
    attention-removed one); its KL and top-1 agreement are added as kl_from_reference, top1_agreement_reference.
    parallel, whole_blocks: runs of the variant computed in the parallel form (reffuse.core.model.run_blocks).
    per_token: add per_token, each prediction's KL(base || variant), negative log-likelihood and top-1
        agreement (0/1), one list per window, for paired intervals (reffuse.stats.paired_difference).
    """
    if reference is not None and [len(w) for w in reference.windows] != [len(w) for w in prefix.windows]:
        raise ReffuseError("the reference prefix was cached on other windows than the base prefix")

    t = score_windows(prefix.windows, lambda w: variant_logits(prefix, variant, first, w, parallel, whole_blocks),
                      _cached(prefix), _cached(reference) if reference is not None else None, kl_only)
    n = t.predictions
    measured = {} if kl_only else {"perplexity": exp_saturating(t.nll / n), "mean_nll": t.nll / n,
                                   "base_perplexity": exp_saturating(prefix.base_nll / n),
                                   "top1_agreement": t.agree / n}
    against_reference = {} if reference is None else {
        "kl_from_reference": t.kl_reference / n, "top1_agreement_reference": t.agree_reference / n,
        "reference_perplexity": exp_saturating(reference.base_nll / n)}
    each = PerToken(_rounded(t.window_kl), _rounded(t.window_nll),
                    [window.astype(int).tolist() for window in t.window_agree]) if per_token else None
    return Scores(n, kl_from_base=t.kl / n, per_token=each, **measured, **against_reference)


def _cached(prefix: Prefix):
    """The prefix's log-probabilities as score_windows reads them: window -> rows -> float64 [rows, vocab]."""
    return lambda w: (lambda rows: prefix.log_probs[w][rows].astype(np.float64))


PER_TOKEN_DIGITS = 5  # significant digits of per-prediction values in JSON


def _rounded(windows) -> list:
    """Per-prediction values for JSON, one list per window, to PER_TOKEN_DIGITS significant digits (the means
    are computed before rounding; a mean of rounded values differs from them by about 10^-5 relative)."""
    return [[float(f"{v:.{PER_TOKEN_DIGITS}g}") for v in window] for window in windows]


def sink_restored(prefix: Prefix, variant: Model, first: int, layer: int, parallel=(), whole_blocks: bool = False,
                  per_token: bool = False) -> Scores:
    """KL(base || variant) with the first token's stream put back: `variant` runs from block `first` up to the
    block that stands for `layer` of the base model, position 0's stream there is replaced by the base model's,
    and the rest runs on. What the variant's damage is without the change it made to the attention sink.

    layer: a block boundary of the base model that the variant also has (a fused run's end, not its inside).
    per_token: add each prediction's KL, one list per window, as score_variant does (Scores)."""
    starts = [span[0] for span in original_layers(variant)] + [len(prefix.model.blocks)]
    if layer not in starts or layer < first:
        raise ReffuseError(f"layer {layer} is not a block boundary of the variant at or after block {first}")
    stop = starts.index(layer)
    before, after = [r for r in parallel if r[1] < stop], [r for r in parallel if r[0] >= stop]
    if len(before) + len(after) != len(parallel):
        raise ReffuseError(f"layer {layer} lies inside a parallel run of {list(parallel)}: restore the sink at a "
                           "run's end")

    def logits(w):
        x = prefix.streams[w][first]
        positions = np.arange(x.shape[0])
        cos, sin = variant.rope(positions)
        x = run_blocks(variant, x, cos, sin, start=first, stop=stop, parallel=before, whole_blocks=whole_blocks)
        x = x.copy()
        x[0] = prefix.streams[w][layer][0]                  # the base model's sink stream at `layer`
        return lm_logits(variant, run_blocks(variant, x, cos, sin, start=stop, parallel=after,
                                             whole_blocks=whole_blocks))

    t = score_windows(prefix.windows, logits, _cached(prefix), kl_only=True)
    return Scores(t.predictions, kl_from_base=t.kl / t.predictions,
                  per_token=PerToken(_rounded(t.window_kl)) if per_token else None)


def kl_from_base(prefix: Prefix, variant: Model, first: int) -> float:
    """Mean over the cached predictions of KL(base || variant) of the next-token distributions, in nats."""
    return score_variant(prefix, variant, first, kl_only=True).kl_from_base
