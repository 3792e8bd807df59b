"""benchmarks/gpu/run.sh, rehearsed on the CPU against the strict CuPy stand-in: the script a GPU machine runs
cannot fail there for a reason this run could have shown."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_run_rehearses_end_to_end_on_the_stand_in(tmp_path):
    env = os.environ | {"PYTHON": sys.executable, "REFFUSE_GPU_OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--rehearse"], env=env,
                            capture_output=True, text=True, timeout=600)  # a hang guard
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "strict_cupy" in summary and "GPU tests: passed" in summary
    assert "parity and benchmarks: written" in summary
    assert "FAILED" not in summary and "NOT MET" not in (tmp_path / "gpu_run.log").read_text()
    report = (tmp_path / "gpu.md").read_text()
    assert "| synthetic-smollm2 | float64 | fused (last) |" in report and "fused vs sequential run" in report
