"""Lecture 06, graded: the ring all-reduce step by step against reffuse.tp.ring.ring_allreduce, run on N ranks
that are threads, recording what every rank holds after every step; and, on SmolLM2, your ring summing the
row-parallel partial outputs of its FFN sharded by reffuse.tp (the sum of the unsharded FFN)."""

import queue
import threading

import numpy as np
import pytest

from grading import check
from reffuse.core.model import rms_norm, swiglu
from reffuse.tp import ring_allreduce
from reffuse.tp.sharding import shard_ffn

PHASES = ("reduce-scatter", "all-gather")
HANG_GUARD_SECONDS = 600  # a hang guard only: a rank waits milliseconds for its neighbour, a loaded machine more


class RecordingComm:
    """The part of an mpi4py communicator that ring_allreduce uses, for ranks that are threads; it records the
    rank's buffer before every exchange, that is after every step but the last."""

    def __init__(self, rank, size, mailboxes, buffer):
        self.rank, self.size, self.mailboxes, self.buffer = rank, size, mailboxes, buffer
        self.states = []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Sendrecv(self, sendbuf, dest, recvbuf, source):
        self.states.append(self.buffer.copy())
        self.mailboxes[self.rank, dest].put(np.array(sendbuf))   # unbounded queues: put never blocks
        recvbuf[...] = self.mailboxes[source, self.rank].get(timeout=HANG_GUARD_SECONDS)


def reffuse_ring(buffers):
    """reffuse's ring all-reduce of `buffers` (one per rank, copied): for each rank, its buffer at the start and
    after each of the 2(N-1) steps."""
    n = len(buffers)
    mailboxes = {(a, b): queue.Queue() for a in range(n) for b in range(n)}
    comms = [RecordingComm(r, n, mailboxes, b.copy()) for r, b in enumerate(buffers)]
    threads = [threading.Thread(target=ring_allreduce, args=(c, c.buffer)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_GUARD_SECONDS)
    return [c.states + [c.buffer] for c in comms]


def student_ring(graded, buffers, what, expected=None):
    """The student's ring_step, 2(N-1) times; each step's buffers checked against `expected` (reffuse_ring's)."""
    n = len(buffers)
    steps = [(phase, step) for phase in PHASES for step in range(n - 1)]
    for number, (phase, step) in enumerate(steps, start=1):
        after = graded.ring_step([b.copy() for b in buffers], phase, step)
        if not isinstance(after, (list, tuple)) or len(after) != n:
            pytest.fail(f"ring_step(buffers, {phase!r}, {step}) with N={n}: returned "
                        f"{type(after).__name__}; expected a list of the {n} ranks' buffers", pytrace=False)
        if expected is not None:
            for rank in range(n):
                check(f"{what}: ring_step(buffers, {phase!r}, {step}), rank {rank}'s buffer", after[rank],
                      expected[rank][number], rtol=0)
        buffers = after
    return buffers


@pytest.mark.parametrize("n_ranks, size", [(2, 6), (3, 10), (4, 4), (5, 13)])
def test_ring_step(graded, rng, n_ranks, size):
    """Integer-valued float64 contributions: every partial sum is exact, so a right ring matches bit for bit."""
    buffers = [rng.integers(-9, 10, size).astype(np.float64) for _ in range(n_ranks)]
    what = f"N={n_ranks} ranks, {size} elements"
    expected = reffuse_ring(buffers)
    final = student_ring(graded, buffers, what, expected)
    for rank in range(n_ranks):
        check(f"{what}: rank {rank}'s buffer after the all-reduce, against the sum", final[rank], sum(buffers),
              rtol=0)


@pytest.mark.slow
def test_ring_sums_smollm2_ffn_shards(graded, smollm2_part, rng):
    """SmolLM2's FFN 0 over 3 ranks, row-parallel: your ring's sum of the partial outputs, against reffuse's ring
    (bit for bit: the same additions in the same order) and the unsharded FFN (to rounding: RTOL)."""
    part = smollm2_part(0, 1, rng.integers(0, 49152, 4))
    ffn, x = part.blocks[0].ffn, part.embed
    u = rms_norm(x, ffn.norm_gain, part.config.norm_eps)
    partials = [swiglu(shard_ffn(ffn, rank, 3), u).reshape(-1) for rank in range(3)]   # [4·d] each
    ours = student_ring(graded, partials, "SmolLM2's FFN 0 on 3 ranks")
    theirs = reffuse_ring(partials)
    for rank in range(3):
        check(f"SmolLM2's FFN 0 on 3 ranks: rank {rank}'s sum, against reffuse's ring", ours[rank],
              theirs[rank][-1], rtol=0)
        check(f"SmolLM2's FFN 0 on 3 ranks: rank {rank}'s sum, against the unsharded FFN",
              ours[rank].reshape(x.shape), swiglu(ffn, u))
