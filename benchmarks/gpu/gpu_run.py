"""The GPU run's checks and measurements, on reffuse's core alone (NumPy and CuPy: no weights to fetch).

For tiny and for synthetic-smollm2 (SmolLM2-135M's exact shapes, random weights):

- parity: the forward, the fused model (fold and last) and a KV-cache decode on the GPU against the CPU, in
  float32 and float64, to the targets of the CPU tests (1e-5 and 1e-12 of the largest logit); greedy and sampled
  generation give the same tokens;
- speed (synthetic-smollm2, float32): `reffuse bench`'s prefill, decode and fused-vs-sequential FFN run from 1 to
  4096 tokens, synchronised around every timed region.

Writes gpu.json and gpu.md into --out. `run.sh` calls it; see there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import reffuse
from reffuse.core.backend import gpu_module, gpu_module_name, to_numpy
from reffuse.core.generate import generate
from reffuse.core.model import KVCache, forward
from reffuse.speed.bench import run_benchmark
from reffuse.speed.timing import ratio_text

TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def relative(got, expected) -> float:
    got, expected = to_numpy(got), to_numpy(expected)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def parity(name: str, tokens: int) -> list[dict]:
    rows = []
    for dtype in ("float32", "float64"):
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


def versions() -> dict:
    cupy = gpu_module()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props.get("name", b"?")
    out = {"gpu": name.decode() if isinstance(name, bytes) else str(name), "gpu_module": gpu_module_name(),
           "cupy": getattr(cupy, "__version__", "?"), "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
           "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        from mpi4py import MPI
        out["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except Exception as e:  # no mpi4py, or no MPI library behind it
        out["mpi"] = f"unavailable ({type(e).__name__})"
    return out


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# reffuse on a GPU: {v['gpu']}", "", "Produced by:", "", f"    {result['command']}", "",
             f"CuPy {v['cupy']} (CUDA runtime {v['cuda_runtime']}), NumPy {v['numpy']}, Python {v['python']}, "
             f"MPI: {v['mpi']}. {result['seconds']:.0f} s.", "", "## Parity, GPU against CPU", "",
             "| model | dtype | check | relative error | target | met |", "|---|---|---|---:|---:|---|"]
    for r in result["parity"]:
        error = "-" if r["relative_error"] is None else f"{r['relative_error']:.2e}"
        target = "-" if r["target"] is None else f"{r['target']:g}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['check']} | {error} | {target} | {r['met']} |")
    bench = result["bench"]
    lines += ["", f"## Speed, {bench['model']} in float32 (medians of {bench['repeats']}, synchronised)", "",
              "| prefill tokens | ms |", "|---:|---:|"]
    lines += [f"| {r['tokens']} | {1e3 * r['reffuse_seconds']:.2f} |" for r in bench["prefill"]]
    lines += ["", f"decode: {bench['decode']['reffuse_tokens_per_second']:.1f} tokens/s "
                  f"({bench['decode']['new_tokens']} tokens after {bench['decode']['prompt_tokens']})", "",
              f"fused vs sequential run of {bench['ffn_run']['blocks']} FFNs:", "",
              "| tokens | sequential ms | fused ms | sequential / fused (95% interval) |", "|---:|---:|---:|---:|"]
    for r in bench["ffn_run"]["rows"]:
        lines.append(f"| {r['tokens']} | {1e3 * r['sequential']:.3f} | {1e3 * r['fused']:.3f} | "
                     f"{ratio_text(r['speedup'], r.get('speedup_interval_95', ()))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each measurement (default 7)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (the CPU rehearsal)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not reffuse.gpu_available():
        print(f"no usable GPU through {gpu_module_name()}: nothing to run", file=sys.stderr)
        return 2
    result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "versions": versions(),
              "parity": parity("tiny", 24) + parity("synthetic-smollm2", 16 if args.quick else 64)}
    model = reffuse.to_device(reffuse.load_model("synthetic-smollm2"), "gpu")
    ffn_tokens = (1, 16, 128) if args.quick else (1, 16, 128, 512, 1024, 4096)
    result["bench"] = run_benchmark(model, "synthetic-smollm2", repeats=1 if args.quick else args.repeats,
                                    prefill_tokens=(16,) if args.quick else (64, 128, 256, 1024),
                                    ffn_tokens=ffn_tokens, decode_tokens=4 if args.quick else 32,
                                    with_transformers=False, progress=lambda m: print(m, file=sys.stderr))
    result["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu.md").write_text(markdown(result))
    failed = [r for r in result["parity"] if not r["met"]]
    for r in failed:
        print(f"NOT MET: {r['model']} {r['dtype']} {r['check']}: {r['relative_error']}", file=sys.stderr)
    print(args.out / "gpu.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
