"""The array backend: NumPy on the CPU, CuPy on a GPU.

Numeric code never branches on array type: it asks `array_module(x)` for the module that owns `x` and calls
that (`xp.exp`, `xp.concatenate`, ...). Moving a model between devices is `reffuse.to_device(model, "gpu")`.
"""

import functools
import importlib
import os

import numpy as np

from reffuse.errors import ReffuseError

GPU_MODULE_ENV = "REFFUSE_GPU_MODULE"  # another module with CuPy's interface (the tests' strict stand-in)


def gpu_module_name() -> str:
    return os.environ.get(GPU_MODULE_ENV) or "cupy"


@functools.cache
def _gpu_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _cupy():
    """The cupy module (or the module $REFFUSE_GPU_MODULE names), or None. Imported on first need: CuPy is the
    optional `gpu` extra and slow to import; it imports fine on machines without a GPU, where creating an array
    then fails."""
    return _gpu_module(gpu_module_name())


def gpu_module():
    """The CuPy module in use (a ReffuseError if there is none)."""
    module = _cupy()
    if module is None:
        raise ReffuseError(f"no GPU module: install the `gpu` extra (CuPy) on a machine with a CUDA device "
                           f"({gpu_module_name()} is not importable)")
    return module


def _is_cupy(x) -> bool:  # no import of cupy needed to recognise its arrays
    return type(x).__module__.partition(".")[0] == gpu_module_name()


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device is usable (not merely when CuPy imports)."""
    cupy = _cupy()
    if cupy is None:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:  # a broken driver install raises instead of answering False
        return False


def array_module(x):
    """numpy or cupy, whichever owns `x`."""
    return _cupy() if _is_cupy(x) else np


def device_of(x) -> str:
    """"cpu" or "gpu:N" for an array."""
    return f"gpu:{x.device.id}" if _is_cupy(x) else "cpu"


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of an array from either backend."""
    return _cupy().asnumpy(x) if _is_cupy(x) else np.asarray(x)


def to_device(x, device: str):
    """Move one array to "cpu" or "gpu" (or "gpu:N")."""
    if device == "cpu":
        return to_numpy(x)
    if device.startswith("gpu"):
        if not gpu_available():
            raise ReffuseError(f"device {device!r} requested but no GPU is usable: install the `gpu` extra "
                               "(cupy-cuda12x or cupy-cuda13x) on a machine with a CUDA device, or use device 'cpu'")
        cupy = _cupy()
        index = int(device.split(":")[1]) if ":" in device else cupy.cuda.runtime.getDevice()
        with cupy.cuda.Device(index):
            return cupy.asarray(x)
    raise ReffuseError(f"unknown device {device!r}: use 'cpu', 'gpu' or 'gpu:N'")


def synchronize(x) -> None:
    """Wait for queued GPU work on `x`'s device (a no-op on the CPU); call before timing or before MPI reads a buffer."""
    if _is_cupy(x):
        with x.device:
            _cupy().cuda.get_current_stream().synchronize()
