"""llama.cpp as a second reference implementation (the optional `llamacpp` extra: llama-cpp-python).

reffuse writes the model as an F32 GGUF (reffuse.formats.gguf_export: `llama`, or `deci` for attention-free and
fused models) and llama.cpp runs that file with its own kernels: an implementation written apart from reffuse's,
in C++, that reads the same weights. Its KV cache is kept in F32 (type_k = type_v = 0): llama.cpp's default F16
cache alone costs about 7e-4 of the largest logit. It gives logits only (no per-block activations).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from reffuse.core.model import Model
from reffuse.optional import require

GGML_TYPE_F32 = 0


class LlamaCpp:
    """One llama.cpp model, with the two operations verify needs."""

    def __init__(self, gguf_path, n_ctx: int = 512, threads: int | None = None):
        llama_cpp = require("llama_cpp", "llamacpp", "running llama.cpp")
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx, n_threads=threads,
                                   type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)

    def logits(self, ids) -> np.ndarray:
        """Logits [T, vocab] of every position of one forward over `ids`."""
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return np.array(self.llm.scores[:len(ids)], dtype=np.float64)

    def greedy(self, ids, new_tokens: int) -> list[int]:
        """`new_tokens` greedy ids after `ids`, with llama.cpp's own KV cache."""
        return self.timed_greedy(ids, new_tokens)[1]

    def timed_greedy(self, ids, new_tokens: int) -> tuple[float, list[int]]:
        """Seconds for `new_tokens` greedy decode steps after an untimed prefill of `ids`, and the tokens."""
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        out = []
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return time.perf_counter() - start, out


def run_llamacpp(model: Model, tokenizer, ids, new_tokens: int) -> tuple[np.ndarray, list[int], str]:
    """llama.cpp's logits for `ids` and its greedy continuation, on `model` exported as an F32 GGUF (with
    `tokenizer`, or None: llama.cpp reads token ids without one)."""
    from reffuse.formats.gguf_export import plan_gguf, save_gguf

    with tempfile.TemporaryDirectory(prefix="reffuse-llamacpp-") as folder:
        path = save_gguf(model, Path(folder) / "model-f32.gguf", tokenizer, "f32")
        engine = LlamaCpp(path, n_ctx=max(64, len(ids) + new_tokens + 8))
        logits, greedy = engine.logits(ids), engine.greedy(ids, new_tokens)
        del engine
    return logits, greedy, plan_gguf(model).architecture
