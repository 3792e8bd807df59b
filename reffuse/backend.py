"""The array backend: NumPy on the CPU, CuPy on a GPU.

Numeric code never branches on array type: it asks `array_module(x)` for the module that owns `x` and calls
that (`xp.exp`, `xp.concatenate`, ...). Moving a model between devices is `reffuse.to_device(model, "gpu")`.
"""

import numpy as np

from .errors import ReffuseError

try:  # CuPy is the optional `gpu` extra; importing it works without a GPU, creating arrays does not.
    import cupy as _cupy
except ImportError:
    _cupy = None


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device is usable (not merely when CuPy imports)."""
    if _cupy is None:
        return False
    try:
        return bool(_cupy.cuda.is_available())
    except Exception:  # a broken driver install raises instead of answering False
        return False


def array_module(x):
    """numpy or cupy, whichever owns `x`."""
    if _cupy is not None:
        return _cupy.get_array_module(x)
    return np


def device_of(x) -> str:
    """"cpu" or "gpu:N" for an array."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return f"gpu:{x.device.id}"
    return "cpu"


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of an array from either backend."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x, device: str):
    """Move one array to "cpu" or "gpu" (or "gpu:N")."""
    if device == "cpu":
        return to_numpy(x)
    if device.startswith("gpu"):
        if not gpu_available():
            raise ReffuseError(f"device {device!r} requested but no GPU is usable: install the `gpu` extra "
                               "(cupy-cuda12x or cupy-cuda13x) on a machine with a CUDA device, or use device 'cpu'")
        index = int(device.split(":")[1]) if ":" in device else _cupy.cuda.runtime.getDevice()
        with _cupy.cuda.Device(index):
            return _cupy.asarray(x)
    raise ReffuseError(f"unknown device {device!r}: use 'cpu', 'gpu' or 'gpu:N'")


def synchronize(x) -> None:
    """Wait for queued GPU work on `x`'s device (a no-op on the CPU); call before timing or before MPI reads a buffer."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        with x.device:
            _cupy.cuda.get_current_stream().synchronize()
