"""A job that can neither hang nor lie: every rank waits a bounded time at each collective, and all ranks check
that they run the same job before the first one.

MPI's blocking collectives wait for every rank forever: a rank that is stopped (SIGSTOP, a stuck device) or
that was started with other arguments (so that it calls other collectives) leaves the others spinning. Here
each collective is started non-blocking and waited on with a deadline (`--timeout`). While it waits, a rank
answers the others' questions; a rank that reaches the deadline asks every other, on a communicator of its own,
which collective it is waiting at. Those that do not answer within a grace period are in no collective at all
(stopped, stuck) and are named as the ones that did not arrive, and the job is ended. (The setup's broadcast,
while one rank per machine fetches or converts the model, has no bound: a first download may take long.)

`abort_job` ends the job for good: with some MPI builds (MPICH from the package registry among them) Abort
returns to the caller, so the process then exits by itself, before it can reach another collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from reffuse.errors import ReffuseError

DEFAULT_TIMEOUT_SECONDS = 120.0  # how long a rank waits at one collective (a forward step takes far less)
GRACE_SECONDS = 3.0              # how long a waiting rank waits for the others' answers before naming them
SPIN_SECONDS = 0.01              # poll without sleeping this long first: short waits keep their latency
QUERY_TAG, ANSWER_TAG = 7001, 7002  # on the watchdog's own communicator

# The launcher forwards each rank's stderr through a pipe; Abort kills the job at once and what is still in
# the pipe is lost. Half a second lets the failing rank's message reach the terminal first.
ABORT_GRACE_SECONDS = 0.5


def abort_job(comm, status: int = 1) -> None:
    """End every rank of the job; never returns (MPI builds whose Abort returns exit here)."""
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_SECONDS)
    try:
        comm.Abort(status)
    finally:
        os._exit(status)


class Watchdog:
    """Waits on MPI requests with a deadline; names the ranks that did not arrive when it passes."""

    def __init__(self, comm, timeout: float = DEFAULT_TIMEOUT_SECONDS, program: str = "reffuse tp"):
        if not timeout > 0:
            raise ReffuseError(f"--timeout must be a number of seconds > 0, got {timeout}")
        self.comm, self.timeout, self.program = comm, float(timeout), program
        self.watch = comm.Dup()   # the answers travel apart from the job's own messages
        self.count = 0            # collectives this rank has entered

    def wait(self, requests, what: str) -> None:
        """Wait for all `requests`, answering other ranks' questions meanwhile; past the deadline, find who is
        missing and end the job."""
        from mpi4py import MPI

        self.count += 1
        start = time.monotonic()
        while not MPI.Request.Testall(requests):
            waited = time.monotonic() - start
            if waited > SPIN_SECONDS:
                self._answer()
                time.sleep(0.0005)
            if waited > self.timeout:
                self._missing(what)

    def _answer(self) -> None:
        """Tell every rank that asked which collective this rank is waiting at."""
        from mpi4py import MPI

        status = MPI.Status()
        while self.watch.Iprobe(source=MPI.ANY_SOURCE, tag=QUERY_TAG, status=status):
            asker = status.Get_source()
            self.watch.Recv([np.empty(1, dtype=np.int64), MPI.INT64_T], source=asker, tag=QUERY_TAG)
            self.watch.Send([np.array([self.count], dtype=np.int64), MPI.INT64_T], dest=asker, tag=ANSWER_TAG)

    def _missing(self, what: str) -> None:
        """Ask every other rank where it waits; those that do not answer within GRACE_SECONDS are not in a
        collective at all (stopped, stuck, or busy far longer than the timeout)."""
        from mpi4py import MPI

        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        others = [r for r in range(size) if r != rank]
        question = np.array([self.count], dtype=np.int64)
        theirs = np.full(size, -1, dtype=np.int64)
        self._asked = [self.watch.Isend([question, MPI.INT64_T], dest=r, tag=QUERY_TAG) for r in others]  # kept alive
        answers = {r: self.watch.Irecv([theirs[r:r + 1], MPI.INT64_T], source=r, tag=ANSWER_TAG) for r in others}
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and not all(request.Test() for request in answers.values()):
            self._answer()  # the others may be asking this rank at the same moment
            time.sleep(0.01)
        theirs[rank] = self.count
        waiting = [r for r in range(size) if theirs[r] == self.count]
        absent = [r for r in range(size) if theirs[r] < 0]
        elsewhere = [r for r in range(size) if theirs[r] >= 0 and theirs[r] != self.count]
        if rank == min(waiting):  # one message for the job
            parts = []
            if absent:
                parts.append(f"rank{'s' if len(absent) > 1 else ''} {', '.join(map(str, absent))} did not arrive "
                             "(stopped, stuck, or far slower than the others)")
            if elsewhere:
                parts.append(f"rank{'s' if len(elsewhere) > 1 else ''} {', '.join(map(str, elsewhere))} "
                             "waited at another collective (the ranks run different programs)")
            sys.stderr.write(f"{self.program}: ranks {', '.join(map(str, waiting))} of {size} waited "
                             f"{self.timeout:g} s at {what} (collective {self.count}); {'; '.join(parts)}: ending "
                             "the job (raise --timeout if the ranks are only slow)\n")
        abort_job(self.comm)

    # the collectives reffuse uses, each waited on with the deadline

    def allreduce(self, buf, what: str = "an all-reduce"):
        from mpi4py import MPI

        self.wait([self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)], what)
        return buf

    def exchange(self, send, dest: int, recv, source: int, what: str = "a ring step") -> None:
        """Send `send` to `dest` and receive `recv` from `source` (MPI's Sendrecv, with the deadline)."""
        self.wait([self.comm.Irecv(recv, source=source), self.comm.Isend(send, dest=dest)], what)

    def barrier(self, what: str = "a barrier") -> None:
        self.wait([self.comm.Ibarrier()], what)


def job_digest(description) -> str:
    """sha256 of a JSON-ready description (arguments, model configuration and weights' checksum)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def check_same_job(comm, description: dict, watchdog: Watchdog, what: str = "arguments") -> None:
    """Refuse, on every rank at once, a job whose ranks were started differently: the digests of every rank's
    `description` are compared, and the keys that differ are named with each rank's value."""
    from mpi4py import MPI

    size = comm.Get_size()
    digest = np.frombuffer(bytes.fromhex(job_digest(description)), dtype=np.uint8).copy()
    digests = np.empty((size, digest.size), dtype=np.uint8)
    watchdog.wait([comm.Iallgather([digest, MPI.UINT8_T], [digests, MPI.UINT8_T])], f"the check of the {what}")
    if (digests == digests[0]).all():
        return
    text = np.frombuffer(json.dumps(description, sort_keys=True, default=str).encode(), dtype=np.uint8).copy()
    lengths = np.empty(size, dtype=np.int64)
    watchdog.wait([comm.Iallgather([np.array([text.size]), MPI.INT64_T], [lengths, MPI.INT64_T])],
                  f"the check of the {what}")
    texts = np.empty(int(lengths.sum()), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    watchdog.wait([comm.Iallgatherv([text, MPI.UINT8_T], [texts, (lengths, offsets), MPI.UINT8_T])],
                  f"the check of the {what}")
    described = [json.loads(bytes(texts[o:o + n]).decode()) for o, n in zip(offsets, lengths)]
    keys = sorted({k for d in described for k in d if len({json.dumps(d.get(k), sort_keys=True)
                                                           for d in described}) > 1})
    details = []
    for key in keys[:3]:
        values = {}
        for r, d in enumerate(described):
            values.setdefault(json.dumps(d.get(key), sort_keys=True), []).append(r)
        details.append(f"{key} is " + " but ".join(f"{value} on rank{'s' if len(ranks) > 1 else ''} "
                                                  f"{', '.join(map(str, ranks))}" for value, ranks in values.items()))
    raise ReffuseError(f"the ranks were started with different {what}: {'; '.join(details)}: start every rank "
                       "with the same command")
