"""benchmarks/gpu/run.sh, rehearsed on the CPU against the strict CuPy stand-in, in an environment like the GPU
machine's (mpi4py with no MPI library; the mpich wheel prepared beside it, or not): the script a GPU machine runs
cannot fail there for a reason this run could have shown, and what it returns fits what comes back from there."""

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8        # what a batch GPU machine returns: at most 8 files,
MAX_DEPTH = 2        # at most two folders deep
SECTIONS = {"environment", "parity", "speed", "ffn_run", "training"}


def mpich_wheel(folder: Path) -> Path | None:
    """A wheel of the mpich installed here (as `pip download mpich` gives it: bin/ and lib/ under
    mpich-<version>.data/data/), or None where mpich is not installed."""
    try:
        dist = importlib.metadata.distribution("mpich")
    except importlib.metadata.PackageNotFoundError:
        return None
    prefix, site = Path(sys.prefix).resolve(), Path(dist.locate_file("")).resolve()
    folder.mkdir()
    wheel = folder / f"mpich-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for file in dist.files:  # bin/ and lib/ of the environment; its metadata in site-packages left out
            path = Path(dist.locate_file(file)).resolve()
            if path.is_relative_to(prefix) and not path.is_relative_to(site):
                z.write(path, f"mpich-{dist.version}.data/data/{path.relative_to(prefix).as_posix()}")
    return wheel


def rehearse(out: Path, wheels: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MPI4PY_LIBMPI")}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--rehearse", "--out", str(out),
                           "--wheels", str(wheels), *flags], env=env | {"PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=2400)  # a hang guard above run.sh's limits


def check_returned_files(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, sorted(p.name for p in files)
    assert all(len(p.relative_to(out).parts) <= MAX_DEPTH + 1 for p in files)


@pytest.mark.slow
def test_the_gpu_run_rehearses_end_to_end_with_the_prepared_mpi_wheel(tmp_path):
    out, wheel = tmp_path / "out", mpich_wheel(tmp_path / "wheels")
    result = rehearse(out, tmp_path / "wheels")
    assert result.returncode == 0, result.stdout + result.stderr
    check_returned_files(out)
    summary = (out / "summary.txt").read_text()
    assert result.stdout.strip() == summary.strip()  # the summary comes back on stdout too
    assert "strict_cupy" in summary and "FAILED" not in summary and "NOT MET" not in summary
    assert "MPI: no MPI library: `from mpi4py import MPI` fails" in summary
    record = json.loads((out / "gpu.json").read_text())
    assert {name: s["status"] for name, s in record["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    assert record["speed"]["peer_used"] and "rehearsal" in record["speed"]["peer"]
    assert all(t["verdict"] in ("met", "not met", "unresolved") for t in record["speed"]["targets"])
    assert "| synthetic-smollm2 | float32 | fused (last) |" in (out / "gpu.md").read_text()
    assert "GPU tests: passed" in summary
    if wheel is None:
        pytest.skip("mpich is not installed here: the wheel's path is not rehearsed")
    assert f"MPI: using {wheel.name}, unpacked" in summary
    runs = json.loads((out / "tp.json").read_text())
    assert set(runs) == {"tiny, 2 ranks", "synthetic-smollm2, 3 ranks"} and all(r["parity"] for r in runs.values())
    assert all(r[m]["allreduce_count"] == r[m]["expected_allreduce_count"] for r in runs.values()
               for m in ("sequential", "fused"))
    assert "these times say nothing about speed" in summary


@pytest.mark.slow
def test_a_failing_section_leaves_the_others_and_prints_its_log(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "no-wheels").mkdir()
    result = rehearse(out, tmp_path / "no-wheels", "--fail-section", "speed")
    assert result.returncode == 1, result.stdout + result.stderr
    check_returned_files(out)
    record = json.loads((out / "gpu.json").read_text())
    status = {name: s["status"] for name, s in record["sections"].items()}
    assert status == {**dict.fromkeys(SECTIONS, "ok"), "speed": "FAILED"}
    assert record["parity"]["rows"] and record["ffn_run"]["rows"] and record["training"]["reffuse"]
    # the failing step's log tail, with the traceback, on stdout; the reason for skipping tp said plainly
    assert "gpu_run.py: FAILED (exit 1" in result.stdout and "the last 40 lines of its log" in result.stdout
    assert "RuntimeError: the speed section was made to fail" in result.stdout
    assert "speed: FAILED" in result.stdout and "training: ok" in result.stdout
    assert "no prepared mpich wheel" in result.stdout and "tensor parallelism skipped" in result.stdout
