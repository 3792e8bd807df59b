"""Tensor parallelism with MPI, the Megatron way, for reading and for measuring what FFN Fusion saves.

    shard = shard_model(model, rank, n_ranks)            # sharding.py: column- and row-parallel slices
    allreduce = AllReduce(comm, kind="mpi" | "ring")     # allreduce.py, ring.py: counted, timed collectives
    logits = reffuse.forward(shard, ids, allreduce=allreduce)   # the ordinary forward, one all-reduce per
                                                                # row-parallel output
    allreduce.stats                                      # count, bytes, seconds since the last reset()

runtime.py holds the per-rank plumbing (MPI, GPU per rank, aborting the job when a rank fails);
`mpiexec -n N reffuse tp` (reffuse/commands/tp.py) puts it all together. mpi4py is imported only when used.
"""

from reffuse.tp.allreduce import ALLREDUCE_KINDS, AllReduce, AllReduceStats, cuda_awareness, mpi_allreduce
from reffuse.tp.ring import ring_allreduce
from reffuse.tp.runtime import ParallelState, parallel_state, rank_zero_first, run_or_abort, setup_on_every_rank
from reffuse.tp.sharding import (allreduces_per_forward, check_shardable, column_parallel, kv_heads, query_heads,
                       rank_counts_that_work, row_parallel, shard_model, sharding_problems)

__all__ = ["ALLREDUCE_KINDS", "AllReduce", "AllReduceStats", "ParallelState", "allreduces_per_forward",
           "check_shardable", "column_parallel", "kv_heads", "cuda_awareness", "mpi_allreduce", "parallel_state",
           "query_heads", "rank_counts_that_work", "rank_zero_first", "ring_allreduce", "row_parallel",
           "run_or_abort", "setup_on_every_rank", "shard_model", "sharding_problems"]
