"""Where one decode step and two prefills of SmolLM2 spend their time, on reffuse's plain and fast kernels,
beside the machine's bound, in one run.

    python benchmarks/profile/profile_smollm2.py --threads 2 --out benchmarks/results/profile_smollm2

Each part of the forward pass (RMSNorm and the LM head, functions of reffuse.core.model; attention, the FFN and
the RoPE tables, the model's kernels) is timed by wrapping that function for the run; what is left of the step's
time is Python between them (block walking, residual adds, cache bookkeeping). A part's time includes what it
calls: the LM head's includes the final norm, attention's the RoPE rotation. Every run is timed twice, on the
plain kernels (core.plain(model)) and on the fast ones (the model as load_model returns it); what the fast ones
buy is then timed on the whole forward, plain and fast alternated, as the median of the paired ratios with a 95%
interval.

The bound: the bytes a decode step must read (every weight once) over the streaming bandwidth NumPy reaches here
(speed.timing.streaming_bandwidth: a large GEMV with the weights stored (out, in) as reffuse stores them and
(in, out), and a copy), so that "fraction of the bound" is measured, not assumed. llama.cpp's decode of the same
F32 weights is timed beside it where the `llamacpp` extra is installed. And two storage choices, each alternated
with a paired interval: the input projections that read the same x as separate products and as one, and the
weights in one arena against separate arrays. Medians of --repeats, BLAS pinned to --threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import reffuse
from reffuse.core import model as core
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import forward
from reffuse.formats.checkpoint import model_to_tensors
from reffuse.speed.environment import blas_in_use
from reffuse.outputs import write_json_atomic, write_text_atomic
from reffuse.speed.timing import (blas_threads, compare_samples, decode_bound, median_seconds, ratio_text,
                                  streaming_bandwidth)
from reffuse.stats import paired_ratio

PARTS = ("rms_norm", "attention", "ffn", "rope", "lm_logits")
KERNEL_PARTS = ("attention", "ffn", "rope")  # the model's kernels (Model.kernels); the others, reffuse.core.model's
PREFILL_LONG = 512


def timed_parts(make_run, model, repeats: int) -> dict:
    """Median seconds of make_run(model)() and of each named part inside it (a part's time includes what it
    calls)."""
    totals, steps = defaultdict(list), []
    originals = {name: getattr(core, name) for name in PARTS if name not in KERNEL_PARTS}
    spent = defaultdict(float)

    def wrap(name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return timed

    kernels = dataclasses.replace(model.kernels, **{name: wrap(name, getattr(model.kernels, name))
                                                    for name in KERNEL_PARTS})
    run = make_run(dataclasses.replace(model, kernels=kernels))
    try:
        for name, fn in originals.items():
            setattr(core, name, wrap(name, fn))
        run()  # warm-up
        for _ in range(repeats):
            spent.clear()
            start = time.perf_counter()
            run()
            steps.append(time.perf_counter() - start)
            for name in PARTS:
                totals[name].append(spent[name])
    finally:
        for name, fn in originals.items():
            setattr(core, name, fn)
    step = statistics.median(steps)
    parts = {name: statistics.median(totals[name]) for name in PARTS}
    parts["python and the rest"] = max(step - sum(parts.values()), 0.0)
    return {"seconds": step, "parts": parts, "shares": {k: v / step for k, v in parts.items()}}


def fast_against_plain(make_run, model, repeats: int) -> dict:
    """make_run(model)() on the plain kernels and on the fast ones, alternated: fast / plain time, the median of the
    paired ratios with its 95% interval (reffuse.stats.paired_ratio)."""
    samples = compare_samples({"plain": make_run(core.plain(model)), "fast": make_run(model)}, repeats)
    return paired_ratio(samples["fast"], samples["plain"])


def stacking(model, threads: int, repeats: int) -> dict:
    """The input projections of all blocks as separate products and as one stacked product each (gate and up of an
    FFN; q, k and v of an attention), at 1 and PREFILL_LONG tokens, alternated: median seconds, and stacked /
    separate time as the median of the paired ratios with its 95% interval."""
    gate_up = [np.concatenate([b.ffn.gate, b.ffn.up]) for b in model.blocks]  # what stacking the FFN would store
    rows = []
    with blas_threads(threads):
        for tokens in (1, PREFILL_LONG):
            x = np.random.default_rng(1).standard_normal((tokens, model.config.dim)).astype(model.dtype)
            reps = repeats if tokens == 1 else max(repeats // 3, 3)
            ffn_pairs = [(b.ffn.gate.T, b.ffn.up.T) for b in model.blocks]
            qkv_triples = [(b.attention.q.T, b.attention.k.T, b.attention.v.T) for b in model.blocks]
            stacked_ffn, stacked_qkv = [w.T for w in gate_up], [b.attention.qkv.T for b in model.blocks]

            def products(weights):  # each product's result dropped at once, as a forward pass would
                def run():
                    for group in weights:
                        for w in group:
                            x @ w
                return run

            for name, separate, stacked in (("FFN gate, up", products(ffn_pairs), products([stacked_ffn])),
                                            ("attention q, k, v", products(qkv_triples), products([stacked_qkv]))):
                samples = compare_samples({"separate": separate, "stacked": stacked}, reps)
                ratio = paired_ratio(samples["stacked"], samples["separate"])
                rows.append({"products": name, "tokens": tokens,
                             "separate_seconds": statistics.median(samples["separate"]),
                             "stacked_seconds": statistics.median(samples["stacked"]),
                             "stacked_over_separate_time": ratio.median,
                             "stacked_over_separate_interval_95": ratio.interval_95})
    return {"rows": rows}


def decode_step(model, prompt):
    """One decode step after `prompt`, as a function to call again and again: the same position every time, so
    each call does one step's work."""
    cache = KVCache(model, len(prompt) + 1)
    forward(model, prompt, cache=cache)

    def step():
        forward(model, [1], cache=cache)
        cache.length -= 1
    return step


def arena_effect(model, prompt, threads: int, rounds: int = 9, steps: int = 30) -> dict:
    """A decode step on the weights as load_model returns them (one arena, core.fast.gathered) against the same
    weights as separate arrays, alternated: each round's median step time for both, and their paired ratio."""
    separate = core.map_arrays(model, lambda a: a.copy())
    samples = {"arena": [], "separate": []}
    with blas_threads(threads):
        for _ in range(rounds):
            for name, m in (("separate", separate), ("arena", model)):
                samples[name].append(median_seconds(decode_step(m, prompt), steps, warmup=0))
    ratio = paired_ratio(samples["arena"], samples["separate"])
    return {"seconds": samples, "arena_over_separate_time": ratio.to_json()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--repeats", type=int, default=21, help="repeats; medians (default 21)")
    parser.add_argument("--out", type=Path, required=True, help="folder for profile.json and profile.md")
    args = parser.parse_args(argv)
    model = reffuse.load_model("smollm2")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, 64)
    long_prompt = rng.integers(0, model.config.vocab_size, PREFILL_LONG)
    weight_bytes = sum(t.nbytes for t in model_to_tensors(model).values())  # every weight once (tied: once)
    runs = {"decode": (lambda m: decode_step(m, prompt), args.repeats),  # name -> (make_run(model), repeats)
            "prefill_64": (lambda m: lambda: forward(m, prompt, cache=KVCache(m, 64)), args.repeats),
            f"prefill_{PREFILL_LONG}": (lambda m: lambda: forward(m, long_prompt, cache=KVCache(m, PREFILL_LONG)),
                                        max(args.repeats // 3, 3))}
    measured, fast_over_plain = {}, {}
    with blas_threads(args.threads):
        for path, on in (("plain", core.plain(model)), ("fast", model)):  # the parts: each wrapped function timed
            measured[path] = {name: timed_parts(make_run, on, repeats) for name, (make_run, repeats) in runs.items()}
        for name, (make_run, repeats) in runs.items():  # what the fast kernels buy: the whole forward, alternated
            fast_over_plain[name] = fast_against_plain(make_run, model, repeats)
    decode = measured["fast"]["decode"]
    stacked = stacking(model, args.threads, args.repeats)
    arena = arena_effect(model, prompt, args.threads)
    bandwidth = streaming_bandwidth(args.threads)
    bound = decode_bound(weight_bytes, bandwidth)
    result = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "threads": args.threads,
              "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "blas": blas_in_use(), **measured["fast"], "plain": measured["plain"], "stacking": stacked, "arena": arena,
              "bandwidth": bandwidth.to_json(),
              "weight_bytes": weight_bytes, "bound_seconds_per_token": bound.seconds_per_token,
              "fraction_of_bound": bound.seconds_per_token / decode["seconds"],
              "fast_over_plain_time": {name: ratio.to_json() for name, ratio in fast_over_plain.items()}}
    try:
        from reffuse.formats.registry import load_tokenizer
        from reffuse.speed.bench import llamacpp_runner
        with tempfile.TemporaryDirectory() as folder:
            runner = llamacpp_runner(model, load_tokenizer("smollm2"), Path(folder) / "smollm2-f32.gguf", args.threads)
            seconds = statistics.median(runner.timed_greedy(prompt, 32)[0] for _ in range(5))
            result["llama_cpp_tokens_per_second"] = 32 / seconds
            del runner
    except reffuse.ReffuseError as e:
        result["llama_cpp_tokens_per_second"] = None
        result["llama_cpp_reason"] = str(e)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "profile.json", result)
    runs = list(measured["fast"])
    lines = [f"# Where SmolLM2's time goes in reffuse, {args.threads} threads", "", "Produced by:", "",
             f"    {result['command']}", "", f"Load average {result['load_average_1min']:.1f}; BLAS {result['blas']}. "
             f"Medians of {args.repeats} ({max(args.repeats // 3, 3)} for {PREFILL_LONG} tokens). Each run on the "
             "plain kernels (reffuse.core.model.plain) and on the fast ones (reffuse.core.fast, load_model's), one "
             "after the other, every part of the forward pass timed; then the whole forward plain and fast again, alternated, for fast / "
             "plain time: the median of the paired repeats' ratios, its 95% interval in brackets.", "",
             "| part | " + " | ".join(f"{run.replace('_', ' ')} ms, plain | fast" for run in runs) + " |",
             "|---|" + "---:|---:|" * len(runs)]
    for part in decode["parts"]:
        lines.append(f"| {part} | " + " | ".join(f"{1e3 * measured['plain'][run]['parts'][part]:.2f} | "
                                                 f"{1e3 * measured['fast'][run]['parts'][part]:.2f}" for run in runs) + " |")
    lines.append("| **the whole forward** | " + " | ".join(
        f"{1e3 * measured['plain'][run]['seconds']:.2f} | {1e3 * measured['fast'][run]['seconds']:.2f}"
        for run in runs) + " |")
    ratios = [cell for run in runs
              for cell in ("", ratio_text(fast_over_plain[run].median, fast_over_plain[run].interval_95))]
    lines.append("| fast / plain time | " + " | ".join(ratios) + " |")
    lines += ["", "The attention part includes its RoPE rotation; the LM head's, the final norm. `attention`, "
                  "`ffn` and `rope` are the model's kernels (`Model.kernels`), plain or fast."]
    lines += ["", f"Stacking the projections that read the same input into one product, over all "
                  f"{len(model.blocks)} blocks (the products alone, alternated):", "",
              "| products | tokens | separate ms | stacked ms | stacked / separate time (95% interval) |",
              "|---|---:|---:|---:|---:|"]
    for row in stacked["rows"]:
        lines.append(f"| {row['products']} | {row['tokens']} | {1e3 * row['separate_seconds']:.2f} | "
                     f"{1e3 * row['stacked_seconds']:.2f} | "
                     + ratio_text(row["stacked_over_separate_time"], row["stacked_over_separate_interval_95"]) + " |")
    ratio = arena["arena_over_separate_time"]
    lines += ["", f"All weights in one allocation (core.fast.gathered, as load_model returns them, on huge pages) "
                  f"against the same weights as separate arrays: a decode step takes {ratio['median']:.2f}x the time "
                  f"(95% interval {ratio['interval_95'][0]:.2f}-{ratio['interval_95'][1]:.2f} over "
                  f"{ratio['repeats']} alternated rounds of 30 steps)."]
    gemv, copy = bandwidth.gemv_out_in_bytes_per_second / 1e9, bandwidth.copy_bytes_per_second / 1e9
    other = bandwidth.gemv_in_out_bytes_per_second / 1e9
    lines += ["", f"The bound: a decode step reads {weight_bytes / 1e6:.0f} MB of weights; NumPy streams "
                  f"{gemv:.1f} GB/s in a GEMV over weights stored (out, in) as reffuse stores them ({other:.1f} GB/s "
                  f"stored (in, out)) and {copy:.1f} GB/s in a copy here, so a step cannot take less than "
                  f"{1e3 * result['bound_seconds_per_token']:.2f} "
                  f"ms: reffuse's decode step reaches {result['fraction_of_bound']:.0%} of that bound "
                  f"({1 / decode['seconds']:.1f} tokens/s against {1 / result['bound_seconds_per_token']:.1f})."]
    if result["llama_cpp_tokens_per_second"]:
        lines.append(f"llama.cpp decodes the same F32 weights at {result['llama_cpp_tokens_per_second']:.1f} tokens/s "
                     "(32 tokens after the same prompt, median of 5).")
    write_text_atomic(args.out / "profile.md", "\n".join(lines) + "\n")
    print(args.out / "profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
