"""The speed work's correctness (never its timings): blocked SwiGLU, the benchmark's output, the speed figure."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from reffuse.core import fast
from reffuse.core import model as model_module
from reffuse.speed.bench import ffn_run_model, reffuse_decode, run_benchmark
from reffuse.speed.bench_report import check_targets, markdown, target_verdict
from reffuse.speed.bench_result import BenchResult, FfnRow, PrefillRow, TransformersUse
from reffuse.speed.environment import BlasLibrary, describe_blas, environment
from reffuse.speed.timing import ratio_text
from reffuse.stats import paired_ratio
from reffuse.cli import main
from reffuse.errors import ReffuseError
from reffuse.core.fusion import fuse
from reffuse.core.generate import generate
from reffuse.core.fast import for_speed, swiglu_in_cache, swiglu_in_column_blocks
from reffuse.core.model import FFN, forward
from reffuse.plots.speed import ffn_speed_figure


def random_ffn(rng, d, width, dtype):
    return FFN(norm_gain=np.ones(d, dtype), gate=rng.standard_normal((width, d)).astype(dtype),
               up=rng.standard_normal((width, d)).astype(dtype), down=rng.standard_normal((d, width)).astype(dtype))


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])  # rounding of a reordered sum
@pytest.mark.parametrize("tokens, width, block_elements", [(7, 100, 64), (33, 992, 4096), (5, 64, 1 << 20)])
def test_column_blocks_equal_swiglu(dtype, rtol, tokens, width, block_elements):
    rng = np.random.default_rng(0)
    ffn, x = random_ffn(rng, 16, width, dtype), rng.standard_normal((tokens, 16)).astype(dtype)
    hidden = model_module.silu(x @ ffn.gate.T) * (x @ ffn.up.T)  # eq. 3, written out
    expected = hidden @ ffn.down.T
    got = swiglu_in_column_blocks(ffn, x, block_elements)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_swiglu_in_cache_uses_column_blocks_only_when_the_hidden_array_is_large(monkeypatch):
    rng = np.random.default_rng(1)
    ffn = random_ffn(rng, 8, 40, np.float64)
    calls = []
    monkeypatch.setattr(fast, "swiglu_in_column_blocks", lambda f, x, block: calls.append(x.shape) or 0)
    monkeypatch.setattr(fast, "HIDDEN_ELEMENTS_IN_CACHE", 40 * 10)
    swiglu_in_cache(ffn, rng.standard_normal((10, 8)))  # 10 x 40 elements: one block
    swiglu_in_cache(ffn, rng.standard_normal((11, 8)))
    assert calls == [(11, 8)]


def test_fused_model_with_column_blocks_equals_parallel_form(tiny64, tiny_ids, monkeypatch):
    monkeypatch.setattr(fast, "HIDDEN_ELEMENTS_IN_CACHE", 256)  # force blocks in every FFN
    monkeypatch.setattr(fast, "HIDDEN_BLOCK_ELEMENTS", 256)
    groups, model = [(4, 8)], for_speed(tiny64)
    fused, parallel = forward(fuse(model, groups), tiny_ids), forward(model, tiny_ids, groups)
    # the acceptance bound of the fusion tests: the sums differ in order only, float64 rounding is ~1e-16
    assert np.max(np.abs(fused - parallel)) / np.max(np.abs(parallel)) <= 1e-12


def test_decode_step_agrees_with_generate(tiny32, tiny_ids):
    _, tokens = reffuse_decode(tiny32, tiny_ids, 6)
    assert tokens == generate(tiny32, tiny_ids, 6)


@pytest.fixture(scope="module")
def tiny_result():
    from reffuse.core.tiny import build_tiny
    return run_benchmark(build_tiny(), "tiny", threads=1, repeats=1, prefill_tokens=(8, 16), ffn_tokens=(1, 128),
                         decode_tokens=3, with_transformers=False)


def test_benchmark_result_has_every_part(tiny_result):
    r = tiny_result
    assert [row.tokens for row in r.prefill] == [8, 16]
    assert all(row.reffuse_seconds > 0 and row.time_ratio is None for row in r.prefill)
    assert r.decode.new_tokens == 3 and r.decode.reffuse_tokens_per_second > 0
    assert r.ffn_run.blocks == 8 and r.ffn_run.fused_width == sum(r.ffn_run.widths)
    assert {row.tokens for row in r.ffn_run.rows} == {1, 128}
    assert r.transformers == TransformersUse(False, "not asked for (--no-transformers)")
    assert r.environment.threads == 1
    processor = r.environment.processor
    assert processor is None or (processor in markdown(r) and processor.strip() == processor)
    bound = r.bound  # every weight once, at the best streaming rate measured in the run
    assert bound.seconds_per_token == pytest.approx(bound.weight_bytes / max(dataclasses.astuple(bound.bandwidth)))
    assert set(bound.fractions) == {"reffuse"} and "fraction of the bound" in markdown(r)
    raw = json.loads(json.dumps(r.to_json()))  # JSON-ready, and read back the same
    assert "time_ratio" not in raw["prefill"][0] and BenchResult.from_json(raw) == r


def prefill_rows(*ratios):
    """Prefill rows of the given (tokens, time ratio, its interval)."""
    return tuple(PrefillRow(tokens=tokens, reffuse_seconds=0.1, time_ratio=ratio, time_ratio_interval_95=interval)
                 for tokens, ratio, interval in ratios)


def test_targets_are_judged_from_the_intervals_of_the_ratios(tiny_result):
    ffn_rows = (FfnRow(tokens=1, sequential=1.4, fused=1.0, speedup=1.4),  # no interval: its own
                FfnRow(tokens=128, sequential=1.0, fused=1.0, speedup=1.01, speedup_interval_95=(1.0, 1.02)),
                FfnRow(tokens=512, sequential=1.0, fused=1.0, speedup=0.99, speedup_interval_95=(0.97, 1.01)))
    r = dataclasses.replace(
        tiny_result, prefill=prefill_rows((64, 0.7, (0.68, 0.72)), (128, 0.79, (0.77, 0.81))),
        decode=dataclasses.replace(tiny_result.decode, speedup=2.6, speedup_interval_95=(2.55, 2.7),
                                   fraction_of_llamacpp=0.45, fraction_of_llamacpp_interval_95=(0.4, 0.49)),
        ffn_run=dataclasses.replace(tiny_result.ffn_run, rows=ffn_rows))
    checks = [(t.measured, t.interval_95, t.verdict) for t in check_targets(r)]
    assert checks == [(0.79, (0.77, 0.81), "unresolved"),  # the worst length's interval holds 0.8
                      (2.6, (2.55, 2.7), "met"), (0.45, (0.4, 0.49), "not met"), (1.4, (1.4, 1.4), "met"),
                      (0.99, (0.97, 1.01), "unresolved")]
    # one length wholly on the wrong side decides, whatever the others say, and is the one shown
    r = dataclasses.replace(r, prefill=prefill_rows((64, 0.82, (0.81, 0.83)), (128, 0.8, (0.7, 0.9))))
    assert (check_targets(r)[0].measured, check_targets(r)[0].verdict) == (0.82, "not met")
    # no transformers, no llama.cpp: not measured
    assert [t.verdict for t in check_targets(tiny_result)][:3] == ["not measured"] * 3
    assert "not measured" in markdown(tiny_result)


def test_target_verdict_in_both_directions():
    assert target_verdict([[0.7, 0.8]], 0.8, higher_is_better=False) == "met"      # on the threshold counts
    assert target_verdict([[0.79, 0.81]], 0.8, higher_is_better=False) == "unresolved"
    assert target_verdict([[2.4, 2.49]], 2.5, higher_is_better=True) == "not met"
    assert target_verdict([], 2.5, higher_is_better=True) == "not measured"


def test_speed_figure_draws_from_the_json(tiny_result):
    fig = ffn_speed_figure(tiny_result)
    assert fig.axes[0].get_ylabel() == "sequential time / fused time"


def test_ffn_run_model_needs_two_ffns(tiny32):
    from reffuse.core.model import Model
    one = Model(tiny32.config, tiny32.embed, tiny32.blocks[:1], tiny32.norm_gain, tiny32.lm_head)
    with pytest.raises(ReffuseError, match="at least 2"):
        ffn_run_model(one)
    assert all(b.attention is None for b in ffn_run_model(tiny32).blocks)


def test_bench_command_on_tiny_writes_json_and_markdown(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench_tiny.json"
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # what chose the kernels is part of the command
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    assert main(["bench", "--model", "tiny", "--repeats", "1", "--threads", "1", "--no-transformers",
                 "--out", str(out)]) == 0
    result = BenchResult.from_json(json.loads(out.read_text()))
    assert result.command == ("OPENBLAS_CORETYPE=Haswell reffuse bench --model tiny --repeats 1 --threads 1 "
                              f"--no-transformers --out {out}")
    assert [row.tokens for row in result.ffn_run.rows] == [1, 16, 128, 512]
    md = out.with_suffix(".md").read_text()
    assert result.command in md and "| 512 |" in md
    assert "sequential / fused" in capsys.readouterr().out


def test_bench_command_bad_options(capsys):
    for flag in ("--repeats", "--threads"):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "--model", "tiny", flag, "0"])
        assert exit_.value.code == 2
        assert f"argument {flag}: 0 is not a count: give 1 or more" in capsys.readouterr().err


def test_a_paired_ratio_is_resolved_only_when_its_interval_excludes_one():
    clear = paired_ratio([1.2, 1.25, 1.21, 1.3, 1.22, 1.24, 1.23], [1.0] * 7)
    assert clear.resolved and 1.2 <= clear.interval_95[0] <= clear.median <= clear.interval_95[1]
    noisy = paired_ratio([1.1, 0.95, 1.2, 0.9, 1.05, 1.0, 0.97], [1.0] * 7)
    assert not noisy.resolved and noisy.interval_95[0] < 1 < noisy.interval_95[1]


def test_the_profile_script_runs_and_accounts_for_the_step(smollm2, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "profile" / "profile_smollm2.py"
    subprocess.run([sys.executable, str(script), "--repeats", "2", "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=3600)  # a hang guard: 37 s alone, several minutes under load
    result = json.loads((tmp_path / "profile.json").read_text())
    step = result["decode"]["seconds"]
    assert abs(sum(result["decode"]["parts"].values()) - step) <= 0.05 * step  # the parts account for the step
    assert 0 < result["fraction_of_bound"] <= 1.5


def test_describe_blas_says_whether_the_environment_chose_the_kernels():
    here = dataclasses.replace(environment(1), blas=(BlasLibrary("openblas", "0.3.31", "SkylakeX", "pthreads"),),
                               openblas_coretype=None, openblas_l2_size=None)
    assert describe_blas(here) == "openblas 0.3.31 (SkylakeX kernels), detected by OpenBLAS for this CPU"
    chosen = dataclasses.replace(here, openblas_coretype="Haswell", openblas_l2_size="512")
    assert describe_blas(chosen).endswith("chosen by OPENBLAS_CORETYPE=Haswell OPENBLAS_L2_SIZE=512 in the environment")
    assert describe_blas(dataclasses.replace(here, blas=None)) == ""


def test_too_few_pairs_give_no_interval_and_no_verdict(tiny_result):
    few = paired_ratio([1.2, 1.25, 1.21, 1.3, 1.22], [1.0] * 5)  # 5 pairs: even their whole span covers 94%
    assert few.interval_95 is None and not few.resolved and few.median == pytest.approx(1.22)
    decode = dataclasses.replace(tiny_result.decode, speedup=3.0, speedup_interval_95=None)
    check = check_targets(dataclasses.replace(tiny_result, decode=decode))[1]
    assert (check.measured, check.interval_95, check.verdict) == (3.0, None, "unresolved")
    assert "no interval: fewer than 6 repeats" in ratio_text(decode.speedup, decode.speedup_interval_95)


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_every_committed_bench_result_reads_and_writes_back_as_it_is():
    committed = [p for p in sorted(RESULTS.rglob("bench_*.json")) if '"ffn_run"' in p.read_text()]
    assert {p.stem for p in committed} >= {"bench_smollm2", "bench_smollm2_haswell"}
    for path in committed:
        raw = json.loads(path.read_text())
        assert BenchResult.from_json(raw).to_json() == raw, path.name


@pytest.mark.parametrize("name", ["bench_smollm2", "bench_smollm2_haswell"])
def test_the_committed_verdicts_and_tables_follow_from_the_committed_numbers_by_the_code(name):
    path = RESULTS / f"{name}.json"
    result = BenchResult.from_json(json.loads(path.read_text()))
    assert check_targets(result) == result.targets
    assert markdown(result, result.command) == path.with_suffix(".md").read_text()


class _Event:
    """A CUDA event of a fake clock: records the fake time of its stream."""

    def __init__(self, clock, **kwargs):
        self.clock, self.time = clock, None

    def record(self):
        self.time = self.clock.now

    def synchronize(self):
        assert self.time is not None

    def elapsed_time(self, stop):  # torch's way: on the start event, in milliseconds
        return 1e3 * (stop.time - self.time)


def test_an_event_clock_times_regions_on_the_gpus_clock_for_cupy_and_for_torch():
    import types

    from reffuse.speed.timing import EventClock, compare_samples

    fake = types.SimpleNamespace(now=0.0)

    def library(name):
        cuda = types.SimpleNamespace(Event=lambda **kw: _Event(fake, **kw), is_available=lambda: True,
                                     get_elapsed_time=lambda a, b: 1e3 * (b.time - a.time))  # CuPy's way
        return types.SimpleNamespace(__name__=name, cuda=cuda)

    def work(seconds):
        fake.now += seconds
        return seconds

    assert not EventClock.available(types.SimpleNamespace(__name__="strict_cupy", cuda=object()))
    clocks = {"a": EventClock(library("cupy")), "b": EventClock(library("torch"))}
    assert all(EventClock.available(c.library) for c in clocks.values())
    wall = compare_samples({"a": lambda: work(0.25), "b": lambda: work(0.5)}, repeats=3, clocks=clocks)
    assert [len(s) for s in wall.values()] == [3, 3]
    assert clocks["a"].samples == pytest.approx([0.25] * 3) and clocks["b"].samples == pytest.approx([0.5] * 3)


@pytest.mark.slow  # imports torch
def test_the_equations_decode_with_a_kv_cache_as_the_whole_forward(tiny32, tiny_ids):
    torch = pytest.importorskip("torch")
    from reffuse.core.names import named_weights
    from reffuse.speed.torch_models import equations_forward

    weights = {n: torch.from_numpy(np.array(w)) for n, w in named_weights(tiny32).items()}
    whole = equations_forward(tiny32, weights, tiny_ids)
    cache = {}
    steps = [equations_forward(tiny32, weights, tiny_ids[:5], cache)]
    steps += [equations_forward(tiny32, weights, tiny_ids[t:t + 1], cache) for t in range(5, len(tiny_ids))]
    np.testing.assert_allclose(torch.cat(steps).numpy(), whole.numpy(), rtol=0, atol=1e-5 * whole.abs().max().item())
