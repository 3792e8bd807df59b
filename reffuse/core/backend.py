"""The array backend: NumPy on the CPU, CuPy on a GPU.

Numeric code never branches on array type: it asks `array_module(x)` for the module that owns `x` and calls
that (`xp.exp`, `xp.concatenate`, ...). Moving a model between devices is `reffuse.to_device(model, "gpu")`.
"""

import functools
import importlib

import numpy as np

from reffuse.errors import ReffuseError


@functools.cache
def _cupy():
    """The cupy module, or None. Imported on first need: CuPy is the optional `gpu` extra and slow to import;
    it imports fine on machines without a GPU, where creating an array then fails."""
    try:
        return importlib.import_module("cupy")
    except ImportError:
        return None


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")  # no import of cupy needed to recognise its arrays


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
