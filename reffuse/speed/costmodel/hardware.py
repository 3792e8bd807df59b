"""Hardware the cost model knows: the H100 from its datasheet, and this machine's CPU from a calibration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from reffuse.errors import ReffuseError
from reffuse.records import present_fields


# bytes per weight in each precision the presets use
PRECISION_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4, "fp64": 8}


# ---------------------------------------------------------------------------------------------------------------
# What a calibration of this machine recorded (reffuse.speed.costmodel.calibration measures it)


@dataclass(frozen=True)
class MpiAllreduce:
    """MPI's Allreduce between 2 ranks of this machine (measure_mpi_allreduce), or why it was not measured: the
    fields after `reason` are None then, and absent from the JSON."""
    available: bool
    reason: str | None = None                   # why it was not measured
    alpha: float | None = None                  # seconds per ring step
    link_bandwidth: float | None = None         # bytes/s (beta)
    ranks: int | None = None
    small_bytes: int | None = None              # the latency probe's message
    small_seconds: float | None = None
    large_bytes: int | None = None              # the bandwidth probe's message
    large_seconds: float | None = None
    gemv_bandwidth_per_rank: float | None = None    # bytes/s each of the ranks streams while both do

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> MpiAllreduce:
        return cls(**raw)


@dataclass(frozen=True)
class Calibration:
    """This machine's figures from calibrate_cpu: each the best of several timings (the machine undisturbed).
    Rates in FLOP/s and bytes/s."""
    cores: int
    load_average: float | None                  # 1-minute load average while measuring; None: not known here
    gemm_flops_1_thread: float
    gemv_bandwidth_1_thread: float
    gemm_flops_all_threads: float
    gemv_bandwidth_all_threads: float
    machine_bandwidth: float                    # the most the machine was seen to stream, by one or two processes
    decode_overhead_seconds: dict[str, float]   # "forward", "attention", "ffn" -> seconds of a decode step's calls
    numpy_call_seconds: float                   # the cost of one NumPy call: the `cpu` kernel overhead
    mpi_allreduce: MpiAllreduce
    dtype: str                                  # the precision measured: "fp32" or "fp64"
    calibration_seconds: float                  # how long the calibration took

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("load_average",))

    @classmethod
    def from_json(cls, raw: dict) -> Calibration:
        return cls(**raw | {"decode_overhead_seconds": dict(raw["decode_overhead_seconds"]),
                            "mpi_allreduce": MpiAllreduce.from_json(raw["mpi_allreduce"])})


# ---------------------------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class HardwareRecord:
    """A Hardware as the report records it (Hardware.describe): the peak FLOP/s of its weights' precision only."""
    name: str
    precision: str
    peak_flops: float                   # FLOP/s in `precision`, dense
    memory_bandwidth: float             # bytes/s
    kernel_overhead: float              # seconds per kernel
    kernels: dict[str, int]             # kernels per "attention" and "ffn" sub-block and per "forward"
    allreduce_alpha: float | None       # seconds per ring step; None: not known on this hardware
    link_bandwidth: float | None        # bytes/s, one direction, per device
    activation_bytes: int
    lm_head_vocab_parallel: bool
    memory_capacity: float | None       # bytes per device; None: not known
    sources: tuple[str, ...]
    calibration: Calibration | None     # the `cpu` hardware's; None for a preset from its datasheet

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("allreduce_alpha", "link_bandwidth", "memory_capacity",
                                                    "calibration"))

    @classmethod
    def from_json(cls, raw: dict) -> HardwareRecord:
        calibration = None if raw["calibration"] is None else Calibration.from_json(raw["calibration"])
        return cls(**raw | {"kernels": dict(raw["kernels"]), "sources": tuple(raw["sources"]),
                            "calibration": calibration})


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
    calibration: Calibration | None = None

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
        one, machine = cal.gemm_flops_1_thread, max(cal.gemm_flops_all_threads, cal.gemm_flops_1_thread)
        flops = min(one * threads, machine)
        bandwidth = min(cal.gemv_bandwidth_1_thread * threads, cal.machine_bandwidth / n_ranks)
        return dataclasses.replace(self, peak_flops={self.precision: flops / share},
                                   memory_bandwidth=bandwidth / share, kernel_overhead=self.kernel_overhead * share,
                                   allreduce_alpha=None if self.allreduce_alpha is None
                                   else self.allreduce_alpha * share)

    def describe(self) -> HardwareRecord:
        return HardwareRecord(self.name, self.precision, self.peak_flops[self.precision], self.memory_bandwidth,
                              self.kernel_overhead, self.kernels, self.allreduce_alpha, self.link_bandwidth,
                              self.activation_bytes, self.lm_head_vocab_parallel, self.memory_capacity,
                              self.sources, self.calibration)


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
                "chosen: kernel overhead 3 us, all-reduce alpha 0.7 us per ring step (see reffuse.speed.costmodel)")


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


def cpu_hardware(calibration: Calibration) -> Hardware:
    """The `cpu` Hardware from a calibration (calibrate_cpu's, or one recorded in a `reffuse costmodel --json`)."""
    comm = calibration.mpi_allreduce
    dtype = calibration.dtype
    return Hardware(name="cpu", peak_flops={dtype: calibration.gemm_flops_all_threads},
                    memory_bandwidth=calibration.gemv_bandwidth_all_threads,
                    kernel_overhead=calibration.numpy_call_seconds, kernels=dict(NUMPY_CALLS),
                    allreduce_alpha=comm.alpha, link_bandwidth=comm.link_bandwidth,
                    activation_bytes=PRECISION_BYTES[dtype], precision=dtype, lm_head_vocab_parallel=False,
                    memory_capacity=None, cores_shared_by_ranks=calibration.cores,
                    sources=("measured on this machine by reffuse.speed.costmodel.calibrate_cpu",),
                    calibration=calibration)
