"""Every command that computes runs with --device gpu on the strict CuPy stand-in and gives the NumPy path's
numbers: float64 to 1e-12 of the largest value, float32 to the CPU tests' 1e-5."""

import json

import numpy as np
import pytest

import reffuse
from reffuse.cli import main


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def close(a, b, tolerance):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.nanmax(np.abs(a - b)) <= tolerance * max(np.nanmax(np.abs(b)), 1e-300)


def matrix(rows):
    return [[np.nan if v is None else v for v in row] for row in rows]


def test_analyze_on_the_device_gives_the_hosts_matrices(device, capsys, tmp_path):
    results = {d: run_json(capsys, "analyze", "--model", "tiny", "--dependency-tokens", "32", "--dtype", "float64",
                           "--no-figures", "--out", str(tmp_path / d), "--json", "--device", d) for d in ("cpu", "gpu")}
    for granularity in ("block", "ffn"):
        assert close(matrix(results["gpu"]["dependency"][granularity]),
                     matrix(results["cpu"]["dependency"][granularity]), 1e-12)
    assert results["gpu"]["plan"]["groups"] == results["cpu"]["plan"]["groups"]


def test_fuse_on_the_device_saves_the_hosts_weights(device, capsys, tmp_path):
    for d in ("cpu", "gpu"):
        run_json(capsys, "fuse", "--model", "tiny", "--groups", "4-8", "--calibrate", "--calibration-tokens", "256",
                 "--scoring-tokens", "128", "--out", str(tmp_path / d), "--json", "--device", d)
    cpu, gpu = reffuse.load_model(tmp_path / "cpu"), reffuse.load_model(tmp_path / "gpu")
    assert close(gpu.blocks[4].ffn.down, cpu.blocks[4].ffn.down, 1e-5)  # float32, a solve on each side


def test_demo_on_the_device_gives_the_hosts_numbers(device, capsys, tmp_path):
    small = ["--model", "tiny", "--held-out-tokens", "256", "--calibration-tokens", "256", "--scoring-tokens", "128",
             "--dependency-tokens", "64", "--repeats", "1", "--decode-tokens", "2", "--sample-tokens", "2", "--json"]
    results = {d: run_json(capsys, "demo", *small, "--out", str(tmp_path / d), "--device", d) for d in ("cpu", "gpu")}
    cpu, gpu = results["cpu"], results["gpu"]
    assert gpu["groups"] == cpu["groups"] and gpu["layout_after"] == cpu["layout_after"]
    assert gpu["fused_vs_parallel_relative_error"]["float64"] <= 1e-12
    for gpu_fit, cpu_fit in zip(gpu["calibration"], cpu["calibration"]):  # tiny's demo scores no quality
        assert close(gpu_fit["fit_error_calibrated"], cpu_fit["fit_error_calibrated"], 1e-5)
    assert gpu["samples"] == cpu["samples"]


def test_bench_runs_on_the_device_and_synchronises(strict_device, capsys):
    device = strict_device
    result = run_json(capsys, "bench", "--model", "tiny", "--repeats", "1", "--no-transformers", "--json",
                      "--device", "gpu")
    assert result["environment"]["device"] == "gpu"
    assert device.stats["synchronize"] > 0  # every timed region ends on a synchronisation


@pytest.mark.parametrize("argv", [["generate", "--model", "smollm2", "The capital of France is",
                                   "--max-new-tokens", "6", "--dtype", "float64"]])
def test_generate_on_the_device_writes_the_hosts_text(device, capsys, smollm2, argv):
    texts = {}
    for d in ("cpu", "gpu"):
        assert main(argv + ["--device", d]) == 0
        texts[d] = capsys.readouterr().out
    assert texts["gpu"] == texts["cpu"]


def test_eval_on_the_device_gives_the_hosts_perplexity(device, capsys, smollm2):
    results = {d: run_json(capsys, "eval", "--model", "smollm2", "--held-out-tokens", "256", "--dtype", "float64",
                           "--json", "--device", d) for d in ("cpu", "gpu")}
    assert close(results["gpu"]["perplexity"], results["cpu"]["perplexity"], 1e-12)
