"""Ring all-reduce, written out step by step: a reduce-scatter, then an all-gather, one `Sendrecv` per step.

The N ranks stand in a ring: each sends to the next rank (rank + 1) and receives from the previous one
(rank - 1), both at once. The buffer is cut into N chunks; when N does not divide its size, the chunks differ
by at most one element (chunk c is elements [c·size/N, (c+1)·size/N), rounded down).

Reduce-scatter, N - 1 steps. At step s, rank r sends chunk (r - s) mod N and adds the chunk (r - s - 1) mod N
that it receives into its own copy of that chunk. Each step a chunk travels one rank further and carries one
more rank's contribution, so after N - 1 steps rank r holds the complete sum of chunk (r + 1) mod N.

    N = 3, chunk sums after each step (a, b, c: the contributions of ranks 0, 1, 2)
                 chunk 0     chunk 1     chunk 2
    start   r0:  a           a           a
            r1:  b           b           b
            r2:  c           c           c
    step 0  r0:  a           a           a+c        (r0 received chunk 2 from r2)
            r1:  a+b         b           b          (r1 received chunk 0 from r0)
            r2:  c           b+c         c          (r2 received chunk 1 from r1)
    step 1  r0:  a           a+b+c       a+c        r0 now holds chunk 1 = (0 + 1) mod 3, complete
            r1:  a+b         b           a+b+c      r1 holds chunk 2
            r2:  a+b+c       b+c         c          r2 holds chunk 0

All-gather, N - 1 steps. At step s, rank r sends chunk (r + 1 - s) mod N, which is complete, and overwrites
chunk (r - s) mod N with the complete one it receives. After N - 1 steps every rank holds every sum.

Cost: each rank sends 2 (N - 1) chunks, 2 (N - 1) / N of the buffer, nearly independent of N; that is why
NCCL uses rings for large messages. But it takes 2 (N - 1) steps, each paying the network latency once, so
small messages (a decode step's [1, d] activations) are latency-bound, and libraries switch to trees there.
"""

from __future__ import annotations

from reffuse.core.backend import array_module, synchronize


def ring_allreduce(comm, buf, watchdog=None):
    """Sum `buf` (a C-contiguous array) over the ranks of `comm`, in place, by a ring; returns `buf`.
    With a watchdog (reffuse.tp.watchdog), each step's exchange is waited on with its deadline."""
    n_ranks, rank = comm.Get_size(), comm.Get_rank()
    if n_ranks == 1:
        return buf
    xp = array_module(buf)
    flat = buf.reshape(-1)  # a view: writing into `flat` writes into `buf`
    bounds = [c * flat.size // n_ranks for c in range(n_ranks + 1)]  # chunk c is flat[bounds[c]:bounds[c + 1]]

    def chunk(c):
        c %= n_ranks
        return flat[bounds[c]:bounds[c + 1]]

    right, left = (rank + 1) % n_ranks, (rank - 1) % n_ranks
    exchange = watchdog.exchange if watchdog is not None else \
        lambda send, dest, recv, source: comm.Sendrecv(send, dest=dest, recvbuf=recv, source=source)
    received = xp.empty(bounds[1] - bounds[0] + 1, dtype=buf.dtype)  # room for the largest chunk

    # reduce-scatter: after step s, chunk (r - s - 1) holds the sum of s + 2 ranks' contributions
    for step in range(n_ranks - 1):
        outgoing, incoming = chunk(rank - step), chunk(rank - step - 1)
        synchronize(buf)  # on a GPU, the previous step's addition must be done before MPI reads memory
        exchange(outgoing, right, received[:incoming.size], left)
        incoming += received[:incoming.size]

    # all-gather: pass the complete chunks around the ring, overwriting the partial ones
    for step in range(n_ranks - 1):
        synchronize(buf)
        exchange(chunk(rank + 1 - step), right, chunk(rank - step), left)
    return buf
