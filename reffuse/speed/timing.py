"""Timing helpers shared by `reffuse demo` and `reffuse bench`: medians of repeats, after warm-up.

Machines are shared and noisy, so results are reported as ratios against a baseline measured in the same run,
the things compared taking turns in every repeat, and a ratio comes with the interval of its paired repeats
(reffuse.stats.paired_ratio).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import numpy as np

from reffuse.core.backend import array_module, synchronize
from reffuse.core.fusion import fuse
from reffuse.core.layout import check_groups, original_layers
from reffuse.core.model import Model, run_blocks
from reffuse.records import as_tuple
from reffuse.speed.bench_result import Bandwidth, Bound, FfnRow
from reffuse.stats import MIN_PAIRS, paired_ratio


def median_seconds(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls, after `warmup` untimed calls; GPU work is waited for."""
    for _ in range(warmup):
        synchronize(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synchronize(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class EventClock:
    """A GPU's own time for a region: two CUDA events recorded on the current stream around it, of CuPy
    (cupy.cuda.Event) or of torch (torch.cuda.Event), `library` the module. Use as `with clock: ...` around the
    work, then `clock.collect()` once it is done: each region's seconds are appended to `samples`. The time runs
    from the first event to the second on the GPU's clock, idle gaps included (a GPU that waits for the host's
    next launch is idle, not busy): beside wall time, it says how much of that time the host's own work added."""

    def __init__(self, library):
        self.library, self.samples, self._events = library, [], None

    @staticmethod
    def available(library) -> bool:
        """Whether `library` (cupy, torch, or a stand-in) has CUDA events to time with."""
        if getattr(library, "__name__", "") == "torch":
            return bool(library.cuda.is_available())
        return hasattr(getattr(library, "cuda", None), "Event")

    def _event(self):
        if self.library.__name__ == "torch":
            return self.library.cuda.Event(enable_timing=True)
        return self.library.cuda.Event()

    def __enter__(self):
        self._events = (self._event(), self._event())
        self._events[0].record()
        return self

    def __exit__(self, *exc):
        self._events[1].record()

    def collect(self) -> float:
        """The last region's seconds (waits for its second event), appended to `samples`."""
        start, stop = self._events
        stop.synchronize()
        if self.library.__name__ == "torch":
            milliseconds = start.elapsed_time(stop)
        else:
            milliseconds = self.library.cuda.get_elapsed_time(start, stop)
        self.samples.append(milliseconds / 1e3)
        return self.samples[-1]


def compare_samples(fns: dict, repeats: int = 7, warmup: int = 1, clocks: dict | None = None) -> dict:
    """Every repeat's wall time of each fn() (name -> list of seconds), timed in alternation: every round calls
    each fn once, so a change in the machine's load falls on all of them alike, and round i of one fn and round
    i of another are a pair. With `clocks` (name -> EventClock), each timed call of those fns is also timed on
    the GPU's clock, into the clock's `samples`. A fn that returns something other than a CuPy array (a torch
    tensor) waits for its own GPU work before it returns."""
    clocks = clocks or {}
    for fn in fns.values():
        for _ in range(warmup):
            synchronize(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            clock = clocks.get(name) or contextlib.nullcontext()
            start = time.perf_counter()
            with clock:
                result = fn()
            synchronize(result)
            times[name].append(time.perf_counter() - start)
            if name in clocks:
                clocks[name].collect()
    return times


def ratio_text(value: float, interval=()) -> str:
    """'0.56x (0.51-0.56)': a ratio and its 95% interval; the interval None (fewer than MIN_PAIRS repeats) says
    so, and an empty one (a record made without intervals) is left out."""
    if interval is None:
        return f"{value:.2f}x (no interval: fewer than {MIN_PAIRS} repeats)"
    return f"{value:.2f}x" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Pin the BLAS thread pool to n threads inside the block (no-op when n is None or threadpoolctl is absent)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if n is None or threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def time_ffn_run(model: Model, group: tuple[int, int], tokens: int, norm: str = "fold", repeats: int = 7,
                 seed: int = 0, gpu_clock: bool = False) -> FfnRow:
    """Median seconds for one run of attention-free blocks on `tokens` positions: sequential (eq. 4 block by
    block) vs fused (one wide SwiGLU), with the ratio sequential / fused (> 1 means fusion is faster): the median
    of the paired repeats' ratios, and its 95% interval (paired_ratio). With `gpu_clock` (a model on a GPU whose
    module has CUDA events), the same on the GPU's clock beside: sequential_gpu, fused_gpu, gpu_speedup."""
    (first, last), = check_groups(model, [group])
    fused = fuse(model, [group], norm=norm)
    xp = array_module(model.embed)
    x = xp.asarray(np.random.default_rng(seed).standard_normal((tokens, model.config.dim)), dtype=model.dtype)
    clocks = {name: EventClock(xp) for name in ("sequential", "fused")} if gpu_clock else {}
    samples = compare_samples({"sequential": lambda: run_blocks(model, x, start=first, stop=last + 1),  # eq. 4, k times
                               "fused": lambda: run_blocks(fused, x, start=first, stop=first + 1)}, repeats,
                              clocks=clocks)
    speedup = paired_ratio(samples["sequential"], samples["fused"])
    row = FfnRow(tokens=tokens, sequential=statistics.median(samples["sequential"]),
                 fused=statistics.median(samples["fused"]), speedup=speedup.median,
                 speedup_interval_95=as_tuple(speedup.interval_95))
    if not clocks:
        return row
    gpu = paired_ratio(clocks["sequential"].samples, clocks["fused"].samples)
    return dataclasses.replace(row, sequential_gpu=statistics.median(clocks["sequential"].samples),
                               fused_gpu=statistics.median(clocks["fused"].samples), gpu_speedup=gpu.median,
                               gpu_speedup_interval_95=as_tuple(gpu.interval_95))


def time_region(models: dict, region: tuple[int, int], tokens: int, repeats: int = 7, seed: int = 0) -> dict:
    """Every repeat's seconds to run the blocks of `region` (first, last), numbered as in the unfused model, on
    `tokens` random positions, per model (name -> list), timed in alternation (compare_samples). A fused model
    runs the blocks that stand for those layers."""
    rng = np.random.default_rng(seed)
    fns = {}
    for name, model in models.items():
        xp = array_module(model.embed)
        x = xp.asarray(rng.standard_normal((tokens, model.config.dim)), dtype=model.dtype)
        cos, sin = model.rope(np.arange(tokens))
        layers = [i for i, span in enumerate(original_layers(model)) if region[0] <= span[0] <= region[1]]
        fns[name] = (lambda model=model, x=x, cos=cos, sin=sin, start=layers[0], stop=layers[-1] + 1:
                     run_blocks(model, x, cos, sin, start=start, stop=stop))
    return compare_samples(fns, repeats)


def streaming_bandwidth(threads: int, repeats: int = 7, megabytes: int = 128) -> Bandwidth:
    """Bytes per second NumPy streams here from beyond every cache, best of `repeats`: a GEMV over `megabytes` of
    float32 weights stored (out, in), as reffuse stores them, the same weights stored (in, out), and a copy (its
    bytes read and written). The first two say which orientation BLAS streams faster on this machine."""
    rng = np.random.default_rng(0)
    weight = rng.random(((megabytes << 20) // 4096, 1024), dtype=np.float32)  # [out, in], `megabytes` MiB
    transposed = np.ascontiguousarray(weight.T)                          # [in, out]
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
        out_in = weight.nbytes / best(lambda: x @ weight.T)
        in_out = weight.nbytes / best(lambda: x @ transposed)
    copy = 2 * weight.nbytes / best(lambda: np.copyto(out, weight))
    return Bandwidth(out_in, in_out, copy)


def decode_bound(weight_bytes: int, bandwidth: Bandwidth) -> Bound:
    """The fastest a decode step can be where it must read every weight once: weight_bytes over the best of the
    measured streaming rates (streaming_bandwidth). No engine is placed against it yet (`fractions` is empty)."""
    rate = bandwidth.best
    return Bound(int(weight_bytes), rate, weight_bytes / rate, rate / weight_bytes, bandwidth, {})
