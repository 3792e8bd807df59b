"""What a speed measurement ran on: the machine, its cores, NumPy's BLAS and the kernels it chose, the load, the GPU.

Every benchmark records this beside its numbers (reffuse bench, bench --train, the GPU run), because a ratio is only
comparable with one measured on the same machine under the same conditions.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace

import numpy as np

from reffuse.core.backend import gpu_module
from reffuse.records import FlatRecord, present_fields


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class BlasLibrary(FlatRecord):
    """A BLAS library NumPy runs its products on, as threadpoolctl reports it."""
    internal_api: str | None          # "openblas", "mkl", ...
    version: str | None
    architecture: str | None          # the CPU kernels it runs, e.g. "Haswell"
    threading_layer: str | None


@dataclass(frozen=True)
class Gpu(FlatRecord):
    """The GPU a run used, and the CuPy and CUDA runtime it ran with."""
    name: str
    cupy: str
    cuda_runtime: int                 # CUDA's version number, e.g. 12040 for 12.4


@dataclass(frozen=True, kw_only=True)
class Environment:
    """What the numbers were measured on (environment), and the versions of the engines a benchmark compared
    and the load at its end, which the benchmark adds. Parts not known or not measured are None; of those, the
    engines, the GPU and the load averages are absent from the JSON, the rest hold a null."""
    machine: str
    processor: str | None             # the CPU's model name
    cores: int | None
    threads: int                      # the BLAS (and torch) threads the measurements ran on
    python: str
    numpy: str
    device: str                       # "cpu" or "gpu"
    device_index: int | None          # the GPU's index, where one was named
    gpu: Gpu | None = None
    blas: tuple[BlasLibrary, ...] | None   # None: threadpoolctl is not installed
    openblas_coretype: str | None     # set: the kernels were chosen, not detected
    openblas_l2_size: str | None      # set: the cache size the kernels assume
    load_average_1min_at_start: float | None = None
    torch: str | None = None
    transformers: str | None = None
    llama_cpp_python: str | None = None
    load_average_1min_at_end: float | None = None

    def at_end(self) -> Environment:
        """The same with the load average now, at the end of the measurements."""
        if not hasattr(os, "getloadavg"):
            return self
        return replace(self, load_average_1min_at_end=os.getloadavg()[0])

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("processor", "cores", "device_index", "blas",
                                                    "openblas_coretype", "openblas_l2_size"))

    @classmethod
    def from_json(cls, raw: dict) -> Environment:
        gpu, blas = raw.get("gpu"), raw["blas"]
        return cls(machine=raw["machine"], processor=raw["processor"], cores=raw["cores"], threads=raw["threads"],
                   python=raw["python"], numpy=raw["numpy"], device=raw["device"], device_index=raw["device_index"],
                   gpu=None if gpu is None else Gpu.from_json(gpu),
                   blas=None if blas is None else tuple(BlasLibrary.from_json(b) for b in blas),
                   openblas_coretype=raw["openblas_coretype"], openblas_l2_size=raw["openblas_l2_size"],
                   load_average_1min_at_start=raw.get("load_average_1min_at_start"), torch=raw.get("torch"),
                   transformers=raw.get("transformers"), llama_cpp_python=raw.get("llama_cpp_python"),
                   load_average_1min_at_end=raw.get("load_average_1min_at_end"))


def environment(threads: int, device: str = "cpu") -> Environment:
    """What the numbers are measured on, now."""
    index = int(device.split(":")[1]) if ":" in device else None
    gpu = None
    if device != "cpu":
        cupy = gpu_module()
        name = cupy.cuda.runtime.getDeviceProperties(index or 0).get("name", b"?")
        gpu = Gpu(name.decode() if isinstance(name, bytes) else str(name), cupy.__version__,
                  cupy.cuda.runtime.runtimeGetVersion())
    try:
        from threadpoolctl import threadpool_info
        blas = tuple(BlasLibrary(*(i.get(k) for k in ("internal_api", "version", "architecture", "threading_layer")))
                     for i in threadpool_info() if i.get("user_api") == "blas")
    except ImportError:
        blas = None
    return Environment(machine=platform.machine(), processor=processor_name(), cores=os.cpu_count(),
                       threads=threads, python=platform.python_version(), numpy=np.__version__,
                       device=device.split(":")[0], device_index=index, gpu=gpu, blas=blas,
                       openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"),
                       openblas_l2_size=os.environ.get("OPENBLAS_L2_SIZE"),
                       load_average_1min_at_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


def processor_name() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo, where platform.processor() says nothing), None if unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def describe_blas(env: Environment) -> str:
    """The BLAS of an environment in words, and whether the environment chose its kernels (OPENBLAS_CORETYPE) or
    OpenBLAS detected them for this CPU ("" when threadpoolctl could not tell)."""
    libraries = env.blas or ()
    blas = ", ".join(f"{b.internal_api} {b.version} ({b.architecture} kernels)" for b in libraries)
    if not blas or not any(b.internal_api == "openblas" for b in libraries):
        return blas
    chosen = [f"{name}={value}" for name, value in (("OPENBLAS_CORETYPE", env.openblas_coretype),
                                                    ("OPENBLAS_L2_SIZE", env.openblas_l2_size)) if value]
    if env.openblas_coretype:
        return blas + f", chosen by {' '.join(chosen)} in the environment"
    detected = blas + ", detected by OpenBLAS for this CPU"
    return detected + (f" ({' '.join(chosen)} in the environment)" if chosen else "")


def blas_in_use() -> str:
    """The BLAS NumPy's products run on now, in words."""
    return describe_blas(environment(1)) or "unknown (threadpoolctl is not installed)"
