"""A decode-latency model: why fewer, wider FFN layers decode faster under tensor parallelism (PAPER.md §5).

A teaching model, not a simulator. Every term is a line of arithmetic and every number has a stated source.

For one forward pass of `tokens` new tokens per sequence (decode: tokens = 1) over a KV cache of `context`
positions, at tensor-parallel degree N, each GPU (or CPU rank) spends, per sub-block (attention or FFN):

    time = max(FLOPs / peak_flops, bytes / memory_bandwidth)      the roofline of the sub-block's work
         + kernels × kernel_overhead                               launch gaps, ramp-up and tail of each kernel

and, after every row-parallel layer (o_proj, down_proj), one ring all-reduce of the [tokens, d] activations:

    allreduce = 2 (N - 1) · alpha + 2 (N - 1) / N · bytes / link_bandwidth        (alpha-beta model of a ring)

    FLOPs   2 · weights per GPU · tokens (one multiply-add per weight per token), plus attention's
            2 · 2 · heads per GPU · head_dim · keys read per query (q·k and p·v)
    bytes   the weights per GPU (each read once per forward), plus the KV cache read by attention:
            2 (K and V) · kv heads per GPU · head_dim · context · bytes per element

Under Megatron tensor parallelism the weights and FLOPs of every attention and FFN divide by N, so the time a
GPU spends on them shrinks as 1/N, while the number of all-reduces stays: 2 per block with attention and an FFN,
1 per FFN-only block, 1 per fused FFN group. FFN Fusion turns a run of k attention-free blocks into one wide
FFN: the same weights and FLOPs, k - 1 fewer all-reduces and k - 1 fewer FFNs' kernels. At batch 1 decode is
memory-bound (about 1 FLOP per weight byte read, far below any machine's FLOP/byte ratio), so what fusion saves
is the per-layer fixed cost, and that saving grows with N because the weight time it sits beside shrinks as 1/N.

Assumptions, named because each one is wrong somewhere:
- Weights are read from memory once per forward; caches hold nothing between layers (true at 100s of GB).
- Activations, norms, residual adds and the embedding lookup move negligible bytes at decode and are left out
  of the roofline; their kernels are counted in the overhead.
- The roofline is applied per sub-block, as if each were one kernel at full bandwidth or full FLOP rate.
- Every kernel, all-reduces included, costs the same fixed `kernel_overhead` on top of its roofline time.
- The all-reduce is a ring: 2 (N - 1) steps of alpha each. Nothing overlaps communication with compute.
- Tensor-parallel degree N divides the query heads and every FFN width; key/value heads are split when N
  divides them and replicated when they divide N (as reffuse.tp and vLLM do).

Hardware presets: "h100-sxm" and "h100-sxm-bf16" (public specifications, cited below) and "cpu", this machine,
calibrated by a short measurement (`calibrate_cpu`). Model layouts: "tiny", "smollm2", "llama-3.1-405b",
"ultra-253b-prefusion", "ultra-253b-fused", or any reffuse Model (`layout_from_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from reffuse.core.layout import (BlockLayout, Layout, attention_free_runs, check_groups, fuse_layout,
                                 sharding_problems)
from reffuse.core.model import FFN, Attention, Block, Config, KVCache, Model, forward
from reffuse.errors import ReffuseError

# bytes per weight in each precision the presets use
PRECISION_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4, "fp64": 8}


# ---------------------------------------------------------------------------------------------------------------
# Layouts (reffuse.core.layout): what the cost model needs to know about a model


def layout_from_model(model: Model, fusion_groups=None, name: str | None = None) -> Layout:
    """The layout of a reffuse Model (fused or not), with the runs its fused variant fuses: by default, each
    attention-free run of 3 or more blocks without its last block (the paper leaves a run's last FFN alone, §4)."""
    layout = dataclasses.replace(model.layout(), name=name or model.config.name)
    groups = default_fusion_groups(layout) if fusion_groups is None else fusion_groups
    return dataclasses.replace(layout, fusion_groups=tuple(check_groups(layout, groups)))


def default_fusion_groups(layout: Layout) -> tuple[tuple[int, int], ...]:
    """Each attention-free run of at least 3 blocks, without its last block."""
    return tuple((first, last - 1) for first, last in attention_free_runs(layout) if last - first >= 2)


def parameter_count(layout: Layout) -> int:
    """Weights in the model: attention and FFN sub-blocks, embedding and LM head (norm gains, ~1e-5 of it, left out)."""
    attention = sum(b.attention for b in layout.blocks) * layout.attention_weights()
    ffn = sum(3 * layout.dim * b.ffn_width for b in layout.blocks)           # gate, up [w, d] and down [d, w]
    embeddings = layout.vocab_size * layout.dim * (1 if layout.tie_embeddings else 2)
    return attention + ffn + embeddings


def allreduce_count(layout: Layout, tp: int) -> int:
    """All-reduces per forward pass at tensor-parallel degree tp: one after each row-parallel layer
    (o_proj of every attention, down_proj of every FFN, fused or not); none at tp = 1."""
    if tp == 1:
        return 0
    return sum(b.attention for b in layout.blocks) + sum(b.ffn_width > 0 for b in layout.blocks)


def tensor_parallel_degrees(layout: Layout, up_to: int = 8) -> list[int]:
    """The degrees 1..up_to over which the layout (and its fused variant) can be split."""
    fused = fuse_layout(layout) if layout.fusion_groups else layout
    return [n for n in range(1, up_to + 1)
            if not sharding_problems(layout, n) and not sharding_problems(fused, n)]


def check_tensor_parallel(layout: Layout, tp: int) -> None:
    problems = sharding_problems(layout, tp)
    if problems:
        raise ReffuseError(f"{layout.name} cannot be split over TP={tp}: {'; '.join(problems)}. Degrees up to 64 "
                           f"that work: {', '.join(map(str, tensor_parallel_degrees(layout, 64)))}")


# ---------------------------------------------------------------------------------------------------------------
# Model presets


def _blocks(runs) -> tuple[BlockLayout, ...]:
    """Blocks from runs (count, attention, FFN width)."""
    return tuple(BlockLayout(attention, width) for count, attention, width in runs for _ in range(count))


def smollm2_layout() -> Layout:
    """SmolLM2-135M (the GGUF reffuse runs, ../ENV-NOTES): 30 full blocks, d 576, FFN 1536, 9 heads / 3 kv."""
    return Layout("smollm2", dim=576, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152, tie_embeddings=True,
                  blocks=_blocks([(30, True, 1536)]), source="SmolLM2-135M-Instruct GGUF metadata")


def llama_405b_layout() -> Layout:
    """Llama-3.1-405B: 126 full blocks, d 16384, FFN 53248, 128 query heads / 8 kv heads of 128, vocab 128256."""
    return Layout("llama-3.1-405b", dim=16384, n_heads=128, n_kv_heads=8, head_dim=128, vocab_size=128256,
                  tie_embeddings=False, blocks=_blocks([(126, True, 53248)]),
                  source="meta-llama/Llama-3.1-405B config.json (the parent of Ultra-253B, PAPER.md §4.1)")


def deci_ffn_width(ffn_mult: float, dim: int = 16384) -> int:
    """DeciLM's FFN width for a multiplier: int(2/3 · mult · d) rounded up to a multiple of 256 (4.875 -> 53248)."""
    width = int(2 * ffn_mult * dim / 3)
    return -(-width // 256) * 256


# The four fusion groups of Ultra-253B (PAPER.md §4.1) and the width of each fused FFN, as ffn_mult in the
# released config (huggingface.co/nvidia/Llama-3_1-Nemotron-Ultra-253B-v1, config.json, block_configs).
ULTRA_FUSION_GROUPS = ((66, 73), (74, 85), (86, 100), (101, 114))
ULTRA_FUSED_MULTS = (36.5625, 39.0, 31.40625, 27.5625)

# Each group's per-layer multipliers before fusion. ASSUMPTION: the paper does not publish them. These are the
# most nearly equal split, among DeciLM's multipliers (multiples of 0.4875 up to 4.875), that sums to the
# released fused width exactly; the order within a group is ours. The cost model depends only on the sums.
ULTRA_GROUP_MULTS = (
    (2.4375,) + (4.875,) * 7,                # 66..73,   8 layers -> 36.5625
    (2.4375,) * 8 + (4.875,) * 4,            # 74..85,  12 layers -> 39.0
    (1.95,) * 11 + (2.4375,) * 4,            # 86..100, 15 layers -> 31.40625 (by width: 343040)
    (1.95,) * 14,                            # 101..114, 14 layers -> 27.5625 (by width: 301056)
)

# Layers 0..65 and 115..125 of the pre-fusion model as runs (count, attention, ffn_mult), read off the released
# config's 162 block_configs: dropping its 82 placeholder blocks (attention and FFN both no_op) leaves 80 blocks,
# of which 66 precede the first fused FFN (so the attention-free run starts at layer 66, as the paper says),
# then the 4 fused FFNs, then 10 more. One placeholder must stand for a layer of the paper's 126 whose attention
# and FFN were both removed; ASSUMPTION: the lone placeholder among the last layers (released block 154), which
# makes layer 118 empty. An empty block costs nothing here, so this choice changes no number.
ULTRA_HEAD_RUNS = [(1, True, 0.4875), (1, True, 0.975), (6, True, 1.4625), (4, True, 1.95), (2, True, 4.875),
                   (3, True, 4.875), (3, True, 4.875), (1, True, 2.4375), (3, True, 1.95), (1, False, 1.95),
                   (1, True, 4.875), (1, False, 4.875), (17, True, 4.875), (3, True, 3.4125), (1, True, 2.925),
                   (3, True, 2.4375), (2, False, 2.4375), (1, True, 2.4375), (7, False, 2.4375), (1, True, 2.4375),
                   (1, True, 2.925), (1, True, 4.875), (1, False, 4.875), (1, True, 4.875)]       # layers 0..65
ULTRA_TAIL_RUNS = [(1, False, 1.95), (1, True, 1.95), (1, True, 2.4375), (1, False, None), (2, True, 2.4375),
                   (1, True, 3.4125), (3, True, 4.875), (1, True, 2.4375)]                         # layers 115..125


def ultra_prefusion_layout() -> Layout:
    """The paper's 253B PreFusion model (126 blocks), reconstructed from the released fused config."""
    def runs(spec):
        return [(count, attention, deci_ffn_width(mult) if mult else 0) for count, attention, mult in spec]

    middle = [(1, False, deci_ffn_width(m)) for group in ULTRA_GROUP_MULTS for m in group]         # layers 66..114
    blocks = _blocks(runs(ULTRA_HEAD_RUNS)) + _blocks(middle) + _blocks(runs(ULTRA_TAIL_RUNS))
    return Layout("ultra-253b-prefusion", dim=16384, n_heads=128, n_kv_heads=8, head_dim=128, vocab_size=128256,
                  tie_embeddings=False, blocks=blocks, fusion_groups=ULTRA_FUSION_GROUPS,
                  source="huggingface.co/nvidia/Llama-3_1-Nemotron-Ultra-253B-v1 config.json, un-fused into the "
                         "paper's 126 layers (PAPER.md §4.1)",
                  assumptions=(
                      "Every attention that Puzzle kept has 128 query heads and 8 kv heads (n_heads_in_group 16 "
                      "in every active block of the released config).",
                      "Layers 0..65 and 115..125 are the released config's blocks in order, placeholders "
                      "dropped; layer 118 is taken to be a block with attention and FFN both removed.",
                      "The per-layer FFN widths inside each fused group are not published: we use the most nearly "
                      "equal split into DeciLM widths that sums to the released fused width exactly "
                      f"({', '.join(str(len(g)) + ' layers -> ' + str(m) for g, m in zip(ULTRA_GROUP_MULTS, ULTRA_FUSED_MULTS))}).",
                      "Parameter count: the layout gives ~250.2e9, ~1% under the published '253B'; the "
                      "released config's shapes give the same count, so the gap is in the name, not the layout.",
                  ))


def ultra_fused_layout() -> Layout:
    """Ultra-253B after FFN Fusion: the pre-fusion layout with [66,73], [74,85], [86,100], [101,114] fused."""
    prefusion = ultra_prefusion_layout()
    return dataclasses.replace(fuse_layout(prefusion), name="ultra-253b-fused",
                               source="ultra-253b-prefusion with the paper's four groups fused (PAPER.md §4.1); "
                                      "the fused widths are the released config's")


def tiny_layout() -> Layout:
    """reffuse's synthetic tiny model; its fused variant fuses the attention-free run without its last block."""
    from reffuse.core.tiny import build_tiny

    return layout_from_model(build_tiny(), name="tiny")


MODEL_PRESETS = {
    "tiny": tiny_layout,
    "smollm2": smollm2_layout,
    "llama-3.1-405b": llama_405b_layout,
    "ultra-253b-prefusion": ultra_prefusion_layout,
    "ultra-253b-fused": ultra_fused_layout,
}


def get_layout(name: str, fusion_groups=None) -> Layout:
    """A preset layout by name, or the layout of any model `reffuse.load_model` knows (a name or a folder)."""
    if name in MODEL_PRESETS:
        layout = MODEL_PRESETS[name]()
        if fusion_groups is not None:
            layout = dataclasses.replace(layout, fusion_groups=tuple(check_groups(layout, fusion_groups)))
        return layout
    from reffuse.formats.registry import NAMED_MODELS, load_model

    if name in NAMED_MODELS or os.path.isdir(name):
        return layout_from_model(load_model(name), fusion_groups, name=name)
    raise ReffuseError(f"unknown model {name!r} for the cost model: use one of {', '.join(MODEL_PRESETS)}, "
                       "a model name reffuse can load, or the folder of a saved model")


# ---------------------------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class Hardware:
    """One device (GPU, or a CPU process) and the runtime that drives it, as the cost model sees them."""
    name: str
    peak_flops: dict            # precision -> FLOP/s, dense
    memory_bandwidth: float     # bytes/s
    kernel_overhead: float      # seconds per kernel (or NumPy call) beyond its roofline time
    kernels: dict               # kernels per "attention" and "ffn" sub-block and per "forward" (embedding, head)
    allreduce_alpha: float | None   # seconds per ring step (latency); None: not known on this hardware
    link_bandwidth: float | None    # bytes/s, one direction, per device
    activation_bytes: int       # bytes per activation and KV-cache element
    precision: str              # the weights' precision (a key of peak_flops)
    lm_head_vocab_parallel: bool    # LM head split over the vocabulary (+ an all-gather) or replicated
    memory_capacity: float | None   # bytes per device, to flag layouts that do not fit
    cores_shared_by_ranks: int = 0  # >0: ranks of one job share this many cores (a CPU), see for_ranks
    sources: tuple[str, ...] = ()
    calibration: dict | None = None

    @property
    def weight_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]

    def with_precision(self, precision: str) -> "Hardware":
        if precision not in self.peak_flops:
            raise ReffuseError(f"precision {precision!r} is not available on {self.name}: use one of "
                               f"{', '.join(self.peak_flops)}")
        return dataclasses.replace(self, precision=precision)

    def for_ranks(self, n_ranks: int, threads: int | None = None) -> "Hardware":
        """What one rank gets when n_ranks ranks of `threads` BLAS threads each share this machine (a CPU only:
        each GPU is its own device). threads=None: the cores split evenly, as `reffuse tp --threads` would.

        ASSUMPTION: a rank computes at `threads` times the 1-thread GEMM rate and streams at `threads` times the
        1-thread GEMV bandwidth, but the ranks together stream no more than the machine was seen to (alone with
        all threads, or two ranks at once); when ranks × threads outnumber the cores, each rank runs at
        cores / (ranks × threads) speed, so every term, overheads and all-reduce latency too, stretches.
        """
        cal, cores = self.calibration, self.cores_shared_by_ranks
        if not cores or cal is None:
            return self
        threads = threads or max(1, cores // n_ranks)
        share = max(1.0, n_ranks * threads / cores)  # time-sharing when busy threads outnumber cores
        one, machine = cal["gemm_flops_1_thread"], max(cal["gemm_flops_all_threads"], cal["gemm_flops_1_thread"])
        flops = min(one * threads, machine)
        bandwidth = min(cal["gemv_bandwidth_1_thread"] * threads, cal["machine_bandwidth"] / n_ranks)
        return dataclasses.replace(self, peak_flops={self.precision: flops / share},
                                   memory_bandwidth=bandwidth / share, kernel_overhead=self.kernel_overhead * share,
                                   allreduce_alpha=None if self.allreduce_alpha is None
                                   else self.allreduce_alpha * share)

    def describe(self) -> dict:
        return {"name": self.name, "precision": self.precision, "peak_flops": self.peak_flops[self.precision],
                "memory_bandwidth": self.memory_bandwidth, "kernel_overhead": self.kernel_overhead,
                "kernels": self.kernels, "allreduce_alpha": self.allreduce_alpha,
                "link_bandwidth": self.link_bandwidth, "activation_bytes": self.activation_bytes,
                "lm_head_vocab_parallel": self.lm_head_vocab_parallel, "memory_capacity": self.memory_capacity,
                "sources": list(self.sources), "calibration": self.calibration}


# H100 SXM5 80GB, from NVIDIA's H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100, SXM column):
#   FP8 Tensor Core 3,958 TFLOP/s and BF16 1,979 TFLOP/s are "with sparsity"; dense is half: 1,979 and 989.
#   GPU memory 80 GB HBM3 at 3.35 TB/s. NVLink (4th gen) 900 GB/s per GPU, the sum of both directions over
#   18 links, so 450 GB/s each way; an 8-GPU HGX board connects every pair through NVSwitch.
# Chosen, not specified (change them and watch the ratios move):
#   kernel_overhead 3 µs: with CUDA graphs a launch gap is ~1-2 µs, and a small decode kernel also loses
#     its ramp-up and tail, when too few thread blocks are in flight to keep HBM busy (the "wave quantization"
#     of §5). One fixed figure per kernel stands for both.
#   alpha 0.7 µs per ring step: one NVLink/NVSwitch hop plus the flag handshake between GPUs is of the order of
#     a microsecond. A ring at TP8 takes 14 steps, ~10 µs, plus its launch: the order commonly reported for a
#     small-message all-reduce on 8 NVLink-connected GPUs (an estimate; we found no one citable measurement,
#     and the answer depends on the algorithm: ring, tree, one-shot, NVLink SHARP).
#   The link bandwidth is the peak; a real all-reduce moves its bytes below it, but at batch 1 the message is
#     32 KB and the bandwidth term is ~0.1 µs of ~10 µs, so the projection does not depend on it.
#   Kernels per sub-block, as a decode engine with fused kernels launches them: attention = input RMSNorm,
#     QKV GEMM, RoPE + KV-cache write, decode attention, O GEMM (5); FFN = RMSNorm, gate/up GEMM, SwiGLU,
#     down GEMM (4); per forward = embedding, final RMSNorm, LM head GEMM, sampling (4); plus one per
#     all-reduce or all-gather.
H100_SOURCES = ("NVIDIA H100 Tensor Core GPU datasheet (SXM5 80GB): FP8 1979 / BF16 989 dense TFLOP/s, "
                "HBM3 3.35 TB/s, NVLink 900 GB/s bidirectional per GPU",
                "chosen: kernel overhead 3 us, all-reduce alpha 0.7 us per ring step (see reffuse/costmodel.py)")


def h100_sxm(precision: str = "fp8") -> Hardware:
    hw = Hardware(name="h100-sxm", peak_flops={"fp8": 1979e12, "bf16": 989e12}, memory_bandwidth=3.35e12,
                  kernel_overhead=3e-6, kernels={"attention": 5, "ffn": 4, "forward": 4},
                  allreduce_alpha=0.7e-6, link_bandwidth=450e9, activation_bytes=2, precision="fp8",
                  lm_head_vocab_parallel=True, memory_capacity=80e9, sources=H100_SOURCES)
    return hw.with_precision(precision)


# NumPy calls reffuse.core.model makes per sub-block at decode (one token, with a KV cache), counted in its code:
# attention 37 (RMSNorm 6, q/k/v 3, RoPE 10, cache 2, scores and mask 7, softmax 5, p·v, o and residual 4),
# FFN 16 (RMSNorm 6, gate, SiLU 5, up, product, down, residual), per forward 27 (token checks, RoPE tables,
# embedding, final RMSNorm, LM head). Calibration sets the cost of one call from a model of tiny width.
NUMPY_CALLS = {"attention": 37, "ffn": 16, "forward": 27}


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
    return {"forward": Model(cfg, embed, [], w(d), embed),
            "attention": Model(cfg, embed, [Block(attention, None)], w(d), embed),
            "ffn": Model(cfg, embed, [Block(None, ffn)], w(d), embed)}


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


# Run under `mpiexec -n 2` with one BLAS thread per rank: MPI's Allreduce of a small and a 1 MiB float32 buffer,
# each call timed on its own, keeping the 10th percentile (on a shared machine a call now and then waits for the
# other rank to be scheduled; that wait is the machine's load, not the all-reduce); then both ranks at once
# stream the calibration's 128 MB GEMV (how the machine's memory bandwidth splits between two ranks).
MPI_PROBE = """
import json, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
def low_seconds(fn, calls):
    fn()
    comm.Barrier()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 10))
def allreduce_seconds(n, calls):
    buf = np.ones(n, dtype=np.float32)
    return low_seconds(lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), calls)
small, large = 8, 1 << 18
weight = np.ones((32768, 1024), dtype=np.float32)
x = np.ones((1, 1024), dtype=np.float32)
result = {"ranks": comm.Get_size(), "small_bytes": 4 * small, "small_seconds": allreduce_seconds(small, 400),
          "large_bytes": 4 * large, "large_seconds": allreduce_seconds(large, 30),
          "gemv_bandwidth_per_rank": min(comm.allgather(weight.nbytes / low_seconds(lambda: x @ weight.T, 9)))}
if comm.Get_rank() == 0:
    print(json.dumps(result))
"""


def mpiexec_path() -> str | None:
    """The MPI launcher of this Python environment (the `mpi` extra puts it beside python), else one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def measure_mpi_allreduce(timeout: float = 12.0) -> dict:
    """alpha and beta of MPI's Allreduce between 2 ranks on this machine, from `mpiexec -n 2`: a small message
    (latency) and a 1 MiB one (bandwidth); for N = 2 a ring is t = 2·alpha + bytes / beta. Also the GEMV
    bandwidth each of 2 ranks gets when both stream at once."""
    launcher = mpiexec_path()
    if launcher is None:
        return {"available": False, "reason": "no mpiexec (pip install 'reffuse[mpi]')"}
    try:
        one_thread = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        done = subprocess.run([launcher, "-n", "2", sys.executable, "-c", MPI_PROBE], capture_output=True,
                              text=True, timeout=timeout, env=one_thread)
    except subprocess.TimeoutExpired:
        return {"available": False, "reason": f"mpiexec -n 2 did not finish in {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return {"available": False, "reason": f"mpiexec -n 2 failed: {last}"}
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    alpha = probe["small_seconds"] / 2                                               # 2 (N - 1) steps at N = 2
    beta = (probe["large_bytes"] - probe["small_bytes"]) / max(probe["large_seconds"] - probe["small_seconds"],
                                                               1e-9)
    return {"available": True, "alpha": alpha, "link_bandwidth": beta, **probe}


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
    from reffuse.speed.timing import blas_threads

    started = time.perf_counter()
    np_dtype = np.float32 if dtype == "fp32" else np.float64
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 1024, 1024), dtype=np_dtype)
    weight = rng.random((32768, 1024), dtype=np_dtype)               # [out, in], stored like reffuse's weights
    x = rng.random((1, 1024), dtype=np_dtype)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    measured = {}
    for label, threads in (("1_thread", 1), ("all_threads", cores)):
        with blas_threads(threads):
            measured[f"gemm_flops_{label}"] = 2 * 1024 ** 3 / _best_seconds(lambda: a @ b, repeats=5)
            measured[f"gemv_bandwidth_{label}"] = weight.nbytes / _best_seconds(lambda: x @ weight.T, repeats=9)
    seconds = _decode_seconds(_overhead_models(np_dtype))
    for part in ("attention", "ffn"):  # a model with one such block, less the model with none
        seconds[part] = max(seconds[part] - seconds["forward"], 0.0)
    per_call = sum(seconds.values()) / sum(NUMPY_CALLS.values())
    comm = measure_mpi_allreduce() if mpi else {"available": False, "reason": "not asked for"}
    # the most memory bandwidth the machine was seen to give: one process with all threads, or two ranks at once
    machine = max(measured["gemv_bandwidth_all_threads"], measured["gemv_bandwidth_1_thread"],
                  comm.get("ranks", 0) * comm.get("gemv_bandwidth_per_rank", 0.0))
    calibration = {"cores": cores, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                   **measured, "machine_bandwidth": machine,
                   "decode_overhead_seconds": seconds, "numpy_call_seconds": per_call, "mpi_allreduce": comm,
                   "dtype": dtype, "calibration_seconds": time.perf_counter() - started}
    return cpu_hardware(calibration)


def cpu_hardware(calibration: dict) -> Hardware:
    """The `cpu` Hardware from a calibration (calibrate_cpu's, or one recorded in a `reffuse costmodel --json`)."""
    comm = calibration["mpi_allreduce"]
    dtype = calibration["dtype"]
    return Hardware(name="cpu", peak_flops={dtype: calibration["gemm_flops_all_threads"]},
                    memory_bandwidth=calibration["gemv_bandwidth_all_threads"],
                    kernel_overhead=calibration["numpy_call_seconds"], kernels=dict(NUMPY_CALLS),
                    allreduce_alpha=comm.get("alpha"), link_bandwidth=comm.get("link_bandwidth"),
                    activation_bytes=PRECISION_BYTES[dtype], precision=dtype, lm_head_vocab_parallel=False,
                    memory_capacity=None, cores_shared_by_ranks=calibration["cores"],
                    sources=("measured on this machine by reffuse.speed.costmodel.calibrate_cpu",), calibration=calibration)


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


# ---------------------------------------------------------------------------------------------------------------
# The model itself


def allreduce_seconds(hw: Hardware, tp: int, nbytes: float) -> float:
    """Ring all-reduce of nbytes over tp devices: 2 (N-1) steps, each alpha plus nbytes/N over the link."""
    if tp == 1:
        return 0.0
    if hw.allreduce_alpha is None or hw.link_bandwidth is None:
        raise ReffuseError(f"{hw.name} has no all-reduce calibration (MPI was not measured), so TP={tp} cannot be "
                           "predicted: install the `mpi` extra so that calibration can time `mpiexec -n 2`")
    return 2 * (tp - 1) * hw.allreduce_alpha + 2 * (tp - 1) / tp * nbytes / hw.link_bandwidth


def allgather_seconds(hw: Hardware, tp: int, nbytes: float) -> float:
    """Ring all-gather of nbytes in total (nbytes/N from each device): N-1 steps."""
    if tp == 1:
        return 0.0
    return (tp - 1) * hw.allreduce_alpha + (tp - 1) / tp * nbytes / hw.link_bandwidth


@dataclass
class Cost:
    """Seconds and work of one forward pass on one device, by where the time goes."""
    roofline: float = 0.0       # Σ over sub-blocks of max(FLOPs / peak, bytes / bandwidth)
    overhead: float = 0.0       # kernels × kernel_overhead
    allreduce: float = 0.0      # all-reduces (and the LM head's all-gather), alpha-beta
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    allreduces: int = 0
    memory_bound_seconds: float = 0.0   # the part of `roofline` where bytes, not FLOPs, set the time
    weight_bytes: float = 0.0           # weights one device holds (for the memory-capacity check)
    parts: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.roofline + self.overhead + self.allreduce


def _add(cost: Cost, hw: Hardware, part: str, flops: float, nbytes: float, kernels: int) -> None:
    """One sub-block: roofline time plus kernel overhead."""
    compute, memory = flops / hw.peak_flops[hw.precision], nbytes / hw.memory_bandwidth
    seconds = max(compute, memory) + kernels * hw.kernel_overhead
    cost.roofline += max(compute, memory)
    cost.memory_bound_seconds += memory if memory >= compute else 0.0
    cost.overhead += kernels * hw.kernel_overhead
    cost.flops += flops
    cost.bytes += nbytes
    cost.kernels += kernels
    cost.parts[part] = cost.parts.get(part, 0.0) + seconds


def forward_cost(layout: Layout, hw: Hardware, tp: int = 1, tokens: int = 1, context: float = 0,
                 batch: int = 1, threads: int | None = None) -> Cost:
    """Predicted cost on one device of one forward pass of `tokens` new tokens for each of `batch` sequences,
    after `context` cached positions, at tensor-parallel degree tp. Decode is tokens=1.
    threads: BLAS threads per rank, where ranks share a CPU (see Hardware.for_ranks)."""
    check_tensor_parallel(layout, tp)
    if tokens < 1 or batch < 1 or context < 0:
        raise ReffuseError(f"tokens ({tokens}) and batch ({batch}) must be >= 1 and context ({context}) >= 0")
    hw = hw.for_ranks(tp, threads)
    wb, ab = hw.weight_bytes, hw.activation_bytes
    rows = tokens * batch                                           # rows of every activation matrix [rows, d]
    d, hd = layout.dim, layout.head_dim
    q_heads = layout.n_heads // tp
    kv_heads = layout.n_kv_heads // tp if layout.n_kv_heads >= tp else 1   # replicated when N > kv heads
    attention_weights = d * hd * (2 * q_heads + 2 * kv_heads)       # q, o [d, H/N·hd]; k, v [d, Hkv/N·hd]
    keys = context + (tokens + 1) / 2                               # mean keys a causal query reads
    cost = Cost()
    activation_bytes = rows * d * ab                                # one all-reduce sums [rows, d]
    for block in layout.blocks:
        if block.attention:
            kv_read = batch * 2 * kv_heads * hd * (context + tokens) * ab
            flops = 2 * attention_weights * rows + batch * tokens * 2 * 2 * q_heads * hd * keys
            _add(cost, hw, "attention", flops, attention_weights * wb + kv_read, hw.kernels["attention"])
            cost.weight_bytes += attention_weights * wb
        if block.ffn_width:
            ffn_weights = 3 * d * block.ffn_width // tp                # gate, up [w/N, d]; down [d, w/N]
            _add(cost, hw, "ffn", 2 * ffn_weights * rows, ffn_weights * wb, hw.kernels["ffn"])
            cost.weight_bytes += ffn_weights * wb
    head_weights = layout.vocab_size * d // (tp if hw.lm_head_vocab_parallel else 1)
    _add(cost, hw, "lm_head", 2 * head_weights * rows, head_weights * wb + rows * d * ab, hw.kernels["forward"])
    cost.weight_bytes += head_weights * wb * (1 if layout.tie_embeddings else 2)  # + the embedding table
    cost.allreduces = allreduce_count(layout, tp)
    cost.allreduce = cost.allreduces * allreduce_seconds(hw, tp, activation_bytes)
    collectives = cost.allreduces
    if hw.lm_head_vocab_parallel and tp > 1:                        # gather the logits [rows, vocab]
        cost.allreduce += allgather_seconds(hw, tp, rows * layout.vocab_size * ab)
        collectives += 1
    cost.kernels += collectives                                     # each collective is a kernel launch too
    cost.overhead += collectives * hw.kernel_overhead
    cost.parts["allreduce"] = cost.allreduce + collectives * hw.kernel_overhead
    return cost


def cost_summary(cost: Cost, hw: Hardware, tp: int, batch: int = 1, tokens: int = 1) -> dict:
    """A JSON-ready account of one prediction."""
    fits = None if hw.memory_capacity is None else bool(cost.weight_bytes <= hw.memory_capacity)
    return {"tp": tp, "seconds": cost.seconds, "tokens_per_second": batch * tokens / cost.seconds,
            "roofline_seconds": cost.roofline, "memory_bound_seconds": cost.memory_bound_seconds,
            "kernel_overhead_seconds": cost.overhead, "allreduce_seconds": cost.allreduce,
            "allreduce_count": cost.allreduces, "kernels": cost.kernels, "flops_per_device": cost.flops,
            "bytes_per_device": cost.bytes, "weight_bytes_per_device": cost.weight_bytes,
            "fits_in_memory": fits, "seconds_by_part": cost.parts}


def decode_projection(layout: Layout, hw: Hardware, degrees=range(1, 9), context: int = 1024,
                      batch: int = 1) -> dict:
    """Single-user decode at every workable TP degree in `degrees`, sequential vs fused (when the layout has
    fusion groups; otherwise the two are the same model)."""
    fused = fuse_layout(layout) if layout.fusion_groups else layout
    rows, skipped = [], {}
    for tp in degrees:
        problems = sharding_problems(layout, tp) or sharding_problems(fused, tp)
        if tp > 1 and hw.allreduce_alpha is None:
            problems = [f"{hw.name} has no all-reduce calibration (MPI was not measured)"]
        if problems:
            skipped[str(tp)] = "; ".join(problems)
            continue
        seq = cost_summary(forward_cost(layout, hw, tp, 1, context, batch), hw, tp, batch)
        fus = cost_summary(forward_cost(fused, hw, tp, 1, context, batch), hw, tp, batch)
        rows.append({"tp": tp, "sequential": seq, "fused": fus,
                     "fusion_speedup": seq["seconds"] / fus["seconds"]})
    return {"model": layout.name, "parameters": parameter_count(layout), "blocks": len(layout.blocks),
            "fused_blocks": len(fused.blocks), "fusion_groups": [list(g) for g in layout.fusion_groups],
            "context": context, "batch": batch, "rows": rows, "skipped_tp": skipped}


# ---------------------------------------------------------------------------------------------------------------
# The paper's Table 2 (PAPER.md §4.1): single-user decode, TP8, one 8×H100 node, tokens/s


PAPER_TABLE2 = {"llama-3.1-405b": 41.44, "ultra-253b-prefusion": 63.38, "ultra-253b-fused": 70.92}
PAPER_TP = 8

LEFT_OUT = (
    "What the model leaves out. It is a roofline with fixed per-kernel and per-step costs, so it is an optimistic "
    "bound where the real system loses bandwidth: HBM is commonly measured at 80-90% of its 3.35 TB/s, not 100%, "
    "and NVLink all-reduces run below peak bus bandwidth with latencies that depend on the algorithm (ring, tree, "
    "one-shot, NVLink SHARP), not on one alpha. It knows nothing of kernel fusion beyond the fixed counts (an "
    "engine that fuses the residual add and RMSNorm into the all-reduce, or SwiGLU into the GEMM, pays fewer "
    "launches), of overlap between communication and computation (none is assumed, though engines overlap some), "
    "of wave quantization except through the one fixed overhead per kernel (a narrow FFN slice fills an H100 worse "
    "than a wide one, which favours fusion more than the model credits), of FP8 scaling and dequantization work, "
    "of host-side scheduling, sampling and detokenization, or of CUDA-graph replay. Speculative decoding is "
    "absent: the paper's 202 tokens/s on H200 uses a draft model; Table 2 does not, and neither does this. The "
    "context is fixed (KV reads are small at batch 1 and this length), and memory capacity is only flagged, not "
    "enforced: at TP below 8, Llama-405B in FP8 does not fit 80 GB per GPU. Finally, the 253B layouts are "
    "reconstructions (the per-layer widths inside each fused group are assumed), though only their sums matter here.")


def paper_comparison(hw: Hardware | None = None, context: int = 1024) -> dict:
    """Projected Llama-405B -> 253B PreFusion -> fused at TP8 beside the paper's 41.44 / 63.38 / 70.92 tokens/s.

    FP8 weights by default: the paper's accuracy-vs-latency frontier is measured in FP8 on one 8×H100 node at
    TP8 (PAPER.md §4.1), and Table 2 is read here as the same setting; BF16 is in paper_sensitivity."""
    hw = hw or h100_sxm("fp8")
    rows = []
    for name, measured in PAPER_TABLE2.items():
        layout = MODEL_PRESETS[name]()
        summary = cost_summary(forward_cost(layout, hw, PAPER_TP, 1, context), hw, PAPER_TP)
        rows.append({"model": name, "parameters": parameter_count(layout), "paper_tokens_per_second": measured,
                     **summary})
    base = rows[0]
    for row in rows:
        row["projected_speedup"] = row["tokens_per_second"] / base["tokens_per_second"]
        row["paper_speedup"] = row["paper_tokens_per_second"] / base["paper_tokens_per_second"]
        row["paper_over_projected"] = row["paper_tokens_per_second"] / row["tokens_per_second"]
    fusion_alone = {"projected": rows[2]["tokens_per_second"] / rows[1]["tokens_per_second"],
                    "paper": PAPER_TABLE2["ultra-253b-fused"] / PAPER_TABLE2["ultra-253b-prefusion"]}
    return {"tp": PAPER_TP, "hardware": hw.name, "precision": hw.precision, "context": context, "batch": 1,
            "rows": rows, "fusion_alone": fusion_alone, "left_out": LEFT_OUT}



def paper_sensitivity(context: int = 1024) -> list[dict]:
    """How the projected ratios move when one chosen number moves: the ratios, not the absolute tokens/s,
    are what the model can be trusted with, so show how much they depend on each choice."""
    base = h100_sxm("fp8")
    variants = [("as chosen (FP8, overhead 3 us, alpha 0.7 us)", base),
                ("BF16 weights", base.with_precision("bf16")),
                ("kernel overhead 1.5 us", dataclasses.replace(base, kernel_overhead=1.5e-6)),
                ("kernel overhead 6 us", dataclasses.replace(base, kernel_overhead=6e-6)),
                ("alpha 0.35 us per step", dataclasses.replace(base, allreduce_alpha=0.35e-6)),
                ("alpha 1.4 us per step", dataclasses.replace(base, allreduce_alpha=1.4e-6)),
                ("HBM at 80% of 3.35 TB/s", dataclasses.replace(base, memory_bandwidth=0.8 * 3.35e12))]
    rows = []
    for label, hw in variants:
        tps = [1 / forward_cost(MODEL_PRESETS[name](), hw, PAPER_TP, 1, context).seconds
               for name in PAPER_TABLE2]
        rows.append({"variant": label, "tokens_per_second": tps, "prefusion_speedup": tps[1] / tps[0],
                     "fused_speedup": tps[2] / tps[0], "fusion_alone": tps[2] / tps[1]})
    return rows

# ---------------------------------------------------------------------------------------------------------------
# Predictions for `reffuse tp` runs on this machine, beside what they measured


def tp_run_layout(result: dict) -> Layout:
    """The layout a `reffuse tp --json` result ran: its model, attention removed where it says, its groups."""
    name = result["model"].lower()
    preset = "tiny" if name.startswith("tiny") else "smollm2" if "smollm2" in name else None
    if preset is None:
        raise ReffuseError(f"cannot tell which model the tp result ran ({result['model']!r}): the cost model knows "
                           "the tp results of tiny and smollm2")
    layout = MODEL_PRESETS[preset]()
    removed = set(result.get("attention_removed") or ())
    blocks = tuple(BlockLayout(b.attention and i not in removed, b.ffn_width, b.fused_from)
                   for i, b in enumerate(layout.blocks))
    layout = dataclasses.replace(layout, blocks=blocks, fusion_groups=())
    return dataclasses.replace(layout, fusion_groups=tuple(check_groups(layout, result["groups"])))


def predict_tp_run(result: dict, hw: Hardware) -> list[dict]:
    """One row per (sequential | fused) × (prefill | decode) of a `reffuse tp --json` result: measured beside
    predicted seconds per forward, all-reduce seconds and count. Decode is predicted at the mean context of
    its steps (the prefill length plus half the decode steps)."""
    layout = tp_run_layout(result)
    ranks, threads = result["ranks"], result.get("blas_threads_per_rank")
    tokens, steps = result["tokens"], result.get("decode_tokens", 0)
    rows = []
    for variant, shapes in (("sequential", layout), ("fused", fuse_layout(layout))):
        record = result[variant]
        phases = [("prefill", record, tokens, 0)]
        if record.get("decode"):
            phases.append(("decode", record["decode"], 1, tokens + (steps - 1) / 2))
        for phase, measured, new_tokens, context in phases:
            cost = forward_cost(shapes, hw, ranks, new_tokens, context, threads=threads)
            rows.append({"model": layout.name, "ranks": ranks, "variant": variant, "phase": phase,
                         "tokens": new_tokens, "context": context, "load_average": result.get("load_average_1min"),
                         "measured_seconds": measured["seconds"], "predicted_seconds": cost.seconds,
                         "measured_allreduce_seconds": measured["allreduce_seconds"],
                         "predicted_allreduce_seconds": cost.parts["allreduce"],
                         "measured_allreduce_count": measured["allreduce_count"],
                         "predicted_allreduce_count": cost.allreduces,
                         "measured_over_predicted": measured["seconds"] / cost.seconds,
                         # the rest of the forward: computation and per-call overheads
                         "measured_compute_seconds": measured["seconds"] - measured["allreduce_seconds"],
                         "predicted_compute_seconds": cost.seconds - cost.parts["allreduce"]})
    return rows
