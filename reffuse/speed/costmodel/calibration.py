"""Calibrating the `cpu` hardware: a few seconds of measurement of this machine (see calibrate_cpu)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from reffuse.core.fast import for_speed
from reffuse.core.config import Config
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import FFN, Attention, Block, Model, forward
from reffuse.errors import ReffuseError
from reffuse.optional import install_hint
from reffuse.speed.costmodel.hardware import (NUMPY_CALLS, Calibration, Hardware, MpiAllreduce, cpu_hardware,
                                              h100_sxm)
from reffuse.speed.timing import blas_threads

MPI_PROBE = Path(__file__).with_name("mpi_probe.py")


def _best_seconds(fn, repeats: int, inner: int = 1) -> float:
    """Seconds of one fn() call: the best of `repeats` timings of `inner` calls each, after one warm-up.
    The best, not the median: calibration asks what the machine does undisturbed, since on a shared machine
    every other figure mixes in whatever else was running (the load average is recorded beside it)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return min(times)


def _overhead_models(dtype) -> dict[str, Model]:
    """Models of width 16 with no block, one attention-only block, one FFN-only block: their compute is nil,
    so a decode step through them is what reffuse's Python and NumPy calls cost."""
    rng = np.random.default_rng(0)
    d, hd = 16, 8
    cfg = Config(vocab_size=16, dim=d, n_heads=2, n_kv_heads=1, head_dim=hd, name="overhead probe")

    def w(*shape):
        return rng.standard_normal(shape).astype(dtype)

    attention = Attention(norm_gain=w(d), q=w(2 * hd, d), k=w(hd, d), v=w(hd, d), o=w(d, 2 * hd))
    ffn = FFN(norm_gain=w(d), gate=w(d, d), up=w(d, d), down=w(d, d))
    embed = w(16, d)
    return {"forward": for_speed(Model(cfg, embed, [], w(d), embed)),  # the kernels load_model's models run
            "attention": for_speed(Model(cfg, embed, [Block(attention, None)], w(d), embed)),
            "ffn": for_speed(Model(cfg, embed, [Block(None, ffn)], w(d), embed))}


def _decode_seconds(models: dict[str, Model], repeats: int = 9, inner: int = 40) -> dict[str, float]:
    """Best seconds of one decode step (one token after one cached position) through each model. The models
    take turns, so that a change in the machine's load reaches all of them alike."""
    steps = {}
    for name, model in models.items():
        cache = KVCache(model, max_tokens=2)

        def step(model=model, cache=cache):
            cache.length = 1
            forward(model, [1], cache=cache)

        step()
        steps[name] = step
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                step()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: min(t) for name, t in times.items()}


def mpiexec_path() -> str | None:
    """The MPI launcher of this Python environment (the `mpi` extra puts it beside python), else one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def measure_mpi_allreduce(timeout: float = 12.0) -> MpiAllreduce:
    """alpha and beta of MPI's Allreduce between 2 ranks on this machine, from `mpiexec -n 2`: a small message
    (latency) and a 1 MiB one (bandwidth); for N = 2 a ring is t = 2·alpha + bytes / beta. Also the GEMV
    bandwidth each of 2 ranks gets when both stream at once."""
    launcher = mpiexec_path()
    if launcher is None:
        return MpiAllreduce(available=False, reason=f"no mpiexec ({install_hint('mpi')})")
    try:
        one_thread = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        done = subprocess.run([launcher, "-n", "2", sys.executable, str(MPI_PROBE)], capture_output=True,
                              text=True, timeout=timeout, env=one_thread)
    except subprocess.TimeoutExpired:
        return MpiAllreduce(available=False, reason=f"mpiexec -n 2 did not finish in {timeout:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return MpiAllreduce(available=False, reason=f"mpiexec -n 2 failed: {last}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])                        # the line mpi_probe prints
    alpha = probe["small_seconds"] / 2                                               # 2 (N - 1) steps at N = 2
    beta = (probe["large_bytes"] - probe["small_bytes"]) / max(probe["large_seconds"] - probe["small_seconds"],
                                                               1e-9)
    return MpiAllreduce(available=True, alpha=alpha, link_bandwidth=beta, **probe)


def calibrate_cpu(mpi: bool = True, dtype: str = "fp32") -> Hardware:
    """Hardware for this machine, from a few seconds of measurement (well under 20 s):

    - float32 GEMM FLOP/s: a 1024² @ 1024² matmul, with 1 BLAS thread and with all of them;
    - memory bandwidth: a decode GEMV, x [1, 1024] @ W.T with W [32768, 1024] (128 MB, beyond the caches; rows
      of 1024 weights, as in small LLMs: BLAS streams short rows slower, and long rows up to ~1.5x faster);
    - per-call overhead: decode steps through models of width 16 (no block, one attention, one FFN);
    - MPI all-reduce alpha and beta from `mpiexec -n 2` (if mpi and a launcher are present), and the bandwidth
      each of two ranks gets when both stream at once.
    Each figure is the best of several timings (MPI: the 10th percentile of single calls), what the machine does
    undisturbed; the load average at the time is recorded with them.
    """
    started = time.perf_counter()
    np_dtype = np.float32 if dtype == "fp32" else np.float64
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 1024, 1024), dtype=np_dtype)
    weight = rng.random((32768, 1024), dtype=np_dtype)               # [out, in], stored like reffuse's weights
    x = rng.random((1, 1024), dtype=np_dtype)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rates = []                                                       # (GEMM FLOP/s, GEMV bytes/s) per setting
    for threads in (1, cores):
        with blas_threads(threads):
            rates.append((2 * 1024 ** 3 / _best_seconds(lambda: a @ b, repeats=5),
                          weight.nbytes / _best_seconds(lambda: x @ weight.T, repeats=9)))
    (gemm_1_thread, gemv_1_thread), (gemm_all_threads, gemv_all_threads) = rates
    seconds = _decode_seconds(_overhead_models(np_dtype))
    for part in ("attention", "ffn"):  # a model with one such block, less the model with none
        seconds[part] = max(seconds[part] - seconds["forward"], 0.0)
    per_call = sum(seconds.values()) / sum(NUMPY_CALLS.values())
    comm = measure_mpi_allreduce() if mpi else MpiAllreduce(available=False, reason="not asked for")
    # the most memory bandwidth the machine was seen to give: one process with all threads, or two ranks at once
    machine = max(gemv_all_threads, gemv_1_thread, (comm.ranks or 0) * (comm.gemv_bandwidth_per_rank or 0.0))
    calibration = Calibration(cores=cores, load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                              gemm_flops_1_thread=gemm_1_thread, gemv_bandwidth_1_thread=gemv_1_thread,
                              gemm_flops_all_threads=gemm_all_threads, gemv_bandwidth_all_threads=gemv_all_threads,
                              machine_bandwidth=machine, decode_overhead_seconds=seconds,
                              numpy_call_seconds=per_call, mpi_allreduce=comm, dtype=dtype,
                              calibration_seconds=time.perf_counter() - started)
    return cpu_hardware(calibration)


HARDWARE_PRESETS = ("h100-sxm", "h100-sxm-bf16", "cpu")


def get_hardware(name: str, mpi: bool = True) -> Hardware:
    """A hardware preset by name; "cpu" runs the calibration (a few seconds)."""
    if name == "h100-sxm":
        return h100_sxm("fp8")
    if name == "h100-sxm-bf16":
        return dataclasses.replace(h100_sxm("bf16"), name="h100-sxm-bf16")
    if name == "cpu":
        return calibrate_cpu(mpi=mpi)
    raise ReffuseError(f"unknown hardware {name!r}: use one of {', '.join(HARDWARE_PRESETS)}")
