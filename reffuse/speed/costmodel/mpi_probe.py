"""Run under `mpiexec -n 2` with one BLAS thread per rank: MPI's Allreduce of a small and a 1 MiB float32 buffer,
each call timed on its own, keeping the 10th percentile (on a shared machine a call now and then waits for the
other rank to be scheduled; that wait is the machine's load, not the all-reduce); then both ranks at once
stream the calibration's 128 MB GEMV (how the machine's memory bandwidth splits between two ranks).

Run by reffuse.speed.costmodel.calibration.measure_mpi_allreduce as a script; it prints one JSON line on rank 0.
"""
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
