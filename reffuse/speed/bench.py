"""How fast reffuse runs a model, against transformers in the same run, and what fusing a run of FFNs saves.

One run measures, one after the other, with BLAS (threadpoolctl) and torch pinned to the same thread count:

- prefill: one forward over T prompt tokens (T = 64, 128, 256, 512) into an empty KV cache, logits for every
  position;
- decode: greedy generation of DECODE_TOKENS tokens after a 64-token prompt, one forward per token with the KV
  cache (argmax of the last logits), as tokens per second; the prompt's prefill is not timed;
- the same with transformers' LlamaForCausalLM on the same token ids (torch.inference_mode, its own KV cache),
  when the `reference` extra is installed and the model is one transformers can load (see reference.py);
- the fused-FFN microbenchmark: the FFNs of the model's first 8 blocks as a run of attention-free blocks,
  sequential (eq. 4, block by block) vs fused into one wide SwiGLU (norm="fold"), at 1, 16, 128 and 512 tokens
  (on a GPU up to 4096, where transformers is not compared);
- with llama.cpp (`llamacpp_tokenizer`): the same prefill and decode in llama.cpp on the model exported as an
  F32 GGUF, and llama.cpp's decode of the attention-removed model against its fused version;
- on the CPU, the bound on decode: the bytes of every weight over the streaming rate NumPy reaches here
  (timing.streaming_bandwidth), and each engine's decode as a fraction of it.

Every time is a median over `repeats` after one untimed warm-up, and the things compared are timed in
alternation (timing.compare_samples), because the machines this runs on are shared: compare ratios measured
in the same run, never absolute times across runs. A ratio is the ratio of the two medians with the
bootstrap 95% interval of the paired repeats (reffuse.stats.paired_ratio), and a target's verdict follows from
the intervals (speed.bench_report.target_verdict, by reffuse.stats.verdict): met, not met, or unresolved; the
machine it ran on is recorded beside them (speed.environment).
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.core.backend import device_of
from reffuse.core.fusion import fuse
from reffuse.core.layout import attention_free_runs
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import Block, Model, forward
from reffuse.formats.checkpoint import model_to_tensors
from reffuse.optional import require
from reffuse.speed.bench_report import RATIO, check_targets
from reffuse.records import as_tuple
from reffuse.speed.bench_result import (BenchResult, Decode, FfnRun, LlamaCppFusion, LlamaCppUse, PrefillRow,
                                        TransformersUse)
from reffuse.speed.environment import default_threads, environment
from reffuse.speed.timing import (blas_threads, compare_samples, decode_bound, streaming_bandwidth,
                                  time_ffn_run)
from reffuse.stats import paired_ratio

PREFILL_TOKENS = (64, 128, 256, 512)
DECODE_PROMPT_TOKENS = 64
DECODE_TOKENS = 32
FFN_RUN_BLOCKS = 8
FFN_RUN_TOKENS = (1, 16, 128, 512)
GPU_FFN_RUN_TOKENS = (1, 16, 128, 512, 1024, 4096)  # a GPU is launch-bound far longer than a CPU
FUSION_REPEATS = 15  # repeats of llama.cpp's fused-vs-unfused decode: enough pairs for a bootstrap interval

def prompt_ids(model: Model, tokens: int, seed: int = 0) -> np.ndarray:
    """Random token ids: speed does not depend on what the tokens say."""
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, tokens)


# ---------------------------------------------------------------------------------------------------------------
# reffuse and transformers, each behind the same two operations


def reffuse_prefill(model: Model, ids):
    """One forward over the prompt into a new KV cache; logits [T, vocab]."""
    return forward(model, ids, cache=KVCache(model, len(ids)))


def reffuse_decode(model: Model, prompt, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for `new_tokens` greedy decode steps after an untimed prefill of `prompt`, and the tokens."""
    cache = KVCache(model, len(prompt) + new_tokens)
    token = int(forward(model, prompt, cache=cache)[-1].argmax())
    tokens = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens.append(token)
        token = int(forward(model, [token], cache=cache)[-1].argmax())  # one new position per forward
    return time.perf_counter() - start, tokens


class TransformersRunner:
    """transformers' model behind the same operations, without autograd (torch.inference_mode)."""

    def __init__(self, hf_model):
        self.torch = require("torch", "reference", "comparing speed with transformers")
        self.model = hf_model
        # transformers 5 names the cache argument and output `cache`; 4.x called both `past_key_values`
        self.cache_name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    def _run(self, ids, cache=None):
        kwargs = {self.cache_name: cache} if cache is not None else {}
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(np.asarray(ids, dtype=np.int64))[None], use_cache=True, **kwargs)
        return out.logits[0], getattr(out, self.cache_name)

    def prefill(self, ids):
        return self._run(ids)[0]

    def decode(self, prompt, new_tokens: int) -> tuple[float, list[int]]:
        logits, cache = self._run(prompt)
        token = int(logits[-1].argmax())
        tokens = []
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(token)
            logits, cache = self._run([token], cache)
            token = int(logits[-1].argmax())
        return time.perf_counter() - start, tokens


def llamacpp_runner(model: Model, tokenizer, path, threads: int, n_ctx: int = 512):
    """llama.cpp (reffuse.evaluation.llamacpp.LlamaCpp) on `model` written to `path` as an F32 GGUF (llama or
    deci): its `logits` a prefill, its `timed_greedy` a decode, as reffuse_prefill and reffuse_decode are."""
    from reffuse.evaluation.llamacpp import LlamaCpp
    from reffuse.formats.gguf_export import save_gguf

    return LlamaCpp(save_gguf(model, path, tokenizer, "f32"), n_ctx=n_ctx, threads=threads)


def fusion_in_llamacpp(model: Model, tokenizer, threads: int, repeats: int,
                       decode_tokens: int = DECODE_TOKENS) -> LlamaCppFusion:
    """Does fusion speed up a production CPU engine? llama.cpp's decode of the model with attention removed
    (method.removal.default_attention_removal) against the same with its run fused (default_groups), in alternation."""
    from reffuse.method.removal import default_attention_removal, default_groups, drop_attention

    removed_blocks = [] if attention_free_runs(model) else default_attention_removal(model)
    removed = drop_attention(model, removed_blocks) if removed_blocks else model
    groups = default_groups(removed)
    with tempfile.TemporaryDirectory(prefix="reffuse-bench-") as folder:
        runners = {"attention removed": llamacpp_runner(removed, tokenizer, Path(folder) / "removed.gguf", threads),
                   "fused": llamacpp_runner(fuse(removed, groups), tokenizer, Path(folder) / "fused.gguf", threads)}
        prompt = prompt_ids(model, DECODE_PROMPT_TOKENS)
        samples, _ = decode_samples({name: runner.timed_greedy for name, runner in runners.items()}, prompt,
                                    decode_tokens, max(repeats, FUSION_REPEATS))
        del runners
    rate = {name: decode_tokens / statistics.median(s) for name, s in samples.items()}
    speedup = paired_ratio(samples["attention removed"], samples["fused"])  # > 1: the fused model is faster
    return LlamaCppFusion(tuple(removed_blocks), tuple(tuple(g) for g in groups), rate["attention removed"],
                          rate["fused"], speedup.median, speedup)


def load_transformers(model_name: str):
    """(TransformersRunner, None), or (None, why not) when transformers cannot run this model here."""
    try:
        require("transformers", "reference", "comparing speed with transformers")
        from reffuse.evaluation.reference import load_reference
        return TransformersRunner(load_reference(model_name, "float32")), None
    except ReffuseError as e:
        return None, str(e)


# ---------------------------------------------------------------------------------------------------------------
# The measurements


def ffn_run_model(model: Model, blocks: int = FFN_RUN_BLOCKS) -> Model:
    """The FFNs of the model's first `blocks` blocks, attention removed: a run (0, blocks - 1) to fuse."""
    ffns = [b.ffn for b in model.blocks if b.ffn is not None][:blocks]
    if len(ffns) < 2:
        raise ReffuseError(f"{model.config.name} has {len(ffns)} FFN(s): the FFN-run benchmark needs at least 2")
    return dataclasses.replace(model, blocks=[Block(None, f) for f in ffns])  # keeps the model's kernels


def decode_samples(runners: dict, prompt, new_tokens: int, repeats: int, progress=None) -> tuple[dict, dict]:
    """Every repeat's decode seconds per runner, the runners taking turns in each repeat (so that repeat i of
    one runner and repeat i of another ran under the same load: a pair); and each runner's tokens."""
    seconds, tokens = {name: [] for name in runners}, {}
    for name, decode in runners.items():  # warm-up
        decode(prompt, min(new_tokens, 2))
    for _ in range(repeats):
        for name, decode in runners.items():
            elapsed, tokens[name] = decode(prompt, new_tokens)
            seconds[name].append(elapsed)
            if progress is not None:
                progress()
    return seconds, tokens


def run_benchmark(model: Model, model_name: str, threads: int | None = None, repeats: int = 7,
                  prefill_tokens=PREFILL_TOKENS, ffn_tokens=FFN_RUN_TOKENS, decode_tokens: int = DECODE_TOKENS,
                  with_transformers: bool = True, progress=None, llamacpp_tokenizer=None) -> BenchResult:
    """All measurements of the module doc. `model` must be float32, on the CPU or a GPU; on a GPU the FFN run
    goes up to 4096 tokens and transformers (a CPU build of torch) is not compared. With `llamacpp_tokenizer`,
    llama.cpp runs the same weights (an F32 GGUF) in the same alternation, and its decode of the
    attention-removed model is timed against the fused one (fusion_in_llamacpp)."""
    if model.dtype != np.float32:
        raise ReffuseError(f"the benchmark runs float32 models; this one is {model.dtype} (load it with dtype float32)")
    threads = threads or default_threads()
    note = progress or (lambda message: None)
    device = device_of(model.embed)
    if device != "cpu" and ffn_tokens == FFN_RUN_TOKENS:
        ffn_tokens = GPU_FFN_RUN_TOKENS
    env = environment(threads, device)
    hf, why_not = (None, "not asked for (--no-transformers)")
    if with_transformers and device != "cpu":
        why_not = "the model is on a GPU; transformers runs on the CPU build of torch"
    elif with_transformers:
        note("loading transformers' model")
        hf, why_not = load_transformers(model_name)
    if hf is not None:
        import torch
        import transformers
        env = dataclasses.replace(env, torch=torch.__version__, transformers=transformers.__version__)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    llama, gguf_folder, fusion = None, None, None
    if llamacpp_tokenizer is not None:
        note("exporting the model as an F32 GGUF for llama.cpp")
        gguf_folder = tempfile.TemporaryDirectory(prefix="reffuse-bench-")
        llama = llamacpp_runner(model, llamacpp_tokenizer, Path(gguf_folder.name) / "model-f32.gguf", threads)
        import llama_cpp
        env = dataclasses.replace(env, llama_cpp_python=llama_cpp.__version__)
    llama_used = llama is not None
    try:
        with blas_threads(threads):
            prefill = []
            for tokens in prefill_tokens:
                note(f"prefill, {tokens} tokens")
                ids = prompt_ids(model, tokens)
                fns = {"reffuse": lambda: reffuse_prefill(model, ids)}
                if hf is not None:
                    fns["transformers"] = lambda: hf.prefill(ids)
                if llama is not None:
                    fns["llama.cpp"] = lambda: llama.logits(ids)
                samples = compare_samples(fns, repeats)
                row = PrefillRow(tokens=tokens, reffuse_seconds=statistics.median(samples["reffuse"]))
                if hf is not None:
                    ratio = paired_ratio(samples["reffuse"], samples["transformers"])  # < 1: reffuse takes less
                    row = dataclasses.replace(row, transformers_seconds=statistics.median(samples["transformers"]),
                                              time_ratio=ratio.median,
                                              time_ratio_interval_95=as_tuple(ratio.interval_95))
                if llama is not None:
                    ratio = paired_ratio(samples["reffuse"], samples["llama.cpp"])
                    row = dataclasses.replace(row, llamacpp_seconds=statistics.median(samples["llama.cpp"]),
                                              llamacpp_time_ratio=ratio.median,
                                              llamacpp_time_ratio_interval_95=as_tuple(ratio.interval_95))
                prefill.append(row)

            note(f"decode, {decode_tokens} tokens")
            prompt = prompt_ids(model, DECODE_PROMPT_TOKENS)
            runners = {"reffuse": lambda p, n: reffuse_decode(model, p, n)}
            if hf is not None:
                runners["transformers"] = hf.decode
            if llama is not None:
                runners["llama.cpp"] = llama.timed_greedy
            samples, tokens = decode_samples(runners, prompt, decode_tokens, repeats)
            rate = {name: decode_tokens / statistics.median(s) for name, s in samples.items()}
            decode = Decode(prompt_tokens=len(prompt), new_tokens=decode_tokens,
                            reffuse_tokens_per_second=rate["reffuse"])
            if hf is not None:
                speedup = paired_ratio(samples["transformers"], samples["reffuse"])  # their time / ours = speed ratio
                decode = dataclasses.replace(decode, transformers_tokens_per_second=rate["transformers"],
                                             speedup=speedup.median, speedup_interval_95=as_tuple(speedup.interval_95),
                                             same_greedy_tokens=tokens["reffuse"] == tokens["transformers"])
            if llama is not None:
                fraction = paired_ratio(samples["llama.cpp"], samples["reffuse"])
                decode = dataclasses.replace(decode, llamacpp_tokens_per_second=rate["llama.cpp"],
                                             fraction_of_llamacpp=fraction.median,
                                             fraction_of_llamacpp_interval_95=as_tuple(fraction.interval_95),
                                             same_greedy_tokens_as_llamacpp=tokens["reffuse"] == tokens["llama.cpp"])
            bound = None
            if device == "cpu":
                note("the machine's streaming bound")
                bound = decode_bound(sum(t.nbytes for t in model_to_tensors(model).values()),
                                     streaming_bandwidth(threads))
                bound = dataclasses.replace(bound, fractions={engine: engine_rate / bound.tokens_per_second
                                                              for engine, engine_rate in decode.rates().items()})
            if llama is not None:
                del llama, runners  # the engine freed before the next two load
                note("llama.cpp: the attention-removed model against the fused one")
                fusion = fusion_in_llamacpp(model, llamacpp_tokenizer, threads, repeats, decode_tokens)

            run = ffn_run_model(model)
            group = (0, len(run.blocks) - 1)
            rows = []
            for tokens in ffn_tokens:
                note(f"FFN run, {tokens} tokens")
                rows.append(time_ffn_run(run, group, tokens, norm="fold", repeats=repeats))
            ffn_run = FfnRun(len(run.blocks), model.config.dim, tuple(b.ffn.width for b in run.blocks), "fold",
                             fuse(run, [group]).blocks[0].ffn.width, tuple(rows))
    finally:
        if hf is not None:
            torch.set_num_threads(torch_threads)
        if gguf_folder is not None:
            gguf_folder.cleanup()
    result = BenchResult(model=model_name, model_name=model.config.name, dtype="float32", repeats=repeats,
                         ratio=RATIO, environment=env.at_end(), transformers=TransformersUse(hf is not None, why_not),
                         llama_cpp=LlamaCppUse(llama_used, fusion), prefill=tuple(prefill), decode=decode,
                         bound=bound, ffn_run=ffn_run, targets=())
    return dataclasses.replace(result, targets=check_targets(result))
