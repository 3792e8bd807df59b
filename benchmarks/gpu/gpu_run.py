"""The GPU run's checks and measurements, on reffuse's core and synthetic models (no weights to fetch).

Five sections, each guarded: one that raises is recorded with its traceback and the others still run; gpu.json and
gpu.md in --out are rewritten after every section, so a run cut short keeps what it measured.

- environment: the GPU (name, memory, compute mode), CuPy, CUDA, NumPy, torch and MPI, and the environment
  variables that change what the GPU computes (TF32, CuPy's and CUDA's own);
- parity: tiny and synthetic-smollm2 (SmolLM2-135M's shapes, random weights) on the GPU against the CPU, in
  float32 and float64: the forward, the fused model (fold and last) and a KV-cache decode, to the targets of the
  CPU tests (1e-5 and 1e-12 of the largest logit); greedy and sampled generation give the same tokens;
- speed: reffuse against a plain PyTorch Llama in eager mode (reffuse.speed.torch_models.equations_forward with a
  KV cache, the same float32 weights; transformers is not needed) on synthetic-smollm2 on the same GPU: prefill at
  128-4096 tokens and greedy decode, timed in alternation, wall time with the GPU's own time (CUDA events) beside;
- ffn_run: the fused FFN run against the sequential one (reffuse.speed.timing.time_ffn_run) from 1 to 16384
  tokens, wall and GPU time;
- training: one training step of synthetic-smollm2 (reffuse.speed.train_bench.ReffuseStep: reffuse's gradients,
  clipping and AdamW) against PyTorch's (TorchStep: autograd and torch.optim.AdamW) on the same GPU, tokens/s and
  peak memory.

Ratios are paired over repeats with 95% bootstrap intervals (reffuse.stats.paired_ratio) and each target's
verdict follows reffuse.speed.bench_report.target_verdict: met, not met or unresolved. The exit status is 1 when a
section failed or a parity check is not met; a speed target not met is a finding, printed, not a failure.

With --rehearse (run.sh --rehearse: on the CPU, against the tests' strict CuPy stand-in), small sizes; PyTorch
runs on the CPU where it has no GPU, and the output says that such times say nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import reffuse
from reffuse.core.backend import gpu_module, gpu_module_name, to_numpy
from reffuse.core.generate import generate
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import forward
from reffuse.core.names import named_weights
from reffuse.speed.bench import (DECODE_PROMPT_TOKENS, decode_samples, ffn_run_model, prompt_ids, reffuse_decode,
                                 reffuse_prefill)
from reffuse.speed.bench_report import judge_target, measured_ratios, target_rows
from reffuse.speed.timing import EventClock, compare_samples, ratio_text, time_ffn_run
from reffuse.stats import paired_ratio

SECTIONS = ("environment", "parity", "speed", "ffn_run", "training")
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
LAUNCH_BOUND_FACTOR = 2.0  # a length is launch-bound where the sequential run takes < 2x its time at 1 token
# The environment variables that change what a GPU computes or how CuPy and torch run (recorded, never set).
VARIABLE_PREFIXES = ("CUPY_", "CUDA_", "NVIDIA_TF32", "TORCH_", "CUBLAS_", "CUBLASLT_", "PYTORCH_", "REFFUSE_",
                     "MPI4PY_", "OMP_NUM_THREADS", "LD_LIBRARY_PATH")
COMPUTE_MODES = {0: "default", 1: "exclusive thread", 2: "prohibited", 3: "exclusive process"}

# The targets on a GPU, against PyTorch eager on the same device.
GPU_TARGETS = {
    "prefill": "prefill time <= 1.0x PyTorch eager's at every length",
    "decode": "decode tokens/s >= 1.0x PyTorch eager's",
    "ffn_run": "fused FFN run faster than the sequential one (sequential / fused time >= 1.0) wherever launch-bound",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    parity: tuple          # (model, tokens, dtypes) of each parity run
    speed_model: str       # the model of the speed, FFN-run and training sections
    prefill_tokens: tuple
    decode_tokens: int
    ffn_tokens: tuple
    train_tokens: int
    repeats: int


FULL = Sizes(parity=(("tiny", 24, ("float32", "float64")), ("synthetic-smollm2", 64, ("float32", "float64"))),
             speed_model="synthetic-smollm2", prefill_tokens=(128, 256, 512, 1024, 2048, 4096), decode_tokens=32,
             ffn_tokens=(1, 4, 16, 64, 256, 1024, 4096, 16384), train_tokens=512, repeats=7)
# The rehearsal runs every line the GPU run runs, on sizes a busy CPU gets through in seconds: tiny for the
# measurements, and synthetic-smollm2 (no attention-free run: its attention is dropped first) once, in float32.
REHEARSAL = Sizes(parity=(("tiny", 24, ("float32", "float64")), ("synthetic-smollm2", 4, ("float32",))),
                  speed_model="tiny", prefill_tokens=(16,), decode_tokens=2, ffn_tokens=(1, 16), train_tokens=16,
                  repeats=1)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The device and its memory


def memory_pool():
    """CuPy's default memory pool, or None (the stand-in has none)."""
    get = getattr(gpu_module(), "get_default_memory_pool", None)
    return get() if get is not None else None


def pool_bytes() -> int | None:
    """The bytes CuPy's memory pool holds now (blocks in use and cached): the pool gives nothing back unless asked,
    so after free_pool() this is the high-water mark of what was used since, the arrays kept from before included."""
    pool = memory_pool()
    return None if pool is None else int(pool.total_bytes())


def free_pool() -> None:
    pool = memory_pool()
    if pool is not None:
        pool.free_all_blocks()


def torch_device(rehearse: bool):
    """(torch, its device, a note) for the PyTorch peer, or (None, None, why not)."""
    try:
        import torch
    except ImportError:
        return None, None, "torch is not installed here"
    if torch.cuda.is_available():
        return torch, "cuda", f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"
    if rehearse:
        return torch, "cpu", (f"torch {torch.__version__} on the CPU (a rehearsal: its times, and every ratio "
                              "against them, say nothing about speed)")
    return None, None, f"torch {torch.__version__} has no CUDA device here"


def wait(torch, device: str) -> None:
    """Wait for torch's queued GPU work (compare_samples waits for CuPy's, not torch's)."""
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# The sections: each takes the run's context and returns a JSON-ready dict


@dataclasses.dataclass
class Context:
    sizes: Sizes
    rehearse: bool
    models: dict = dataclasses.field(default_factory=dict)

    def model(self, device: str):
        """The speed model in float32 on "cpu" or "gpu", loaded once."""
        if device not in self.models:
            self.models[device] = (reffuse.load_model(self.sizes.speed_model, dtype="float32") if device == "cpu"
                                   else reffuse.to_device(self.model("cpu"), "gpu"))
        return self.models[device]


def environment_section(ctx: Context) -> dict:
    cupy = gpu_module()
    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(0)
    name = props.get("name", b"?")
    mode = props.get("computeMode")
    gpu = {"name": name.decode() if isinstance(name, bytes) else str(name), "devices": runtime.getDeviceCount(),
           "memory_bytes": props.get("totalGlobalMem"), "compute_mode": COMPUTE_MODES.get(mode, mode),
           "compute_capability": (f"{props['major']}.{props['minor']}" if "major" in props else None),
           "multiprocessors": props.get("multiProcessorCount")}
    out = {"gpu": gpu, "gpu_module": gpu_module_name(), "cupy": getattr(cupy, "__version__", "?"),
           "cuda_runtime": runtime.runtimeGetVersion(),
           "cuda_driver": runtime.driverGetVersion() if hasattr(runtime, "driverGetVersion") else None,
           "numpy": np.__version__, "python": platform.python_version(), "executable": sys.executable,
           "machine": platform.machine(), "cpu_cores": os.cpu_count(),
           "variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith(VARIABLE_PREFIXES)},
           "gpu_events": EventClock.available(cupy), "memory_pool": memory_pool() is not None}
    torch, device, note = torch_device(ctx.rehearse)
    out["torch"] = {"peer": note, "device": device}
    if torch is not None:
        out["torch"].update(version=torch.__version__, cuda=torch.version.cuda,
                            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                            float32_matmul_precision=torch.get_float32_matmul_precision())
    try:
        from mpi4py import MPI
        out["mpi"] = " ".join(MPI.Get_library_version().splitlines()[0].split())
    except Exception as e:  # no mpi4py, or no MPI library behind it (RuntimeError)
        out["mpi"] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''})"
    return out


def relative(got, expected) -> float:
    got, expected = to_numpy(got), to_numpy(expected)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def parity(name: str, tokens: int, dtypes) -> list[dict]:
    rows = []
    for dtype in dtypes:
        cpu = reffuse.load_model(name, dtype=dtype)
        gpu = reffuse.to_device(cpu, "gpu")
        ids = np.random.default_rng(0).integers(0, cpu.config.vocab_size, tokens)
        run = reffuse.attention_free_runs(cpu)
        if not run:  # a model without one: make one, as `reffuse tp` does
            n = len(cpu.blocks)
            cpu, gpu = (reffuse.drop_attention(m, list(range(n // 2 - 1, 3 * n // 4))) for m in (cpu, gpu))
            run = reffuse.attention_free_runs(cpu)
        group = [(run[0][0], run[0][1] - 1)]
        checks = {"forward": relative(forward(gpu, ids), forward(cpu, ids))}
        for norm in ("fold", "last"):
            checks[f"fused ({norm})"] = relative(forward(reffuse.fuse(gpu, group, norm=norm), ids),
                                                 forward(reffuse.fuse(cpu, group, norm=norm), ids))
        cache = KVCache(gpu, tokens)
        steps = [to_numpy(forward(gpu, ids[:tokens // 2], cache=cache))]
        steps += [to_numpy(forward(gpu, ids[t:t + 1], cache=cache)) for t in range(tokens // 2, tokens)]
        checks["KV-cache decode"] = relative(np.concatenate(steps), forward(cpu, ids))
        same = all(generate(gpu, ids[:8], 8, **kw) == generate(cpu, ids[:8], 8, **kw)
                   for kw in ({}, {"temperature": 0.8, "top_k": 40, "seed": 1}))
        for check, error in checks.items():
            rows.append({"model": name, "dtype": dtype, "check": check, "relative_error": error,
                         "target": TOLERANCE[dtype], "met": error <= TOLERANCE[dtype]})
        rows.append({"model": name, "dtype": dtype, "check": "generate: same tokens (greedy, sampled)",
                     "relative_error": None, "target": None, "met": same})
    return rows


def parity_section(ctx: Context) -> dict:
    rows = []
    for name, tokens, dtypes in ctx.sizes.parity:
        progress(f"parity: {name}, {tokens} tokens, {', '.join(dtypes)}")
        rows += parity(name, tokens, dtypes)
    return {"rows": rows, "not_met": [f"{r['model']} {r['dtype']} {r['check']}" for r in rows if not r["met"]]}


class TorchLlama:
    """The peer: a plain PyTorch Llama in eager mode (equations_forward: matmul-softmax attention, a KV cache),
    on a copy of the model's float32 weights on torch's device, under torch.inference_mode; prefill and decode
    behave as reffuse_prefill and reffuse_decode do, and each returns after its GPU work is done."""

    def __init__(self, torch, device: str, model):
        from reffuse.speed.torch_models import equations_forward

        self.torch, self.device, self.model, self.equations = torch, device, model, equations_forward
        self.weights = {n: torch.from_numpy(to_numpy(w)).to(device) for n, w in named_weights(model).items()}

    def _forward(self, ids, cache: dict):
        with self.torch.inference_mode():
            return self.equations(self.model, self.weights, ids, cache)

    def prefill(self, ids):
        logits = self._forward(ids, {})
        wait(self.torch, self.device)
        return logits

    def decode(self, prompt, new_tokens: int) -> tuple[float, list[int]]:
        cache = {}
        token = int(self._forward(prompt, cache)[-1].argmax())
        tokens = []
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(token)
            token = int(self._forward([token], cache)[-1].argmax())  # int(): waits for the step
        return time.perf_counter() - start, tokens


def speed_section(ctx: Context) -> dict:
    sizes, cupy = ctx.sizes, gpu_module()
    gpu = ctx.model("gpu")
    torch, device, note = torch_device(ctx.rehearse)
    peer = TorchLlama(torch, device, ctx.model("cpu")) if torch is not None else None
    events = EventClock.available(cupy)
    out = {"model": ctx.sizes.speed_model, "dtype": "float32", "repeats": sizes.repeats, "peer": note,
           "peer_used": peer is not None, "gpu_time": events, "prefill": []}
    for tokens in sizes.prefill_tokens:
        progress(f"speed: prefill, {tokens} tokens")
        ids = prompt_ids(gpu, tokens)
        fns = {"reffuse": lambda: reffuse_prefill(gpu, ids)}
        clocks = {"reffuse": EventClock(cupy)} if events else {}
        if peer is not None:
            fns["pytorch"] = lambda: peer.prefill(ids)
            if EventClock.available(torch):
                clocks["pytorch"] = EventClock(torch)
        samples = compare_samples(fns, sizes.repeats, clocks=clocks)
        row = {"tokens": tokens, **{f"{name}_seconds": statistics.median(s) for name, s in samples.items()},
               **{f"{name}_gpu_seconds": statistics.median(c.samples) for name, c in clocks.items()}}
        if peer is not None:
            ratio = paired_ratio(samples["reffuse"], samples["pytorch"])  # < 1: reffuse takes less time
            row.update(time_ratio=ratio.median, time_ratio_interval_95=ratio.interval_95)
        out["prefill"].append(row)
        free_pool()
    progress(f"speed: decode, {sizes.decode_tokens} tokens")
    prompt = prompt_ids(gpu, DECODE_PROMPT_TOKENS)
    runners = {"reffuse": lambda p, n: reffuse_decode(gpu, p, n)}
    if peer is not None:
        runners["pytorch"] = peer.decode
    samples, tokens = decode_samples(runners, prompt, sizes.decode_tokens, sizes.repeats)
    decode = {"prompt_tokens": len(prompt), "new_tokens": sizes.decode_tokens,
              **{f"{name}_tokens_per_second": sizes.decode_tokens / statistics.median(s)
                 for name, s in samples.items()}}
    if peer is not None:
        speedup = paired_ratio(samples["pytorch"], samples["reffuse"])  # their time / ours = our speed / theirs
        decode.update(speedup=speedup.median, speedup_interval_95=speedup.interval_95,
                      same_greedy_tokens=tokens["reffuse"] == tokens["pytorch"])
    out["decode"] = decode
    out["targets"] = [
        judge_target(GPU_TARGETS["prefill"], "reffuse/PyTorch time, deciding length",
                     measured_ratios((r["time_ratio"], r["time_ratio_interval_95"]) for r in out["prefill"]
                                     if "time_ratio" in r), 1.0, False),
        judge_target(GPU_TARGETS["decode"], "reffuse/PyTorch tokens/s",
                     measured_ratios([(decode["speedup"], decode["speedup_interval_95"])] if "speedup" in decode
                                     else []), 1.0, True)]
    return out


def ffn_run_section(ctx: Context) -> dict:
    run = ffn_run_model(ctx.model("gpu"))
    group = (0, len(run.blocks) - 1)
    events = EventClock.available(gpu_module())
    rows = []
    for tokens in ctx.sizes.ffn_tokens:
        progress(f"ffn_run: {tokens} tokens")
        rows.append(time_ffn_run(run, group, tokens, norm="fold", repeats=ctx.sizes.repeats, gpu_clock=events))
        free_pool()
    bound = [r for r in rows if r.sequential < LAUNCH_BOUND_FACTOR * rows[0].sequential]
    target = judge_target(GPU_TARGETS["ffn_run"], "sequential/fused time, deciding launch-bound length",
                          measured_ratios((r.speedup, r.speedup_interval_95) for r in bound), 1.0, True)
    return {"blocks": len(run.blocks), "dim": run.config.dim, "widths": [b.ffn.width for b in run.blocks],
            "norm": "fold", "gpu_time": events, "launch_bound_tokens": [r.tokens for r in bound], "rows": rows,
            "targets": [target]}


def training_section(ctx: Context) -> dict:
    from reffuse.speed.train_bench import HYPERPARAMETERS, ReffuseStep, text_window, trainable_set

    cpu, gpu = ctx.model("cpu"), ctx.model("gpu")
    ids, text = text_window(ctx.sizes.speed_model, cpu, ctx.sizes.train_tokens)
    trainable = trainable_set(cpu, "all")
    torch, device, note = torch_device(ctx.rehearse)
    free_pool()
    before = pool_bytes()
    engines = {"reffuse": ReffuseStep(gpu, trainable, ids)}
    if torch is not None:
        from reffuse.speed.torch_models import TorchStep

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engines["pytorch"] = TorchStep(cpu, trainable, ids, HYPERPARAMETERS, device=device)
    progress(f"training: {len(ids)} tokens, warm-up step")
    losses = {name: [engine.step()] for name, engine in engines.items()}  # untimed; the loss at the loaded weights
    progress(f"training: {ctx.sizes.repeats} timed steps each, in turns")
    samples = compare_samples({name: engine.step for name, engine in engines.items()}, ctx.sizes.repeats, warmup=0)
    after = pool_bytes()
    out = {"model": ctx.sizes.speed_model, "tokens": int(len(ids)), "text": text, "train": "all",
           "trainable_parameters": engines["reffuse"].parameters, "repeats": ctx.sizes.repeats, "peer": note,
           "reffuse": {"implementation": ReffuseStep.implementation, "first_loss": losses["reffuse"][0],
                       "median_step_seconds": statistics.median(samples["reffuse"]),
                       "tokens_per_second": len(ids) / statistics.median(samples["reffuse"]),
                       "memory_pool_bytes_before": before, "memory_pool_bytes_after": after}}
    if "pytorch" in engines:
        theirs = engines["pytorch"]
        out["pytorch"] = {"implementation": theirs.implementation, "first_loss": losses["pytorch"][0],
                          "median_step_seconds": statistics.median(samples["pytorch"]),
                          "tokens_per_second": len(ids) / statistics.median(samples["pytorch"]),
                          "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
        ratio = paired_ratio(samples["pytorch"], samples["reffuse"])  # our tokens/s over theirs
        out.update(speed_ratio=ratio.median, speed_ratio_interval_95=ratio.interval_95,
                   first_loss_relative_difference=abs(losses["reffuse"][0] - losses["pytorch"][0])
                   / abs(losses["pytorch"][0]))
    return out


RUNS = {"environment": environment_section, "parity": parity_section, "speed": speed_section,
        "ffn_run": ffn_run_section, "training": training_section}


# ---------------------------------------------------------------------------------------------------------------
# The record: a summary line per section, the JSON and the Markdown


def gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def target_lines(targets: list, rehearse: bool) -> list[str]:
    note = " (a rehearsal: says nothing about speed)" if rehearse else ""
    return [f"  target: {t.target}: "
            + ("not measured" if t.measured is None else f"{ratio_text(t.measured, t.interval_95)}, {t.verdict}")
            + note for t in targets]


def summary_lines(result: dict) -> list[str]:
    lines = []
    for name, status in result["sections"].items():
        head = f"{name}: {status['status']} ({status['seconds']:.1f} s)"
        if status["status"] == "FAILED":
            lines.append(f"{head}: {status['error']} (traceback in gpu_run.log)")
            continue
        r = result[name]
        if name == "environment":
            g = r["gpu"]
            lines.append(f"{head}: {g['name']}, {gib(g['memory_bytes'])}, compute mode {g['compute_mode']}, "
                         f"{r['gpu_module']} {r['cupy']}, MPI {r['mpi']}; PyTorch peer: {r['torch']['peer']}")
        elif name == "parity":
            met = sum(row["met"] for row in r["rows"])
            lines.append(f"{head}: {met} of {len(r['rows'])} checks met"
                         + (f"; NOT MET: {'; '.join(r['not_met'])}" if r["not_met"] else ""))
        elif name == "speed":
            d = r["decode"]
            lines.append(f"{head}: decode {d['reffuse_tokens_per_second']:.1f} tokens/s"
                         + (f" (PyTorch eager {d['pytorch_tokens_per_second']:.1f})" if r["peer_used"] else
                            f"; PyTorch not measured: {r['peer']}"))
            lines += target_lines(r["targets"], result["rehearsal"])
        elif name == "ffn_run":
            lines.append(f"{head}: {len(r['rows'])} lengths, launch-bound at {r['launch_bound_tokens']} tokens")
            lines += target_lines(r["targets"], result["rehearsal"])
        elif name == "training":
            ours = r["reffuse"]
            lines.append(f"{head}: {r['tokens']} tokens, reffuse {ours['tokens_per_second']:.1f} tokens/s"
                         + (f", PyTorch {r['pytorch']['tokens_per_second']:.1f}; reffuse / PyTorch "
                            f"{ratio_text(r['speed_ratio'], r['speed_ratio_interval_95'])}" if "pytorch" in r else
                            f"; PyTorch not measured: {r['peer']}"))
    return lines


def markdown(result: dict) -> str:
    rehearsal = result["rehearsal"]
    lines = ["# reffuse on a GPU" + (" (a rehearsal on the CPU, against the strict CuPy stand-in)" if rehearsal
                                     else ""), "", "Produced by:", "", f"    {result['command']}", "",
             "Summary (each section's status and seconds, the targets' verdicts):", "", "```", *result["summary"],
             "```"]
    env = result.get("environment")
    if env and "error" not in env:
        g = env["gpu"]
        lines += ["", f"{g['name']} ({gib(g['memory_bytes'])}, compute mode {g['compute_mode']}), "
                      f"{env['gpu_module']} {env['cupy']} (CUDA runtime {env['cuda_runtime']}, driver "
                      f"{env['cuda_driver']}), NumPy {env['numpy']}, Python {env['python']}, MPI: {env['mpi']}. "
                      f"PyTorch peer: {env['torch']['peer']}. Environment variables: "
                      + (", ".join(f"{k}={v}" for k, v in env["variables"].items()) or "none of note") + "."]
    parity_rows = (result.get("parity") or {}).get("rows")
    if parity_rows:
        lines += ["", "## Parity, GPU against CPU", "", "| model | dtype | check | relative error | target | met |",
                  "|---|---|---|---:|---:|---|"]
        for r in parity_rows:
            error = "-" if r["relative_error"] is None else f"{r['relative_error']:.2e}"
            target = "-" if r["target"] is None else f"{r['target']:g}"
            lines.append(f"| {r['model']} | {r['dtype']} | {r['check']} | {error} | {target} | {r['met']} |")
    targets = []
    speed = result.get("speed")
    if speed and "error" not in speed:
        def ms(row, key):
            return f"{1e3 * row[key]:.2f}" if key in row else "-"
        lines += ["", f"## Speed, {speed['model']} in float32, against PyTorch eager on the same device", "",
                  f"PyTorch: {speed['peer']}. Medians of {speed['repeats']} repeats, timed in alternation; GPU time "
                  "from CUDA events around each call" + ("" if speed["gpu_time"] else " (not measured: the GPU "
                                                         "module has no CUDA events)") + ".", "",
                  "| prefill tokens | reffuse ms | reffuse GPU ms | PyTorch ms | PyTorch GPU ms | "
                  "reffuse / PyTorch time (95% interval) |", "|---:|---:|---:|---:|---:|---:|"]
        for r in speed["prefill"]:
            lines.append(f"| {r['tokens']} | {ms(r, 'reffuse_seconds')} | {ms(r, 'reffuse_gpu_seconds')} | "
                         f"{ms(r, 'pytorch_seconds')} | {ms(r, 'pytorch_gpu_seconds')} | "
                         + (ratio_text(r["time_ratio"], r["time_ratio_interval_95"]) if "time_ratio" in r else "-")
                         + " |")
        d = speed["decode"]
        lines += ["", f"Decode, {d['new_tokens']} greedy tokens after {d['prompt_tokens']} (every step waits for "
                      f"its token): reffuse {d['reffuse_tokens_per_second']:.1f} tokens/s"
                  + (f", PyTorch {d['pytorch_tokens_per_second']:.1f}; reffuse / PyTorch "
                     f"{ratio_text(d['speedup'], d['speedup_interval_95'])}; same greedy tokens: "
                     f"{d['same_greedy_tokens']}." if "speedup" in d else ".")]
        targets += speed["targets"]
    ffn = result.get("ffn_run")
    if ffn and "error" not in ffn:
        lines += ["", f"## Fused vs sequential FFN run ({ffn['blocks']} FFNs, d={ffn['dim']}, fused into one)", "",
                  "| tokens | sequential ms | fused ms | sequential / fused (95% interval) | GPU time: "
                  "sequential / fused | launch-bound |", "|---:|---:|---:|---:|---:|---|"]
        for r in ffn["rows"]:
            gpu = "-" if r.gpu_speedup is None else ratio_text(r.gpu_speedup, r.gpu_speedup_interval_95)
            lines.append(f"| {r.tokens} | {1e3 * r.sequential:.3f} | {1e3 * r.fused:.3f} | "
                         f"{ratio_text(r.speedup, r.speedup_interval_95)} | {gpu} | "
                         f"{r.tokens in ffn['launch_bound_tokens']} |")
        lines += ["", f"Launch-bound: a length whose sequential run takes less than {LAUNCH_BOUND_FACTOR:g}x its "
                      "time at 1 token (the launches, not the work, set its time)."]
        targets += ffn["targets"]
    train = result.get("training")
    if train and "error" not in train:
        ours, theirs = train["reffuse"], train.get("pytorch")
        lines += ["", f"## Training step, {train['model']}, {train['tokens']} tokens, every weight trained", "",
                  f"reffuse ({ours['implementation']}): {ours['tokens_per_second']:.1f} tokens/s, "
                  f"{ours['median_step_seconds'] * 1e3:.1f} ms a step; CuPy's pool held "
                  f"{gib(ours['memory_pool_bytes_after'])} after the steps, {gib(ours['memory_pool_bytes_before'])} "
                  "before (its cached blocks freed)."]
        if theirs:
            lines += ["", f"PyTorch ({theirs['implementation']}): {theirs['tokens_per_second']:.1f} tokens/s, "
                          f"peak allocated {gib(theirs['peak_allocated_bytes'])}; reffuse / PyTorch tokens/s "
                          f"{ratio_text(train['speed_ratio'], train['speed_ratio_interval_95'])}; loss at the loaded "
                          f"weights {ours['first_loss']:.5f} and {theirs['first_loss']:.5f} (relative difference "
                          f"{train['first_loss_relative_difference']:.1e})."]
    if targets:
        lines += ["", "## Targets" + (" (a rehearsal: the verdicts say nothing about speed)" if rehearsal else ""),
                  "", "| target | measured | 95% interval | verdict |", "|---|---:|---:|:---:|", *target_rows(targets)]
    failed = [name for name, s in result["sections"].items() if s["status"] == "FAILED"]
    for name in failed:
        lines += ["", f"## {name}: FAILED", "", "```", result[name]["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    result["summary"] = summary_lines(result)
    record = json.dumps(result, indent=1, default=lambda typed: typed.to_json())  # Targets and FFN-run rows
    for name, text in (("gpu.json", record + "\n"), ("gpu.md", markdown(result))):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--rehearse", action="store_true",
                        help="small sizes, PyTorch on the CPU if it has no GPU (the CPU rehearsal)")
    parser.add_argument("--fail-section", choices=SECTIONS,
                        help="make this section raise (to see the others' results survive a failure)")
    args = parser.parse_args(argv)
    if not reffuse.gpu_available():
        print(f"no usable GPU through {gpu_module_name()}: nothing to run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(REHEARSAL if args.rehearse else FULL, args.rehearse)
    result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "rehearsal": args.rehearse,
              "sizes": dataclasses.asdict(ctx.sizes), "sections": {}}
    for name, run in RUNS.items():
        progress(f"== {name}")
        free_pool()
        started = time.perf_counter()
        try:
            if name == args.fail_section:
                raise RuntimeError(f"the {name} section was made to fail (--fail-section {name})")
            result[name] = run(ctx)
            status = {"status": "ok"}
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            status = {"status": "FAILED", "error": result[name]["error"]}
            print(result[name]["traceback"], file=sys.stderr, flush=True)
        result["sections"][name] = {**status, "seconds": time.perf_counter() - started,
                                    "memory_pool_bytes": pool_bytes()}
        write(result, args.out)
    failed = [name for name, s in result["sections"].items() if s["status"] == "FAILED"]
    for name in failed:  # again at the end, where the tail of the log is read
        print(f"== {name} FAILED:\n{result[name]['traceback']}", file=sys.stderr)
    print("\n".join(result["summary"]))
    return 1 if failed or (result.get("parity") or {}).get("not_met") else 0


if __name__ == "__main__":
    sys.exit(main())
