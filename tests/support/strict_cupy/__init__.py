"""A strict stand-in for CuPy, for tests on machines without a GPU (never shipped).

reffuse's backend is pointed at it with REFFUSE_GPU_MODULE=strict_cupy. Its arrays are a type of their own backed
by NumPy, and it is stricter than CuPy where CuPy is strict and a bug would hide on a CPU:

- `np.asarray(device_array)` raises TypeError, as CuPy does: a host copy must be asked for (`.get()`,
  `asnumpy`), and each one is counted;
- an operation that mixes a device array with a NumPy array (other than a scalar) raises TypeError;
- results of every operation stay on the "device";
- `cuda.get_current_stream().synchronize()` is counted, and every operation marks the stream busy, so that a
  reader of raw memory (MPI) can check that the stream was synchronised after the last operation (`idle()`).

`stats` counts synchronisations, copies in either direction and device operations; `reset()` zeroes it. A device
operation is what launches work on a GPU: every call that makes an array other than a view (a ufunc, a reduction, a
product, a copy from the host, a fancy index), every item assignment, and one per call of a function compiled by
`fuse`, however many steps it holds. `empty` allocates and launches nothing.

`fuse` runs the decorated Python on NumPy and refuses what cupy.fuse refuses (indexing, keepdims, a second
reduction, writes it would lose or race on). CuPy's ElementwiseKernel and ReductionKernel take CUDA C, which NumPy
cannot run, so the stand-in has neither and reffuse uses neither.
"""

from __future__ import annotations

import threading

import numpy as _np
from numpy.lib.mixins import NDArrayOperatorsMixin

stats = {"synchronize": 0, "to_host": 0, "to_host_bytes": 0, "to_device": 0, "operations": 0}
_state = {"device": 0, "devices": 1}
_stream_state = threading.local()  # each thread (a rank, in the tests) has its own stream


def _busy(value: bool) -> None:
    _stream_state.busy = value


def reset(devices: int = 1) -> None:
    for key in stats:
        stats[key] = 0
    _state.update(device=0, devices=devices)
    _busy(False)


def idle() -> bool:
    """Whether this thread's stream has been synchronised since its last device operation."""
    return not getattr(_stream_state, "busy", False)


def _refuse_host(value):
    raise TypeError(f"a NumPy array ({getattr(value, 'shape', '?')}) was mixed with a device array: copy it to the "
                    "device first (strict_cupy.asarray), as CuPy requires")


def _unwrap(value):
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, _np.ndarray):
        if value.ndim == 0:
            return value
        _refuse_host(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    return value


def _view_or_wrap(base: _np.ndarray, value):
    """A view (slicing, reshape, transpose) launches no kernel on a GPU: it leaves the stream as it is."""
    if isinstance(value, _np.ndarray) and value.base is not None and _np.shares_memory(value, base):
        return ndarray(value)
    return _wrap(value)


def _operation() -> None:
    """One device operation queued on the stream."""
    stats["operations"] += 1
    _busy(True)


def _wrap(value):
    if isinstance(value, _np.ndarray):
        _operation()
        return ndarray(value)
    if isinstance(value, _np.generic):  # CuPy's reductions give 0-d device arrays, not host scalars
        _operation()
        return ndarray(_np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class Device:
    def __init__(self, index: int | None = None):
        self.id = _state["device"] if index is None else int(index)
        if not 0 <= self.id < _state["devices"]:
            raise RuntimeError(f"no CUDA device {self.id} (stand-in with {_state['devices']})")

    def use(self):
        _state["device"] = self.id

    def __enter__(self):
        self._previous = _state["device"]
        self.use()
        return self

    def __exit__(self, *exc):
        _state["device"] = self._previous

    def synchronize(self):
        get_current_stream().synchronize()


class ndarray(NDArrayOperatorsMixin):
    """A device array: NumPy storage, no implicit way back to the host."""

    __array_priority__ = 100

    def __init__(self, array: _np.ndarray):
        self._a = array
        self.device = Device()

    # strictness
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if any(isinstance(i, _FusedValue) for i in inputs + tuple(kwargs.get("out", ()))):
            raise TypeError("a device array was used inside a function given to fuse without being one of its "
                            "arguments: cupy.fuse cannot read it")
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*(_unwrap(i) for i in inputs), **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    # the host, asked for explicitly (each copy counted, with its bytes)
    def _to_host(self):
        stats["to_host"] += 1
        stats["to_host_bytes"] += self._a.nbytes
        return self._a

    def get(self):
        return self._to_host().copy()

    def item(self):
        return self._to_host().item()

    def __float__(self):
        return float(self._to_host())

    def __int__(self):
        return int(self._to_host())

    def __index__(self):
        return self._to_host().__index__()

    def __bool__(self):
        return bool(self._to_host())

    # what an array is
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    real = property(lambda self: _wrap(self._a.real))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __repr__(self):
        return f"strict_cupy.ndarray(shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, index):
        return _view_or_wrap(self._a, self._a[_index(index)])

    def __setitem__(self, index, value):
        if isinstance(value, _np.ndarray) and value.ndim:
            stats["to_device"] += 1  # CuPy copies a host value in: allowed, counted
        else:
            value = _unwrap(value)
        _operation()
        self._a[_index(index)] = value

    def __getattr__(self, name):  # methods: reshape, astype, sum, max, argmax, transpose, copy, ...
        method = getattr(self._a, name)
        if not callable(method):
            raise AttributeError(name)
        return lambda *args, **kwargs: _view_or_wrap(self._a, method(*_unwrap(args),
                                                                     **{k: _unwrap(v) for k, v in kwargs.items()}))


def _index(index):
    if isinstance(index, ndarray):
        return index._a
    if isinstance(index, tuple):
        return tuple(i._a if isinstance(i, ndarray) else i for i in index)
    return index  # CuPy takes NumPy index arrays


# ---------------------------------------------------------------------------------------------------------------
# the module's functions


def asarray(value, dtype=None, order=None):
    if isinstance(value, ndarray):
        return value if dtype is None or value.dtype == dtype else value.astype(dtype)
    stats["to_device"] += 1
    return _wrap(_np.array(value, dtype=dtype, order=order))


array = asarray


def ascontiguousarray(value, dtype=None):
    return _wrap(_np.ascontiguousarray(_unwrap(value), dtype=dtype))


def searchsorted(a, v, side="left", sorter=None):
    if not isinstance(v, ndarray):  # as CuPy: "Only int or ndarray are supported for v"
        raise NotImplementedError("Only int or ndarray are supported for v")
    return _wrap(_np.searchsorted(_unwrap(a), v._a, side=side, sorter=sorter))


def empty(shape, dtype=float):
    """Memory from the pool: no kernel runs, so no operation is counted."""
    return ndarray(_np.empty(shape, dtype))


def asnumpy(value):
    if isinstance(value, ndarray):
        return value.get()
    return _np.asarray(value)


def __getattr__(name):
    """Everything else NumPy has, on device arrays: zeros, concatenate, exp, where, float32, inf, ..."""
    target = getattr(_np, name)
    if callable(target) and not isinstance(target, type):
        return lambda *args, **kwargs: _wrap(target(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))
    return target


class _Linalg:
    def __getattr__(self, name):
        target = getattr(_np.linalg, name)
        return lambda *args, **kwargs: _wrap(target(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))


linalg = _Linalg()


# ---------------------------------------------------------------------------------------------------------------
# fuse: a Python function of elementwise steps (and one reduction) as one kernel


_REDUCTIONS = {_np.sum, _np.max, _np.amax, _np.min, _np.amin}


class _Fusion:
    """One call of a fused function: the broadcast shape of its array arguments, whether it has reduced yet, and
    which arguments it wrote to."""

    def __init__(self, arguments):
        arrays = [a._a for a in arguments if isinstance(a, ndarray)]
        if not arrays:
            raise TypeError("a fused function needs at least one device array among its arguments")
        self.shape = _np.broadcast_shapes(*(a.shape for a in arrays))
        self.reduced = False
        self.written: list[_FusedValue] = []

    def operand(self, value, reduced: bool):
        """The NumPy value of one operand of a step, refused where cupy.fuse refuses it."""
        if isinstance(value, _FusedValue):
            if value._reduced != reduced:
                raise TypeError("cupy.fuse cannot combine values before its reduction with values after it")
            return value._a
        if isinstance(value, (bool, int, float, complex, _np.generic)):
            return value
        raise TypeError(f"cupy.fuse cannot compute with {type(value).__name__} inside a fused function: pass device "
                        "arrays and scalars as its arguments")


class _FusedValue(NDArrayOperatorsMixin):
    """A value inside a function given to `fuse`, allowing what cupy.fuse's variables allow and no more: ufuncs and
    operators elementwise, in-place updates and `[...] =` of an argument, astype, and one reduction (sum, max, min)
    over `axis`, without keepdims, after which only the reduced values may be computed with. No indexing, slicing,
    reshape or `shape`: inside a kernel every value is one element."""

    def __init__(self, array, fusion: _Fusion, reduced: bool = False, argument: bool = False):
        self._a, self._fusion, self._reduced, self._argument = array, fusion, reduced, argument

    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        fusion = self._fusion
        out = kwargs.pop("out", None)
        if method != "__call__" or kwargs:
            raise TypeError(f"cupy.fuse supports ufuncs called elementwise, not {ufunc.__name__}.{method} or {kwargs}")
        reduced = any(isinstance(i, _FusedValue) and i._reduced for i in inputs)
        values = [fusion.operand(i, reduced) for i in inputs]
        if out is None:
            return _FusedValue(getattr(ufunc, method)(*values), fusion, reduced)
        (target,) = out
        if not isinstance(target, _FusedValue) or target._reduced != reduced:
            raise TypeError("cupy.fuse writes in place only into one of its values")
        ufunc(*values, out=target._a)
        if target._argument:
            self._written(target)
        return target

    def _written(self, target):
        if target._a.shape != self._fusion.shape:  # a broadcast argument: several threads would write one element
            raise ValueError(f"cupy.fuse writes into an argument of shape {target._a.shape}, smaller than the "
                             f"kernel's {self._fusion.shape}")
        self._fusion.written.append(target)

    def __array_function__(self, func, types, args, kwargs):
        if func not in _REDUCTIONS:
            raise TypeError(f"cupy.fuse supports elementwise ufuncs and one sum, max or min, not {func.__name__}")
        if set(kwargs) - {"axis"} or len(args) != 1:
            raise TypeError(f"cupy.fuse reduces over `axis` only (no keepdims, dtype or out): {func.__name__} got "
                            f"{sorted(kwargs)}")
        (value,) = args
        if self._fusion.reduced or value._reduced:
            raise NotImplementedError("cupy.fuse makes one reduction per kernel")
        self._fusion.reduced = True
        whole = _np.broadcast_to(value._a, self._fusion.shape)  # the kernel reduces its whole broadcast shape
        return _FusedValue(func(whole, axis=kwargs.get("axis")), self._fusion, reduced=True)

    def __setitem__(self, index, value):
        if index is not Ellipsis and index != slice(None):
            raise ValueError("cupy.fuse assigns only `[...]` or `[:]`")
        self._a[...] = self._fusion.operand(value, self._reduced)
        if self._argument:
            self._written(self)

    def astype(self, dtype):
        return _FusedValue(self._a.astype(dtype), self._fusion, self._reduced)


class _Fused:
    def __init__(self, function, name):
        self.function, self.name = function, name

    def __call__(self, *args):
        fusion = _Fusion(args)
        for a in args:
            if not isinstance(a, (ndarray, bool, int, float, complex, _np.generic, type(None))):
                raise TypeError(f"invalid argument type for fused {self.name!r}: {type(a).__name__}")
        values = [_FusedValue(a._a, fusion, argument=True) if isinstance(a, ndarray) else a for a in args]
        with _np.errstate(all="ignore"):  # a GPU kernel raises no floating-point warnings
            result = self.function(*values)
        if fusion.reduced and fusion.written:
            raise ValueError("cupy.fuse passes arguments to a reduction's elementwise steps by value: what it "
                             "writes into them is lost")
        _operation()

        def returned(value):
            if not isinstance(value, _FusedValue):
                raise TypeError(f"a fused function returns its values, not {type(value).__name__}")
            if value._reduced:
                return ndarray(_np.array(value._a))
            return ndarray(_np.broadcast_to(value._a, fusion.shape).copy())  # the kernel's shape, as CuPy's
        if result is None:
            return None
        return tuple(returned(v) for v in result) if isinstance(result, tuple) else returned(result)


def fuse(*args, kernel_name=None):
    """cupy.fuse: `@fuse` or `@fuse(kernel_name=...)`; each call of the fused function is one device operation."""
    if len(args) == 1 and callable(args[0]):
        return _Fused(args[0], args[0].__name__)
    return lambda function: _Fused(function, kernel_name or function.__name__)


# ---------------------------------------------------------------------------------------------------------------
# cuda


class Stream:
    def synchronize(self):
        stats["synchronize"] += 1
        _busy(False)


_stream = Stream()


def get_current_stream():
    return _stream


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return _state["devices"]

    @staticmethod
    def getDevice():
        return _state["device"]

    @staticmethod
    def getDeviceProperties(index):
        return {"name": b"strict_cupy stand-in (NumPy on the CPU)"}

    @staticmethod
    def runtimeGetVersion():
        return 0


class cuda:  # noqa: N801 (CuPy's name)
    Device = Device
    Stream = Stream
    runtime = _Runtime()
    get_current_stream = staticmethod(get_current_stream)

    @staticmethod
    def is_available():
        return True


__version__ = "0+strict-stand-in"
