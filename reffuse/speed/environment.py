"""What a speed measurement ran on: the machine, its cores, NumPy's BLAS and the kernels it chose, the load, the GPU.

Every benchmark records this beside its numbers (reffuse bench, bench --train, the GPU run), because a ratio is only
comparable with one measured on the same machine under the same conditions.
"""

from __future__ import annotations

import os
import platform

import numpy as np

from reffuse.core.backend import gpu_module


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def environment(threads: int, device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    env = {"machine": platform.machine(), "processor": processor_name(), "cores": os.cpu_count(),
           "threads": threads, "python": platform.python_version(), "numpy": np.__version__,
           "device": device.split(":")[0], "device_index": int(device.split(":")[1]) if ":" in device else None}
    if device != "cpu":
        cupy = gpu_module()
        index = env["device_index"] or 0
        name = cupy.cuda.runtime.getDeviceProperties(index).get("name", b"?")
        env["gpu"] = {"name": name.decode() if isinstance(name, bytes) else str(name), "cupy": cupy.__version__,
                      "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}
    try:
        from threadpoolctl import threadpool_info
        env["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "threading_layer")}
                       for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        env["blas"] = None
    env["openblas_coretype"] = os.environ.get("OPENBLAS_CORETYPE")  # set: the kernels were chosen, not detected
    env["openblas_l2_size"] = os.environ.get("OPENBLAS_L2_SIZE")    # set: the cache size the kernels assume
    if hasattr(os, "getloadavg"):
        env["load_average_1min_at_start"] = os.getloadavg()[0]
    return env


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


def describe_blas(env: dict) -> str:
    """The BLAS of an environment() record in words, and whether the environment chose its kernels
    (OPENBLAS_CORETYPE) or OpenBLAS detected them for this CPU ("" when threadpoolctl could not tell)."""
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']} kernels)" for b in env.get("blas") or [])
    if not blas or not any(b["internal_api"] == "openblas" for b in env["blas"]):
        return blas
    chosen = [f"{name}={env[key]}" for name, key in (("OPENBLAS_CORETYPE", "openblas_coretype"),
                                                     ("OPENBLAS_L2_SIZE", "openblas_l2_size")) if env.get(key)]
    if env.get("openblas_coretype"):
        return blas + f", chosen by {' '.join(chosen)} in the environment"
    detected = blas + ", detected by OpenBLAS for this CPU"
    return detected + (f" ({' '.join(chosen)} in the environment)" if chosen else "")


def blas_in_use() -> str:
    """The BLAS NumPy's products run on now, in words."""
    return describe_blas(environment(1)) or "unknown (threadpoolctl is not installed)"
