"""Generating text token by token with the KV cache: one forward pass over the prompt, then one per new token.

    new_ids = generate(model, prompt_ids, max_new_tokens=32)                    # greedy
    new_ids = generate(model, prompt_ids, 32, temperature=0.8, top_k=50, seed=0)  # sampled, reproducible

Each step picks the next token from the logits of the last position: the most likely one when temperature is 0
(greedy), else a sample from softmax(logits / temperature), restricted to the top_k most likely tokens if given.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from reffuse.core.backend import array_module
from reffuse.errors import ReffuseError
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import Model, check_token_ids, forward


MIN_TEMPERATURE = 1e-100  # below it, logits of ~1e2 divided by it would overflow float64's 1.8e308


def next_token(logits, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Pick one token from the logits [vocab] of one position, on the logits' device: only the token's id is
    copied to the host. Sampling draws its uniform number on the host and inverts the CDF on the device, which is
    what NumPy's Generator.choice(p=...) computes, so that CPU and GPU sample the same tokens."""
    xp = array_module(logits)
    logits = logits.astype(xp.float64)
    if temperature == 0:
        return int(xp.argmax(logits))
    scores = logits / temperature
    if top_k is not None and top_k < scores.size:
        kth_best = xp.partition(scores, -top_k)[-top_k]
        scores = xp.where(scores >= kth_best, scores, -xp.inf)  # ties at the k-th score are all kept
    probs = xp.exp(scores - scores.max())
    cdf = xp.cumsum(probs / probs.sum())
    cdf /= cdf[-1]
    uniform = xp.asarray([rng.random()])  # CuPy's searchsorted takes an array, not a Python float
    return int(xp.searchsorted(cdf, uniform, side="right")[0])


def generate(model: Model, token_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, on_token: Callable[[int], None] | None = None,
             stop_ids: Iterable[int] = ()) -> list[int]:
    """Up to max_new_tokens new token ids continuing token_ids.

    on_token(id) is called as each token is chosen (to stream it). Generation stops early after a token in
    stop_ids (e.g. the end-of-turn token of a chat), which is included in the result.
    """
    ids = check_token_ids(model, token_ids)
    if int(max_new_tokens) < 0:
        raise ReffuseError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise ReffuseError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}")
    if top_k is not None and int(top_k) < 1:
        raise ReffuseError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_k is not None and temperature == 0:
        raise ReffuseError(f"top_k {top_k} does nothing at temperature 0 (greedy decoding takes the most likely token): "
                           "give a temperature > 0 to sample among the top k, or no top_k")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ReffuseError(f"temperature {temperature} is so small that logits / temperature overflow: use 0 for "
                           f"greedy decoding, or a temperature of at least {MIN_TEMPERATURE:g}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ReffuseError(f"seed must be an integer >= 0 (or None), got {seed!r}")
    stop = set(int(i) for i in stop_ids)
    rng = np.random.default_rng(seed)
    cache = KVCache(model, len(ids) + int(max_new_tokens))

    new_ids: list[int] = []
    logits = forward(model, ids, cache=cache)[-1]                # prefill: the whole prompt at once -> [vocab]
    for step in range(int(max_new_tokens)):
        token = next_token(logits, temperature, top_k, rng)
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or step + 1 == max_new_tokens:
            break
        logits = forward(model, [token], cache=cache)[-1]       # decode: one new position, cached keys/values
    return new_ids
