"""Tensor parallelism under a real MPI runtime: the environment's own `mpiexec` launches N ranks from pytest.

Skipped cleanly when mpi4py or its MPI library is unusable. Oversubscription (N = 4 on 2 cores) is fine with
MPICH from pip. Every launch has a timeout, so a hang fails the test instead of stalling the suite.
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

try:
    importlib.import_module("mpi4py.MPI")  # raises RuntimeError, not ImportError, without an MPI library
except Exception as e:
    pytest.skip(f"mpi4py with an MPI runtime is not usable here ({e}): pip install 'reffuse[mpi]'",
                allow_module_level=True)

from reffuse.core.backend import gpu_available
from reffuse.formats.registry import NAMED_MODELS

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.path.exists(MPIEXEC):
    pytest.skip(f"no mpiexec beside {sys.executable}: pip install 'reffuse[mpi]'", allow_module_level=True)

TOLERANCE = 1e-5  # reffuse's parity bound, relative, float32 (measured: ~2e-7 on tiny)
SMALL = ["--prefill-tokens", "16", "--decode-tokens", "2", "--repeats", "1"]


def launch(n_ranks, *args, timeout=600):  # a hang guard: a job takes seconds
    command = [MPIEXEC, "-n", str(n_ranks), sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def reffuse_tp(n_ranks, *args):
    result = launch(n_ranks, "-m", "reffuse", "tp", "--json", *SMALL, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check_parity(report):
    assert report["parity"] and report["max_rel_error"] <= TOLERANCE
    for name in ("sequential", "fused"):
        for errors in ("prefill_errors", "decode_errors"):
            assert report[name][errors]["max_rel_error"] <= TOLERANCE, (name, errors)
        assert report[name]["allreduce_count"] == report[name]["expected_allreduce_count"]
        decode_count = report[name]["decode"]["allreduce_count"]
        assert decode_count == report[name]["allreduce_count"] and isinstance(decode_count, int)


@pytest.mark.parametrize("n_ranks, kind", [(2, "mpi"), (4, "ring")])
def test_tiny_sequential_and_fused_match_one_process(n_ranks, kind):
    report = reffuse_tp(n_ranks, "--model", "tiny", "--groups", "4-8", "--allreduce", kind)
    assert report["ranks"] == n_ranks
    check_parity(report)
    k = 5  # blocks 4..8 fused into one
    assert report["fused"]["allreduce_count"] == report["sequential"]["allreduce_count"] - (k - 1)


def test_plain_reffuse_tp_is_one_rank():
    result = subprocess.run([sys.executable, "-m", "reffuse", "tp", "--model", "tiny", "--json", *SMALL],
                            capture_output=True, text=True, timeout=600)  # a hang guard
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ranks"] == 1 and report["max_abs_error"] == 0.0  # no all-reduce sums anything: identical
    from reffuse.speed.tp_result import TpResult
    typed = TpResult.from_json(report)
    assert typed.unrecorded == () and typed.to_json() == report and list(typed.to_json()) == list(report)


RING_VS_MPI = textwrap.dedent("""
    import numpy as np
    from mpi4py import MPI
    from reffuse.tp import mpi_allreduce, ring_allreduce
    comm = MPI.COMM_WORLD
    for size in (0, 1, 2, 7, 1000):
        mine = np.random.default_rng(comm.rank).standard_normal(size).astype(np.float32)
        expected = sum(np.random.default_rng(r).standard_normal(size).astype(np.float64) for r in range(comm.size))
        ring, mpi = ring_allreduce(comm, mine.copy()), mpi_allreduce(comm, mine.copy())
        assert np.abs(ring - expected).max(initial=0) <= 1e-5 * max(1, np.abs(expected).max(initial=0)), size
        assert np.abs(mpi - expected).max(initial=0) <= 1e-5 * max(1, np.abs(expected).max(initial=0)), size
    print("ok")
""")


def test_ring_and_mpi_allreduce_are_the_sum_under_mpiexec():
    result = launch(3, "-c", RING_VS_MPI)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok") == 3  # one per rank (their lines may interleave)


def test_a_rank_that_raises_ends_the_job_quickly_with_its_rank_named():
    # rank 0 is blocked inside an all-reduce: only MPI_Abort ends it, else launch's hang guard fails the test
    result = launch(2, "-m", "reffuse", "tp", "--model", "tiny", "--fail-on-rank", "1", *SMALL)
    assert result.returncode != 0
    assert "rank 1 of 2 failed" in result.stderr and "simulated failure" in result.stderr


SETUP_FAILS_ON_RANK_1 = textwrap.dedent("""
    from mpi4py import MPI
    from reffuse.tp import setup_on_every_rank
    def load():
        if MPI.COMM_WORLD.rank == 1:
            raise FileNotFoundError("model folder missing on this machine")
        return "loaded"
    setup_on_every_rank(MPI.COMM_WORLD, load, "setup")
    MPI.COMM_WORLD.Barrier()
""")


def test_a_setup_error_on_one_rank_aborts_instead_of_hanging():
    result = launch(2, "-c", SETUP_FAILS_ON_RANK_1)
    assert result.returncode != 0
    assert "rank 1 of 2 failed: FileNotFoundError: model folder missing" in result.stderr


def test_a_rank_count_that_does_not_divide_gives_one_error_line():
    result = launch(3, "-m", "reffuse", "tp", "--model", "tiny", *SMALL)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "4 query heads" in errors[0] and "N that work for this model: 1, 2, 4" in errors[0]


@pytest.mark.skipif("smollm2" not in NAMED_MODELS, reason="the SmolLM2 loader is not part of reffuse here")
def test_smollm2_over_three_ranks_matches_one_process():
    report = reffuse_tp(3, "--model", "smollm2")
    check_parity(report)
    assert report["attention_removed"] == list(range(14, 22))


@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")
def test_gpu_ranks_match_one_process():
    check_parity(reffuse_tp(2, "--model", "tiny", "--device", "gpu"))


def rank_pid(marker: str, rank: int, timeout: float = 600.0) -> int:  # a hang guard
    """The pid of rank `rank` of the job whose processes carry REFFUSE_TEST_JOB=marker in their environment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"REFFUSE_TEST_JOB={marker}".encode() in environ and f"PMI_RANK={rank}".encode() in environ:
                return int(entry)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} of the job found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_stopped_rank_is_named_and_the_job_ends_within_the_watchdogs_time():
    if "smollm2" not in NAMED_MODELS:
        pytest.skip("needs SmolLM2, whose heads divide by 3")
    marker = f"stopped-{os.getpid()}"
    # the watchdog's deadline is far above any wait of ranks that are only slow (a loaded machine's): a rank that
    # did not arrive within it is the stopped one
    command = [MPIEXEC, "-n", "3", sys.executable, "-m", "reffuse", "tp", "--model", "smollm2",
               "--prefill-tokens", "16", "--decode-tokens", "32", "--repeats", "10000", "--timeout", "60"]
    job = subprocess.Popen(command, env=os.environ | {"REFFUSE_TEST_JOB": marker}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    stopped = rank_pid(marker, 1)
    try:
        time.sleep(20)                       # loading and sharding done: the ranks are in their forwards
        os.kill(stopped, 19)                 # SIGSTOP
        # the watchdog ends the job, else this hang guard fails the test; how fast it ends is not judged here
        _, stderr = job.communicate(timeout=600)
    finally:
        job.kill()
        try:
            os.kill(stopped, 9)
        except ProcessLookupError:
            pass
    assert job.returncode != 0
    assert "rank 1 did not arrive" in stderr, stderr[-2000:]
    assert "waited 60 s at" in stderr


def test_ranks_started_with_different_arguments_fail_at_setup_with_one_message():
    one = [sys.executable, "-m", "reffuse", "tp", "--model", "tiny", *SMALL]
    result = subprocess.run([MPIEXEC, "-n", "1", *one, "--groups", "4-8", ":", "-n", "1", *one, "--groups", "4-7"],
                            capture_output=True, text=True, timeout=600)  # a hang guard
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert "the ranks were started with different arguments: groups is [[4, 8]] on rank 0 but [[4, 7]] on rank 1" \
        in errors[0]
    assert "Traceback" not in result.stderr


def test_gpu_ranks_on_the_device_stand_in_match_one_process_through_host_staging():
    support = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
    env = os.environ | {"REFFUSE_GPU_MODULE": "strict_cupy",
                        "PYTHONPATH": os.pathsep.join(filter(None, [support, os.environ.get("PYTHONPATH")]))}
    command = [MPIEXEC, "-n", "2", sys.executable, "-m", "reffuse", "tp", "--model", "tiny", "--groups", "4-8",
               "--device", "gpu", "--json", *SMALL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)  # a hang guard
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    check_parity(report)
    assert report["device"] == "gpu" and report["cuda_aware"] is False
    assert report["allreduce_path"] == "staged through host memory"
    assert report["cuda_aware_source"].startswith("MPIX_GPU_query_support")  # MPICH answered
