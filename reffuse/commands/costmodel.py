"""A decode-latency model at the paper's scale: what fusion saves under tensor parallelism, and why.

Per layer, time = max(FLOPs / peak, bytes / bandwidth) + kernels × kernel overhead, plus an alpha-beta ring
all-reduce after every row-parallel layer (2 per full block, 1 per FFN-only block, 1 per fused FFN group).
The model is in reffuse.speed.costmodel, every assumption named there.

It prints:
  - the projection of Llama-3.1-405B -> 253B PreFusion -> 253B fused at TP8 on 8 H100 SXM (FP8 weights, the
    paper's latency setting) beside the paper's Table 2 (41.44 / 63.38 / 70.92 tokens/s), with the ratios,
    how they move with each chosen number, and what the model leaves out;
  - single-user decode projected at TP 1..8, sequential vs fused, for the --model layouts on --hardware;
  - with --measured: its predictions for `reffuse tp` runs on this machine beside what they measured
    (the `cpu` hardware, calibrated first by a few seconds of measurement).

Models: llama-3.1-405b, ultra-253b-prefusion (its fused variant fuses the paper's four groups),
ultra-253b-fused, smollm2, tiny, or any model reffuse can load (a name or a saved folder).
Hardware: h100-sxm (FP8), h100-sxm-bf16, cpu (this machine, calibrated in a few seconds).

examples:
  reffuse costmodel
  reffuse costmodel --json
  reffuse costmodel --model smollm2 --model tiny --hardware cpu
  reffuse costmodel --model ultra-253b-prefusion --context 8192 --batch 4
  mpiexec -n 2 reffuse tp --model tiny --json > out/tp_tiny_n2.json
  reffuse costmodel --measured out/tp_tiny_n2.json
  reffuse costmodel --measured out/tp_tiny_n2.json --calibration benchmarks/results/costmodel.json
"""

from __future__ import annotations

from reffuse.commands.common import (add_json_argument, format_table, groups_argument, non_negative_int, positive_int,
                                     print_json)
from reffuse.speed.costmodel import HARDWARE_PRESETS, MODEL_PRESETS
from reffuse.speed.costmodel.report import CostmodelReport, MeasuredRuns, costmodel_report

HELP = "project decode latency at TP 1-8, sequential vs fused, beside the paper's numbers and measured runs"
DEFAULT_MODELS = ["llama-3.1-405b", "ultra-253b-prefusion"]


def add_arguments(parser):
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help=f"a layout to project (repeatable): {', '.join(MODEL_PRESETS)}, or a model name or "
                             f"folder reffuse can load (default: {' and '.join(DEFAULT_MODELS)})")
    parser.add_argument("--groups", type=groups_argument, default=None,
                        help="fusion groups FIRST-LAST[,...] for the fused variant of a single --model "
                             "(default: the preset's, or each attention-free run without its last block)")
    parser.add_argument("--hardware", choices=HARDWARE_PRESETS, default="h100-sxm",
                        help="hardware of the TP projections (default h100-sxm, FP8 weights); the paper "
                             "comparison is always on h100-sxm")
    parser.add_argument("--max-tp", type=positive_int, default=8, help="project TP degrees 1..MAX_TP (default 8)")
    parser.add_argument("--context", type=non_negative_int, default=1024,
                        help="positions in the KV cache while decoding (default 1024)")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--measured", nargs="+", default=[], metavar="TP_JSON",
                        help="`reffuse tp --json` outputs: put this machine's predictions beside their times")
    parser.add_argument("--calibration", metavar="COSTMODEL_JSON", default=None,
                        help="reuse the CPU calibration recorded in an earlier `reffuse costmodel --json` output "
                             "instead of measuring again (e.g. benchmarks/results/costmodel.json)")
    parser.add_argument("--no-mpi", action="store_true",
                        help="calibrate the CPU without timing `mpiexec -n 2` (TP>1 then cannot be predicted)")
    add_json_argument(parser)


def run(args) -> int:
    report = costmodel_report(args.model or DEFAULT_MODELS, args.groups, args.hardware, args.max_tp, args.context,
                              args.batch, args.measured, args.calibration, mpi=not args.no_mpi)
    if args.json:
        print_json(report.to_json())
    else:
        print_report(report)
    return 0


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}"


def _groups_text(groups) -> str:
    """Fusion groups as the report prints them: [[66, 73], [74, 85]], or 'nothing'."""
    return str([list(group) for group in groups]) if groups else "nothing"


def print_report(report: CostmodelReport) -> None:
    paper = report.paper_comparison
    print(f"Llama-3.1-405B -> 253B PreFusion -> 253B fused: single-user decode at TP{paper.tp} on 8 x H100 SXM, "
          f"{paper.precision.upper()} weights, BF16 activations and KV cache, {paper.context} cached positions")
    rows = [[r.model, f"{r.parameters / 1e9:.1f}B", r.projected.allreduce_count, r.projected.kernels,
             f"{r.projected.weight_bytes_per_device / 1e9:.1f}", _ms(r.projected.roofline_seconds),
             _ms(r.projected.kernel_overhead_seconds), _ms(r.projected.allreduce_seconds), _ms(r.projected.seconds),
             f"{r.projected.tokens_per_second:.2f}", f"{r.paper_tokens_per_second:.2f}",
             f"{r.projected_speedup:.2f}x", f"{r.paper_speedup:.2f}x"] for r in paper.rows]
    print(format_table(["model", "params", "all-reduces", "kernels", "GB/GPU", "roofline ms", "overhead ms",
                        "all-reduce ms", "ms/token", "tok/s model", "tok/s paper", "speedup model",
                        "speedup paper"], rows))
    fusion = paper.fusion_alone
    print(f"fusion alone (fused / PreFusion): model {fusion.projected:.3f}x, paper {fusion.paper:.3f}x\n")

    print("how the ratios move with each chosen number (tokens/s: 405B / PreFusion / fused)")
    print(format_table(["variant", "tokens/s", "PreFusion", "fused", "fusion alone"],
                       [[r.variant, " / ".join(f"{t:.1f}" for t in r.tokens_per_second),
                         f"{r.prefusion_speedup:.3f}x", f"{r.fused_speedup:.3f}x", f"{r.fusion_alone:.3f}x"]
                        for r in report.paper_sensitivity]))
    axes, summary = report.paper_grid.grid, report.paper_grid.summary
    print(f"the chosen constants over a grid (kernel overhead {min(axes.kernel_overhead_us)}-"
          f"{max(axes.kernel_overhead_us)} us, all-reduce alpha {min(axes.allreduce_alpha_us)}-"
          f"{max(axes.allreduce_alpha_us)} us per step, HBM at "
          f"{', '.join(f'{f:.0%}' for f in axes.hbm_fraction)}): {summary.admissible} of "
          f"{summary.points} points keep the model an upper bound (at least the paper's tokens/s for all three)")
    if summary.admissible:
        low, high = summary.fusion_alone_range
        at = summary.highest_at
        print(f"  fusion alone over them: {low:.3f}x to {high:.3f}x (highest at overhead {at.kernel_overhead_us} us, "
              f"alpha {at.allreduce_alpha_us} us, HBM {at.hbm_fraction:.0%}), against the paper's "
              f"{summary.paper_fusion_alone:.3f}x: fewer all-reduces and kernels explain at most "
              f"{summary.explains_at_most:.0%} of the paper's fusion gain\n")
    else:
        print("  no point of the grid keeps the model an upper bound\n")

    hw = report.hardware
    setting = report.setting
    who = "single-user decode" if setting.batch == 1 else \
        f"decode of {setting.batch} sequences at once (tokens/s counts them all)"
    print(f"projected {who} on {hw.name} ({hw.precision} weights), context {setting.context}")
    for projection in report.projections:
        print(f"\n{projection.model}: {projection.parameters / 1e9:.4g}B parameters, {projection.blocks} "
              f"blocks -> {projection.fused_blocks} after fusing {_groups_text(projection.fusion_groups)}")
        rows = [[r.tp, r.sequential.allreduce_count, r.fused.allreduce_count,
                 _ms(r.sequential.seconds), _ms(r.fused.seconds),
                 f"{r.sequential.tokens_per_second:.4g}", f"{r.fused.tokens_per_second:.4g}",
                 f"{r.fusion_speedup:.3f}x",
                 {True: "yes", False: "no", None: "-"}[r.sequential.fits_in_memory]]
                for r in projection.rows]
        print(format_table(["TP", "all-reduces seq", "all-reduces fused", "ms/token seq", "ms/token fused",
                            "tok/s seq", "tok/s fused", "fusion speedup", "weights fit"], rows))
        if projection.skipped_tp:
            reasons = sorted(set(projection.skipped_tp.values()), key=len)
            why = reasons[0] if len(reasons) == 1 else "a head count or an FFN width does not divide by them"
            print(f"  TP {', '.join(map(str, projection.skipped_tp))} skipped: {why} (reasons in --json)")

    print("\nlayouts: where they come from and what is assumed")
    for name, info in report.layouts.items():
        print(f"  {name}: {info.parameters / 1e9:.4g}B parameters, {info.blocks} blocks, "
              f"{info.blocks_with_attention} with attention; {info.source or 'a reffuse model'}")
        for assumption in info.assumptions:
            print(f"    ASSUMPTION: {assumption}")

    print(f"\nhardware {hw.name}: peak {hw.peak_flops / 1e12:.4g} TFLOP/s, memory {hw.memory_bandwidth / 1e9:.4g}"
          f" GB/s, {hw.kernel_overhead * 1e6:.3g} us per kernel, kernels {hw.kernels}, all-reduce alpha "
          + (f"{hw.allreduce_alpha * 1e6:.3g} us/step, link {hw.link_bandwidth / 1e9:.4g} GB/s"
             if hw.allreduce_alpha is not None else "unknown"))
    for source in hw.sources:
        print(f"  source: {source}")

    if report.measured:
        print_measured(report.measured)
    print("\n" + report.left_out)


def print_measured(measured: MeasuredRuns) -> None:
    cal = measured.hardware.calibration
    mpi = cal.mpi_allreduce
    load = "" if cal.load_average is None else f" at load average {cal.load_average:.1f}"
    print(f"\nthis machine, calibrated in {cal.calibration_seconds:.1f} s{load}: {cal.cores} cores; GEMM "
          f"{cal.gemm_flops_1_thread / 1e9:.3g} GFLOP/s on 1 thread, {cal.gemm_flops_all_threads / 1e9:.3g} on "
          f"all; GEMV {cal.gemv_bandwidth_1_thread / 1e9:.3g} GB/s on 1 thread, machine "
          f"{cal.machine_bandwidth / 1e9:.3g} GB/s; {cal.numpy_call_seconds * 1e6:.3g} us per NumPy call; "
          + (f"MPI all-reduce alpha {mpi.alpha * 1e6:.3g} us/step, beta {mpi.link_bandwidth / 1e9:.3g} GB/s"
             if mpi.available else f"MPI not measured ({mpi.reason})"))
    print("measured (reffuse tp, rank 0, medians) vs predicted, per forward; 'rest' is the forward less its "
          "all-reduces")
    rows = [[r.model, r.ranks, r.variant, r.phase,
             f"{r.measured_allreduce_count:g} / {r.predicted_allreduce_count}",
             f"{_ms(r.measured_seconds)} / {_ms(r.predicted_seconds)}", f"{r.measured_over_predicted:.2f}",
             f"{_ms(r.measured_compute_seconds)} / {_ms(r.predicted_compute_seconds)}",
             f"{_ms(r.measured_allreduce_seconds)} / {_ms(r.predicted_allreduce_seconds)}",
             "-" if r.load_average is None else f"{r.load_average:.1f}"] for r in measured.rows]
    print(format_table(["model", "N", "variant", "phase", "all-reduces", "total ms", "measured/model", "rest ms",
                        "all-reduce ms", "load"], rows))
    print("(columns with two numbers: measured / model)")
    print("(at N=1 reffuse tp still calls MPI's Allreduce on its one rank, which returns at once; the model counts "
          "no all-reduce there)")
