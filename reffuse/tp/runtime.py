"""One rank of a tensor-parallel job: MPI itself, the rank's device, and ending the whole job when a rank fails.

MPI collectives wait for every rank, so a rank that dies with an exception leaves the others blocked in their
next all-reduce forever. `run_or_abort` prevents that hang: the failing rank prints its error (with its rank)
and ends the job (reffuse.tp.watchdog.abort_job), and the MPI launcher then ends every process of the job with
a non-zero status. A rank that stops without an error is the watchdog's to find.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.optional import install_hint
from reffuse.tp.watchdog import abort_job


def mpi():
    """mpi4py's MPI module (importing it initialises MPI), or a ReffuseError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ReffuseError(f"tensor parallelism needs mpi4py and an MPI runtime: {install_hint('mpi')}") from None
    except RuntimeError as e:  # mpi4py is installed but finds no MPI library
        raise ReffuseError(f"mpi4py found no usable MPI library ({e}): {install_hint('mpi')}") from None
    return MPI


@dataclass
class ParallelState:
    """Where this process stands in the job."""
    comm: object        # the mpi4py communicator of the tensor-parallel group
    rank: int           # 0 .. size-1 in comm
    size: int           # N, the tensor-parallel degree
    node: object        # the communicator of the ranks on this machine
    local_rank: int     # rank in `node`
    device: str         # "cpu" or "gpu:I", where this rank's arrays live


def parallel_state(comm, device: str = "cpu") -> ParallelState:
    """This rank's place in `comm`; device "gpu" picks GPU (local rank) % (GPUs on this machine) and makes it current.

    On one machine the local rank is the rank, so rank r uses GPU r % n_gpus. Across machines the local rank
    keeps every machine's ranks on its own GPUs, wherever the launcher placed them.
    """
    MPI = mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks that share this machine's memory
    local_rank = node.Get_rank()
    if device == "gpu":
        from reffuse.core.backend import gpu_available, gpu_module
        if not gpu_available():
            raise ReffuseError(f"--device gpu on rank {comm.Get_rank()}, but no GPU is usable there: install the "
                               "`gpu` extra (CuPy) on a machine with a CUDA device, or use --device cpu")
        cupy = gpu_module()
        index = local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(index).use()
        device = f"gpu:{index}"
    elif device != "cpu":
        raise ReffuseError(f"unknown device {device!r}: use cpu or gpu")
    return ParallelState(comm, comm.Get_rank(), comm.Get_size(), node, local_rank, device)


def rank_zero_first(comm, fn, what: str):
    """fn() on rank 0 of `comm`, then on its other ranks: what rank 0 fetches or caches on first use (a download,
    a converted model folder) is then in place for them, instead of N processes writing it at once.

    If fn fails on rank 0, the other ranks do not try; they raise an error of the same kind (a ReffuseError for
    bad input), so that `setup_on_every_rank` shows rank 0's message.
    """
    MPI = mpi()
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except (Exception, KeyboardInterrupt) as e:
            error = e
    failed = np.array([error is not None, isinstance(error, ReffuseError)], dtype=np.int64)
    comm.Bcast([failed, MPI.INT64_T], root=0)
    if comm.Get_rank() == 0:
        if error is not None:
            raise error
        return result
    if failed[0]:
        kind = ReffuseError if failed[1] else RuntimeError
        raise kind(f"{what} failed on rank 0 of this machine (see its message)")
    return fn()


def report_and_abort(comm, error: BaseException, program: str) -> None:
    """Print `error` with this rank's number to stderr, then end every rank of the job (status 1)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    message = f"{program}: rank {rank} of {size} failed: {type(error).__name__}: {error}\n"
    if not isinstance(error, ReffuseError):  # a bug or a failed library call: show where, then what
        message = "".join(traceback.format_exception(type(error), error, error.__traceback__)) + message
    sys.stderr.write(message)  # one write, so that the message is never cut in the middle
    abort_job(comm)


def run_or_abort(comm, fn, program: str):
    """fn() on this rank; if it raises, report it with the rank number and abort the whole job (never a hang)."""
    try:
        return fn()
    except (Exception, KeyboardInterrupt) as error:
        report_and_abort(comm, error, program)


def setup_on_every_rank(comm, fn, program: str, watchdog=None):
    """fn() on every rank (loading, checking, sharding: work that can fail on some ranks only, and that calls no
    collective after anything that can fail); returns its result.

    If fn raised the same kind of bad-input error (ReffuseError) on every rank, say a dimension that does not
    divide by N, rank 0 raises it (the command prints one line and exits with status 2) and the other ranks exit
    quietly with status 2: one message, not N. If it failed on some ranks only (a file missing on one machine),
    or with any other error, the failing ranks report and abort the job.
    """
    MPI = mpi()
    try:
        result, error = fn(), None
    except (Exception, KeyboardInterrupt) as e:
        result, error = None, e
    failed = np.array([error is not None, isinstance(error, ReffuseError)], dtype=np.int64)
    if watchdog is not None:  # -> [ranks that failed, ranks that failed on bad input]
        watchdog.allreduce(failed, "the end of the setup")
    else:
        comm.Allreduce(MPI.IN_PLACE, failed, op=MPI.SUM)
    if failed[0] == 0:
        return result
    if failed[1] == comm.Get_size():
        if comm.Get_rank() == 0:
            raise error
        raise SystemExit(2)
    if error is not None:
        report_and_abort(comm, error, program)
    if watchdog is not None:  # a rank that did not fail waits here for the failing ones to end the job
        watchdog.barrier("the end of the setup")
    else:
        comm.Barrier()
