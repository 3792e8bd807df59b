"""The decode-latency model: layouts and their counts, the limits the formulas must obey, presets, CLI and errors.

No test times anything: calibration runs once (mpi=False, a few seconds) to check that it yields a usable
Hardware, never how fast this machine is.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from reffuse.cli import main
from reffuse.speed.costmodel import (MODEL_PRESETS, PAPER_TABLE2, ULTRA_FUSED_MULTS, ULTRA_FUSION_GROUPS,
                                     Calibration, Hardware, MpiAllreduce, allreduce_count, calibrate_cpu, cpu_hardware,
                                     deci_ffn_width, decode_projection, forward_cost, fuse_layout, get_hardware,
                                     get_layout, h100_sxm, layout_from_model, paper_comparison, parameter_count,
                                     predict_tp_run, tensor_parallel_degrees)
from reffuse.speed.costmodel.report import CostmodelReport, MeasuredRuns
from reffuse.core.layout import BlockLayout, attention_free_runs
from reffuse.errors import ReffuseError
from reffuse.core.fusion import fuse
from reffuse.core.model import weights_of
from reffuse.speed.tp_result import TpResult
from reffuse.tp.sharding import allreduces_per_forward


@pytest.fixture(scope="module")
def layouts():
    return {name: build() for name, build in MODEL_PRESETS.items()}


@pytest.fixture(scope="module")
def h100():
    return h100_sxm("fp8")


# --- counting -----------------------------------------------------------------------------------------------------


def test_allreduces_are_one_per_row_parallel_layer(layouts):
    for name, layout in layouts.items():
        expected = sum(b.attention for b in layout.blocks) + sum(b.ffn_width > 0 for b in layout.blocks)
        assert allreduce_count(layout, 2) == expected, name
        assert allreduce_count(layout, 1) == 0, name
    assert allreduce_count(layouts["llama-3.1-405b"], 8) == 2 * 126 == 252   # 126 full blocks, 2 each
    assert allreduce_count(layouts["smollm2"], 3) == 60


def test_fusing_a_group_of_k_saves_exactly_k_minus_1(layouts):
    prefusion = layouts["ultra-253b-prefusion"]
    before = allreduce_count(prefusion, 8)
    for first, last in ULTRA_FUSION_GROUPS:
        k = last - first + 1
        assert before - allreduce_count(fuse_layout(prefusion, [(first, last)]), 8) == k - 1
    saved = sum(last - first for first, last in ULTRA_FUSION_GROUPS)  # 7 + 11 + 14 + 13: 49 FFNs -> 4
    assert saved == 45
    assert allreduce_count(layouts["ultra-253b-fused"], 8) == before - saved


def test_counts_agree_with_the_tensor_parallel_runtime(tiny32):
    """The model's rule and reffuse.tp's own count, on the tiny model before and after fusing 4-8."""
    fused = fuse(tiny32, [(4, 8)])
    assert allreduce_count(layout_from_model(tiny32), 2) == allreduces_per_forward(tiny32) == 18
    assert allreduce_count(layout_from_model(fused), 2) == allreduces_per_forward(fused) == 14
    assert fuse_layout(layout_from_model(tiny32)).blocks == layout_from_model(fused).blocks


# --- layouts and their parameter counts ---------------------------------------------------------------------------


def test_parameter_counts(layouts, tiny32):
    assert parameter_count(layouts["llama-3.1-405b"]) == pytest.approx(405e9, rel=0.01)
    for name in ("ultra-253b-prefusion", "ultra-253b-fused"):
        assert parameter_count(layouts[name]) == pytest.approx(253e9, rel=0.03), name
    # fusion moves weights, it neither adds nor drops any (Theorem 3.1)
    assert parameter_count(layouts["ultra-253b-fused"]) == parameter_count(layouts["ultra-253b-prefusion"])
    # SmolLM2-135M: 134,515,008 weights of which 34,560 + 576 are norm gains, which the count leaves out
    assert parameter_count(layouts["smollm2"]) == 134_515_008 - 30 * 2 * 576 - 576
    weights = tiny32.embed.size + sum(a.size for b in tiny32.blocks for part in (b.attention, b.ffn) if part
                                      for name, a in weights_of(part).items() if name != "norm_gain")
    assert parameter_count(layouts["tiny"]) == weights  # tied embeddings: the LM head is the embedding


def test_ultra_layout_matches_the_paper(layouts):
    pre = layouts["ultra-253b-prefusion"]
    assert len(pre.blocks) == 126
    assert sum(b.attention for b in pre.blocks) == 63          # about half the attention layers removed
    runs = attention_free_runs(pre)
    assert (66, 115) in runs and max(last - first + 1 for first, last in runs) == 50
    assert pre.blocks[65].attention and pre.blocks[116].attention
    widths = {b.ffn_width for b in pre.blocks if b.ffn_width}
    assert min(widths) == deci_ffn_width(0.4875) and max(widths) == deci_ffn_width(4.875) == 53248
    assert pre.fusion_groups == ULTRA_FUSION_GROUPS
    fused = layouts["ultra-253b-fused"]
    assert len(fused.blocks) == 126 - 45
    fused_widths = [b.ffn_width for b in fused.blocks if b.fused_from]
    assert fused_widths == [deci_ffn_width(m) for m in ULTRA_FUSED_MULTS]   # the released config's widths
    assert [b.fused_from for b in fused.blocks if b.fused_from] == [tuple(range(a, b + 1))
                                                                     for a, b in ULTRA_FUSION_GROUPS]


def test_tiny_preset_is_the_tiny_model_with_its_run_fused(layouts, tiny32):
    tiny = layouts["tiny"]
    assert tiny.blocks == layout_from_model(tiny32).blocks
    assert tiny.fusion_groups == ((4, 8),)  # the attention-free run 4..9 without its last block


# --- what the formulas must do ------------------------------------------------------------------------------------


def test_tp1_has_no_allreduce_time(layouts, h100):
    cost = forward_cost(layouts["llama-3.1-405b"], h100, tp=1, context=1024)
    assert cost.allreduces == 0 and cost.allreduce == 0.0 and cost.parts["allreduce"] == 0.0


def test_decode_at_batch_1_is_memory_bound_and_prefill_compute_bound(layouts, h100):
    layout = layouts["llama-3.1-405b"]
    decode = forward_cost(layout, h100, tp=8, tokens=1, context=1024)
    assert decode.memory_bound_seconds == decode.roofline                      # every sub-block waits on bytes
    prefill = forward_cost(layout, h100, tp=8, tokens=8192, context=0)
    assert prefill.memory_bound_seconds < 0.01 * prefill.roofline              # ~all sub-blocks wait on FLOPs


def test_more_gpus_shrink_the_weights_but_not_the_syncs(layouts, h100):
    layout = layouts["ultra-253b-prefusion"]
    costs = {tp: forward_cost(layout, h100, tp=tp, context=1024) for tp in tensor_parallel_degrees(layout)}
    assert list(costs) == [1, 2, 4, 8]
    seconds = [c.seconds for c in costs.values()]
    assert seconds == sorted(seconds, reverse=True)                            # faster with every doubling
    allreduce = [c.allreduce for c in costs.values()]
    assert allreduce == sorted(allreduce) and allreduce[0] == 0                # ring latency grows with N
    assert costs[8].weight_bytes == pytest.approx(costs[1].weight_bytes / 8, rel=0.02)  # the LM head is split too
    assert {c.allreduces for tp, c in costs.items() if tp > 1} == {allreduce_count(layout, 2)}


def test_fusion_saves_only_fixed_costs_at_decode(layouts, h100):
    """Same weights and FLOPs: without per-kernel and per-sync costs, the fused model is exactly as fast; with
    them, it is faster, and the more so the higher the TP degree."""
    pre, fused = layouts["ultra-253b-prefusion"], layouts["ultra-253b-fused"]
    free = dataclasses.replace(h100, kernel_overhead=0.0, allreduce_alpha=0.0, link_bandwidth=float("inf"))
    assert forward_cost(fused, free, 8, context=1024).seconds == pytest.approx(
        forward_cost(pre, free, 8, context=1024).seconds, rel=1e-12)
    projection = decode_projection(pre, h100, range(1, 9), context=1024)
    speedups = [row.fusion_speedup for row in projection.rows]
    assert all(s > 1 for s in speedups) and speedups == sorted(speedups)


def test_paper_comparison_reports_the_papers_numbers_and_ratios():
    comparison = paper_comparison()
    rows = {row.model: row for row in comparison.rows}
    assert {name: row.paper_tokens_per_second for name, row in rows.items()} == PAPER_TABLE2
    assert rows["ultra-253b-prefusion"].paper_speedup == pytest.approx(1.53, abs=0.005)
    assert rows["ultra-253b-fused"].paper_speedup == pytest.approx(1.71, abs=0.005)
    assert comparison.fusion_alone.paper == pytest.approx(1.12, abs=0.005)
    projected = [row.projected.tokens_per_second for row in comparison.rows]
    assert projected == sorted(projected)  # the model orders them as the paper does
    assert comparison.tp == 8 and comparison.precision == "fp8" and comparison.left_out


# --- presets, the CPU calibration, tp runs ------------------------------------------------------------------------


def test_hardware_presets_load():
    for name in ("h100-sxm", "h100-sxm-bf16"):
        hw = get_hardware(name)
        assert isinstance(hw, Hardware) and hw.sources and hw.memory_bandwidth == 3.35e12
    assert get_hardware("h100-sxm").weight_bytes == 1 and get_hardware("h100-sxm-bf16").weight_bytes == 2


@pytest.fixture(scope="module")
def cpu():
    return calibrate_cpu(mpi=False)


def test_cpu_calibration_gives_a_usable_hardware(cpu, layouts):
    cal = cpu.calibration
    assert min(cal.gemm_flops_1_thread, cal.gemm_flops_all_threads, cal.gemv_bandwidth_1_thread,
               cal.machine_bandwidth, cal.numpy_call_seconds) > 0
    assert cal.mpi_allreduce == MpiAllreduce(available=False, reason="not asked for")
    recorded = json.loads(json.dumps(cal.to_json()))
    assert cpu_hardware(Calibration.from_json(recorded)) == cpu                 # rebuilt from recorded JSON
    assert forward_cost(layouts["smollm2"], cpu, tp=1, context=64).seconds > 0
    with pytest.raises(ReffuseError, match="no all-reduce calibration"):
        forward_cost(layouts["smollm2"], cpu, tp=3)
    projection = decode_projection(layouts["smollm2"], cpu, range(1, 4))       # TP 3 skipped, with the reason
    assert [r.tp for r in projection.rows] == [1] and "no all-reduce" in projection.skipped_tp[3]


def tp_result(ranks, counts, attention_removed=()) -> TpResult:
    """The committed `reffuse tp` run of tiny (groups 4-8), with these ranks, (sequential, fused) all-reduce
    counts and blocks without attention."""
    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "tp_tiny_n2.json"
    result = TpResult.from_json(json.loads(committed.read_text()))

    def variant(record, count):
        return dataclasses.replace(record, prefill=dataclasses.replace(record.prefill, allreduce_count=count),
                                   decode=dataclasses.replace(record.decode, allreduce_count=count))
    return dataclasses.replace(result, ranks=ranks, attention_removed=list(attention_removed),
                               sequential=variant(result.sequential, counts[0]), fused=variant(result.fused, counts[1]))


def test_predictions_for_tp_runs_count_what_the_runs_counted(cpu):
    calibrated = dataclasses.replace(cpu, allreduce_alpha=1e-5, link_bandwidth=1e9)
    rows = predict_tp_run(tp_result(2, (18, 14)), calibrated)
    assert [(r.variant, r.phase) for r in rows] == [("sequential", "prefill"), ("sequential", "decode"),
                                                    ("fused", "prefill"), ("fused", "decode")]
    assert all(r.predicted_allreduce_count == r.measured_allreduce_count for r in rows)
    rows = predict_tp_run(tp_result(2, (17, 13), attention_removed=[3]), calibrated)
    assert {r.predicted_allreduce_count for r in rows} == {17, 13}


# --- command line and errors --------------------------------------------------------------------------------------


def test_costmodel_json_keys(capsys):
    assert main(["costmodel", "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert set(raw) == {"setting", "paper_comparison", "paper_sensitivity", "paper_grid", "hardware", "projections",
                        "layouts", "measured", "left_out"}
    report = CostmodelReport.from_json(raw)
    assert report.to_json() == raw
    assert [p.model for p in report.projections] == ["llama-3.1-405b", "ultra-253b-prefusion"]
    row = report.projections[1].rows[-1]
    assert row.tp == 8 and row.fusion_speedup == row.sequential.seconds / row.fused.seconds
    assert report.measured is None


def test_costmodel_text_shows_the_paper_beside_the_model(capsys):
    assert main(["costmodel", "--model", "tiny", "--hardware", "h100-sxm-bf16", "--max-tp", "4"]) == 0
    out = capsys.readouterr().out
    for text in ("41.44", "63.38", "70.92", "fusion alone", "What the model leaves out", "ASSUMPTION"):
        assert text in out


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny", "--groups", "2-5"], "contains block 2, which has attention"),
    (["--model", "tiny", "--model", "smollm2", "--groups", "4-8"], "--groups applies to one model"),
    (["--measured", "no-such-file.json"], "does not exist"),
])
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert main(["costmodel", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_presets_and_bad_tp_degrees_raise(layouts, h100):
    with pytest.raises(ReffuseError, match="unknown hardware 'tpu'"):
        get_hardware("tpu")
    with pytest.raises(ReffuseError, match="unknown model"):
        get_layout("gpt-5")
    with pytest.raises(ReffuseError, match=r"128 query heads \(n_heads\) do not divide by N=3.*that work: 1, 2, 4, 8"):
        forward_cost(layouts["llama-3.1-405b"], h100, tp=3)
    with pytest.raises(ReffuseError, match=r"9 query heads \(n_heads\) do not divide by N=2.*that work: 1, 3\b"):
        forward_cost(layouts["smollm2"], h100, tp=2)
    with pytest.raises(ReffuseError, match="overlap"):
        fuse_layout(layouts["ultra-253b-prefusion"], [(66, 73), (70, 80)])
    with pytest.raises(ReffuseError, match="has no FFN"):
        fuse_layout(dataclasses.replace(layouts["tiny"], blocks=(BlockLayout(False, 0),) * 3), [(0, 2)])


def test_figures_draw_from_the_report(tmp_path, capsys, cpu):
    pytest.importorskip("matplotlib")
    from reffuse.plots.costmodel import plot_measured_vs_predicted, plot_tp_projection

    assert main(["costmodel", "--json"]) == 0
    report = CostmodelReport.from_json(json.loads(capsys.readouterr().out))
    calibrated = dataclasses.replace(cpu, allreduce_alpha=1e-5, link_bandwidth=1e9)
    measured = MeasuredRuns(calibrated.describe(), tuple(predict_tp_run(tp_result(2, (18, 14)), calibrated)))
    report = dataclasses.replace(report, measured=measured)
    first = plot_tp_projection(report, tmp_path / "projection.png").read_bytes()
    assert first == plot_tp_projection(report, tmp_path / "again.png").read_bytes()  # deterministic
    assert plot_measured_vs_predicted(report, tmp_path / "measured.png").stat().st_size > 0


def test_measured_table_reuses_a_recorded_calibration(tmp_path, capsys, cpu):
    calibration = dataclasses.replace(cpu.calibration,
                                      mpi_allreduce=MpiAllreduce(available=True, alpha=1e-5, link_bandwidth=1e9))
    recorded = tmp_path / "costmodel.json"
    recorded.write_text(json.dumps({"measured": {"hardware": {"calibration": calibration.to_json()}}}))
    run = tmp_path / "tp_tiny_n2.json"
    run.write_text(json.dumps(tp_result(2, (18, 14)).to_json()))
    assert main(["costmodel", "--json", "--measured", str(run), "--calibration", str(recorded)]) == 0
    captured = capsys.readouterr()
    assert "calibrating" not in captured.err                                   # nothing was measured
    measured = CostmodelReport.from_json(json.loads(captured.out)).measured
    assert measured.hardware.calibration == calibration                        # the recorded one, as it was
    assert len(measured.rows) == 4 and {r.file for r in measured.rows} == {str(run)}
    assert main(["costmodel", "--measured", str(run), "--calibration", str(run)]) == 2
    assert "holds no CPU calibration" in capsys.readouterr().err


def test_the_grid_of_chosen_constants_bounds_what_the_model_explains():
    """Admissible points project at least the paper's tokens/s for all three models; the most of the fusion gain
    they explain is the top of their fusion-alone range over the paper's."""
    from reffuse.speed.costmodel.paper import PAPER_TABLE2, paper_grid
    grid = paper_grid()
    summary, points = grid.summary, grid.points
    assert summary.points == len(points) == 10 * 9 * 3
    admissible = [p for p in points if p.upper_bound]
    assert len(admissible) == summary.admissible > 0
    assert all(t >= paper for p in admissible for t, paper in zip(p.tokens_per_second, PAPER_TABLE2.values()))
    top = max(p.fusion_alone for p in admissible)
    assert summary.fusion_alone_range[1] == top == summary.highest_at.fusion_alone
    assert summary.explains_at_most == pytest.approx((top - 1) / (summary.paper_fusion_alone - 1))
    assert 0 < summary.explains_at_most < 1  # the mechanisms modelled do not explain all of the paper's gain


def test_the_committed_report_round_trips():
    """benchmarks/results/costmodel.json read into its records and written back is the same JSON, and the
    records hold what the report of that run printed."""
    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "costmodel.json"
    raw = json.loads(committed.read_text())
    report = CostmodelReport.from_json(raw)
    assert report.to_json() == raw
    assert [row.projected.allreduce_count for row in report.paper_comparison.rows] == [252, 188, 143]
    assert report.measured.hardware.calibration.mpi_allreduce.available
    assert {row.file for row in report.measured.rows} == {
        f"benchmarks/results/costmodel/tp_{run}.json" for run in ("tiny_n1", "tiny_n2", "smollm2_n1", "smollm2_n3")}


def test_a_grid_with_no_admissible_point_writes_no_range():
    """The range, its top and what it explains are absent from the JSON when no point is admissible."""
    from reffuse.speed.costmodel.paper import GridSummary
    summary = GridSummary(points=270, admissible=0, paper_fusion_alone=1.119)
    assert summary.to_json() == {"points": 270, "admissible": 0, "paper_fusion_alone": 1.119}
    assert GridSummary.from_json(summary.to_json()) == summary

