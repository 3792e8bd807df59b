"""Where one decode step and one prefill of SmolLM2 spend their time, beside the machine's bound, in one run.

    python benchmarks/profile/profile_smollm2.py --threads 2 --out benchmarks/results/profile_smollm2

Each part of the forward pass that reffuse.core.model names (RMSNorm, attention, the FFN, the RoPE tables, the LM
head) is timed by wrapping that function for the run; what is left of the step's time is Python between them
(block walking, residual adds, cache bookkeeping). A part's time includes what it calls: the LM head's includes
the final norm, attention's the RoPE rotation. The bound: the bytes a decode step must read (every weight
once) over the streaming bandwidth NumPy reaches here (a large GEMV, weights stored as reffuse stores them, and a
copy), so that "fraction of the bound" is measured, not assumed. llama.cpp's decode of the same F32 weights is
timed beside it where the `llamacpp` extra is installed. Medians of --repeats, BLAS pinned to --threads.
"""

from __future__ import annotations

import argparse
import json
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
from reffuse.core.model import KVCache, forward
from reffuse.formats.checkpoint import model_to_tensors
from reffuse.speed.timing import blas_threads

PARTS = ("rms_norm", "attention_output", "ffn_output", "rope_for", "lm_logits")


def timed_parts(run, repeats: int) -> dict:
    """Median seconds of run() and of each named part inside it (a part's time includes what it calls)."""
    totals, steps = defaultdict(list), []
    originals = {name: getattr(core, name) for name in PARTS}
    spent = defaultdict(float)

    def wrap(name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return timed

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


def bandwidth(threads: int, repeats: int) -> dict:
    """Bytes per second NumPy streams here: a GEMV over 128 MB of weights stored [out, in], and a copy."""
    rng = np.random.default_rng(0)
    weight = rng.random((32768, 1024), dtype=np.float32)
    x = rng.random((1, 1024), dtype=np.float32)
    out = np.empty_like(weight)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with blas_threads(threads):
        gemv = weight.nbytes / best(lambda: x @ weight.T)
    copy = 2 * weight.nbytes / best(lambda: np.copyto(out, weight))  # read and write
    return {"gemv_bytes_per_second": gemv, "copy_bytes_per_second": copy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--repeats", type=int, default=21, help="repeats; medians (default 21)")
    parser.add_argument("--out", type=Path, required=True, help="folder for profile.json and profile.md")
    args = parser.parse_args(argv)
    model = reffuse.load_model("smollm2")
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, 64)
    weight_bytes = sum(t.nbytes for t in model_to_tensors(model).values())  # every weight once (tied: once)
    with blas_threads(args.threads):
        cache = KVCache(model, len(prompt) + args.repeats + 2)
        forward(model, prompt, cache=cache)

        def decode_step():
            forward(model, [1], cache=cache)
            cache.length -= 1  # the same position every time: one step's work, repeated

        decode = timed_parts(decode_step, args.repeats)
        prefill = timed_parts(lambda: forward(model, prompt, cache=KVCache(model, len(prompt))), args.repeats)
    bound = bandwidth(args.threads, 7)
    machine = max(bound.values())
    result = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "threads": args.threads,
              "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "decode": decode, "prefill_64": prefill, "bandwidth": bound, "weight_bytes": weight_bytes,
              "bound_seconds_per_token": weight_bytes / machine,
              "fraction_of_bound": (weight_bytes / machine) / decode["seconds"]}
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
    (args.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Where SmolLM2's time goes in reffuse, {args.threads} threads", "", "Produced by:", "",
             f"    {result['command']}", "", f"Load average {result['load_average_1min']:.1f}. Medians of "
             f"{args.repeats}.", "", "| part | decode step ms | share | prefill (64 tokens) ms | share |",
             "|---|---:|---:|---:|---:|"]
    for part in decode["parts"]:
        lines.append(f"| {part} | {1e3 * decode['parts'][part]:.3f} | {decode['shares'][part]:.0%} | "
                     f"{1e3 * prefill['parts'][part]:.2f} | {prefill['shares'][part]:.0%} |")
    lines.append(f"| **the whole forward** | {1e3 * decode['seconds']:.3f} | | {1e3 * prefill['seconds']:.2f} | |")
    gemv, copy = bound["gemv_bytes_per_second"] / 1e9, bound["copy_bytes_per_second"] / 1e9
    lines += ["", f"The bound: a decode step reads {weight_bytes / 1e6:.0f} MB of weights; NumPy streams "
                  f"{gemv:.1f} GB/s in a GEMV and {copy:.1f} GB/s in a copy here, so a step cannot take less than "
                  f"{1e3 * result['bound_seconds_per_token']:.2f} "
                  f"ms: reffuse's decode step reaches {result['fraction_of_bound']:.0%} of that bound "
                  f"({1 / decode['seconds']:.1f} tokens/s against {1 / result['bound_seconds_per_token']:.1f})."]
    if result["llama_cpp_tokens_per_second"]:
        lines.append(f"llama.cpp decodes the same F32 weights at {result['llama_cpp_tokens_per_second']:.1f} tokens/s "
                     "(32 tokens after the same prompt, median of 5).")
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    print(args.out / "profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
