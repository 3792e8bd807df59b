"""The KV cache and the checks on how many positions a model is asked to hold.

`KVCache(model, max_tokens)` preallocates the keys and values of every attention block with heads; `forward(model,
ids, cache=cache)` (reffuse.core.model) appends to it and advances it. `check_context` refuses, before anything is
computed, more positions than the model's context length or its attention window, or a cache that cannot fit in
memory; `check_window`, which `forward` runs on every call, the positions past a sliding attention window.

This module sits below reffuse.core.model, which imports it: it takes a model as it is (a reffuse.core.model.Model)
and tells the blocks whose keys and values are cached by their key projection (`_has_keys`).
"""

from __future__ import annotations

import os

from reffuse.core.backend import array_module
from reffuse.errors import ReffuseError


def check_context(model, positions: int) -> int:
    """Refuse more positions than the model's context length (or its attention window), or a KV cache for them
    that cannot fit in memory."""
    limit = model.config.max_positions
    if limit is not None and positions > limit:
        raise ReffuseError(f"{positions} positions (prompt and new tokens) exceed the context length of "
                           f"{model.config.name}, {limit}: shorten the prompt or ask for fewer new tokens")
    check_window(model, positions)
    kv_rows = sum(b.attention.k.shape[0] for b in model.blocks if _has_keys(b.attention))  # Σ n_kv·head_dim
    kv_bytes = 2 * kv_rows * positions * model.dtype.itemsize
    memory = _physical_memory()
    if memory is not None and kv_bytes > memory:
        raise ReffuseError(f"a KV cache of {positions} positions needs {kv_bytes / 2 ** 30:.1f} GiB, more than this "
                           f"machine's {memory / 2 ** 30:.1f} GiB: ask for fewer new tokens")
    return positions


def check_window(model, positions: int) -> None:
    """Refuse more positions than a sliding attention window: reffuse computes full attention, equal to it only
    within the window."""
    window = model.config.attention_window
    if window is not None and positions > window:
        raise ReffuseError(f"{positions} positions exceed the sliding attention window of {model.config.name}, "
                           f"{window}: reffuse computes full attention, which equals it only within the window; "
                           "shorten the input")


def _has_keys(part) -> bool:
    """An attention sub-block with heads, whose keys and values are cached (reffuse.core.model.has_heads): one with a
    key projection `k`, where an absent sub-block or a linear map has none."""
    return getattr(part, "k", None) is not None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class KVCache:
    """Keys and values of the positions seen so far, one pair per attention block, preallocated.

    `forward(model, ids, cache=cache)` reads positions from `cache.length`, appends the new keys and values,
    and advances `cache.length`, so decoding one token at a time costs one new row per block.
    """

    def __init__(self, model, max_tokens: int):
        xp, hd = array_module(model.embed), model.config.head_dim
        max_tokens = check_context(model, int(max_tokens))
        self.max_tokens, self.length = max_tokens, 0
        self.keys, self.values = {}, {}
        for i, block in enumerate(model.blocks):
            if _has_keys(block.attention):
                n_kv = block.attention.k.shape[0] // hd  # per block; a tensor-parallel shard holds fewer heads
                self.keys[i] = xp.zeros((n_kv, max_tokens, hd), dtype=model.dtype)
                self.values[i] = xp.zeros((n_kv, max_tokens, hd), dtype=model.dtype)

    def check(self, model) -> None:
        """Refuse a cache that was made for a model of another structure."""
        hd = model.config.head_dim
        wanted = {i: (b.attention.k.shape[0] // hd, hd) for i, b in enumerate(model.blocks) if _has_keys(b.attention)}
        held = {i: (k.shape[0], k.shape[2]) for i, k in self.keys.items()}
        if wanted != held or any(k.dtype != model.dtype for k in self.keys.values()):
            raise ReffuseError(f"this KV cache was made for another model ({len(held)} attention blocks, not the "
                               f"{len(wanted)} of {model.config.name}, or other heads or dtype): make one with "
                               "KVCache(model, max_tokens)")

    def rows(self, layer: int, n: int):
        """Views of the rows that positions length..length+n-1 of `layer` take: keys and values [n_kv, n, hd]."""
        end = self.length + n
        if end > self.max_tokens:
            raise ReffuseError(f"KV cache holds {self.max_tokens} positions; {end} were asked for: "
                               "create the cache with a larger max_tokens")
        return self.keys[layer][:, self.length:end], self.values[layer][:, self.length:end]

    def append(self, layer: int, k, v):
        """Store k, v [n_kv, T, hd] after the cached positions; return all keys and values so far [n_kv, S, hd]."""
        key_rows, value_rows = self.rows(layer, k.shape[1])
        key_rows[...] = k
        value_rows[...] = v
        end = self.length + k.shape[1]
        return self.keys[layer][:, :end], self.values[layer][:, :end]

