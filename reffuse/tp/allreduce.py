"""The all-reduce after each row-parallel layer: MPI's own or the hand-written ring, counted and timed.

`AllReduce(comm, kind)` is the `allreduce` argument of `reffuse.core.model.forward`: the core calls it on each
row-parallel output (o_proj, down_proj, and once per parallel run of FFNs) and adds what it returns to the
residual stream. It sums the partial output over the ranks of `comm` in place, and records in `stats` how many
all-reduces ran, how many bytes they summed and how long they took: the communication, including the wait for
slower ranks, not the GPU work queued before it.

GPU buffers (CuPy): the stream is synchronised before MPI reads the buffer (MPI knows nothing of CUDA streams,
so an unfinished kernel would hand it stale memory). A CUDA-aware MPI then reads device memory directly;
any other MPI gets a copy staged through host memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from reffuse.core.backend import array_module, device_of, synchronize, to_numpy
from reffuse.errors import ReffuseError
from reffuse.tp.ring import ring_allreduce

ALLREDUCE_KINDS = ("mpi", "ring")


@dataclass
class AllReduceStats:
    """What the all-reduces of one forward pass cost; `reset()` before each forward."""
    count: int = 0
    bytes: int = 0          # the size of the summed buffers (not the traffic: a ring sends 2 (N-1)/N of it per rank)
    seconds: float = 0.0

    def reset(self) -> None:
        self.count, self.bytes, self.seconds = 0, 0, 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def mpi_allreduce(comm, buf, watchdog=None):
    """Sum `buf` over the ranks of `comm` in place with MPI's own Allreduce (the buffer API: no pickling);
    with a watchdog, waited on with its deadline."""
    from mpi4py import MPI

    if watchdog is not None:
        return watchdog.allreduce(buf)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


MPICH_GPU_SUPPORT_CUDA = 0  # MPIX_GPU_SUPPORT_CUDA in MPICH's mpi.h


def _mpi_library():
    """The MPI library this process loaded (through mpi4py), opened with ctypes; None where it cannot be found."""
    import ctypes
    import ctypes.util
    import re

    try:
        maps = open("/proc/self/maps").read()  # Linux: the library mpi4py actually loaded
        candidates = sorted(set(re.findall(r"(/\S*lib(?:mpi|mpich)\S*\.so\S*)", maps)))
    except OSError:
        candidates = []
    candidates += [name for name in (ctypes.util.find_library("mpi"),) if name]
    for candidate in candidates:
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None


def cuda_awareness(comm) -> tuple[bool, str]:
    """Whether MPI reads CUDA device memory, and how that was found out. MPI is asked, in this order:
    MPICH's MPIX_GPU_query_support(CUDA), Open MPI's MPIX_Query_cuda_support(), and the MPI 4.1 info key
    `mpi_memory_alloc_kinds` (a "cuda" kind). An MPI that answers none of them counts as not CUDA-aware: staging
    through host memory is slower but always correct."""
    import ctypes

    library = _mpi_library()
    if library is not None and hasattr(library, "MPIX_GPU_query_support"):
        supported = ctypes.c_int(0)
        if library.MPIX_GPU_query_support(MPICH_GPU_SUPPORT_CUDA, ctypes.byref(supported)) == 0:
            return bool(supported.value), "MPIX_GPU_query_support (MPICH)"
    if library is not None and hasattr(library, "MPIX_Query_cuda_support"):
        return bool(library.MPIX_Query_cuda_support()), "MPIX_Query_cuda_support (Open MPI)"
    info = comm.Get_info()
    try:
        kinds = info.Get("mpi_memory_alloc_kinds") or ""
    finally:
        info.Free()
    if kinds:
        return any(kind.strip().startswith("cuda") for kind in kinds.split(",")), "mpi_memory_alloc_kinds"
    return False, "no answer from MPI: host staging"


class AllReduce:
    """A counted, timed all-reduce over `comm`: kind "mpi" (MPI's Allreduce) or "ring" (ring_allreduce).

    cuda_aware: for CuPy buffers, True hands device memory to MPI, False stages through host memory,
    None asks MPI (cuda_awareness). Unused for NumPy buffers.
    watchdog: a reffuse.tp.watchdog.Watchdog, so that no all-reduce waits forever for a rank that stopped.
    """

    def __init__(self, comm, kind: str = "mpi", cuda_aware: bool | None = None, watchdog=None):
        if kind not in ALLREDUCE_KINDS:
            raise ReffuseError(f"all-reduce kind {kind!r} is unknown: use one of {', '.join(ALLREDUCE_KINDS)}")
        self.comm, self.kind = comm, kind
        self.cuda_aware, self.cuda_aware_source = (cuda_awareness(comm) if cuda_aware is None
                                                   else (cuda_aware, "given (--cuda-aware)"))
        self.stats = AllReduceStats()
        self.watchdog = watchdog
        self._sum_in_place = mpi_allreduce if kind == "mpi" else ring_allreduce

    def __call__(self, partial):
        """The sum over ranks of `partial` [T, d] (this rank's share of a row-parallel output); may reuse its memory."""
        xp = array_module(partial)
        buf = xp.ascontiguousarray(partial)  # MPI reads raw memory, so no strided views
        synchronize(buf)                     # the GPU must have finished writing buf before MPI reads it
        start = time.perf_counter()          # from here on: communication, staging, waiting for other ranks
        if device_of(buf) != "cpu" and not self.cuda_aware:
            host = to_numpy(buf)             # staged: device -> host, sum on the host, host -> device
            self._sum_in_place(self.comm, host, self.watchdog)
            buf = xp.asarray(host)
        else:
            self._sum_in_place(self.comm, buf, self.watchdog)
        self.stats.count += 1
        self.stats.bytes += buf.nbytes
        self.stats.seconds += time.perf_counter() - start
        return buf
