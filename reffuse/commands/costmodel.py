"""A decode-latency model at the paper's scale: what fusion saves under tensor parallelism, and why.

Per layer, time = max(FLOPs / peak, bytes / bandwidth) + kernels × kernel overhead, plus an alpha-beta ring
all-reduce after every row-parallel layer (2 per full block, 1 per FFN-only block, 1 per fused FFN group).
The model is in reffuse/costmodel.py, every assumption named there.

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
  mpiexec -n 2 reffuse tp --model tiny --json > tp_tiny_n2.json
  reffuse costmodel --measured tp_tiny_n2.json
  reffuse costmodel --measured tp_tiny_n2.json --calibration benchmarks/results/costmodel.json
"""

from __future__ import annotations

import json
from pathlib import Path

from reffuse.speed.costmodel import (HARDWARE_PRESETS, LEFT_OUT, MODEL_PRESETS, PAPER_TABLE2, calibrate_cpu, cpu_hardware,
                         decode_projection, get_hardware, get_layout, paper_comparison, paper_sensitivity,
                         parameter_count, predict_tp_run)
from reffuse.errors import ReffuseError
from reffuse.progress import note
from reffuse.commands.common import format_table, groups_argument, print_json

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
    parser.add_argument("--max-tp", type=int, default=8, help="project TP degrees 1..MAX_TP (default 8)")
    parser.add_argument("--context", type=int, default=1024,
                        help="positions in the KV cache while decoding (default 1024)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--measured", nargs="+", default=[], metavar="TP_JSON",
                        help="`reffuse tp --json` outputs: put this machine's predictions beside their times")
    parser.add_argument("--calibration", metavar="COSTMODEL_JSON", default=None,
                        help="reuse the CPU calibration recorded in an earlier `reffuse costmodel --json` output "
                             "instead of measuring again (e.g. benchmarks/results/costmodel.json)")
    parser.add_argument("--no-mpi", action="store_true",
                        help="calibrate the CPU without timing `mpiexec -n 2` (TP>1 then cannot be predicted)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def load_tp_results(paths) -> list[tuple[str, dict]]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ReffuseError(f"{path}: no such file (write it with `mpiexec -n N reffuse tp ... --json > FILE`)")
        except json.JSONDecodeError as e:
            raise ReffuseError(f"{path} is not the JSON that `reffuse tp --json` prints: {e}") from None
        missing = [key for key in ("ranks", "model", "tokens", "groups", "sequential", "fused") if key not in result]
        if missing:
            raise ReffuseError(f"{path} lacks {', '.join(missing)}: is it the output of `reffuse tp --json`?")
        results.append((str(path), result))
    return results


def recorded_calibration(path) -> dict:
    """The CPU calibration in a `reffuse costmodel --json` output."""
    try:
        report = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ReffuseError(f"--calibration {path}: cannot read it as JSON ({e})") from None
    for hardware in ((report.get("measured") or {}).get("hardware"), report.get("hardware")):
        if hardware and hardware.get("calibration"):
            return hardware["calibration"]
    raise ReffuseError(f"--calibration {path} holds no CPU calibration: it must be the --json output of a "
                       "`reffuse costmodel` run with --hardware cpu or --measured")


def run(args) -> int:
    if args.max_tp < 1 or args.context < 0 or args.batch < 1:
        raise ReffuseError("--max-tp and --batch must be at least 1 and --context at least 0")
    names = args.model or DEFAULT_MODELS
    if args.groups is not None and len(names) != 1:
        raise ReffuseError("--groups applies to one model: give exactly one --model with it")
    layouts = [get_layout(name, args.groups) for name in names]
    tp_results = load_tp_results(args.measured)

    cpu = None
    if args.calibration:
        cpu = cpu_hardware(recorded_calibration(args.calibration))
    elif args.hardware == "cpu" or tp_results:
        note("calibrating this CPU (GEMM, GEMV bandwidth, per-call overhead, MPI all-reduce): a few seconds")
        cpu = calibrate_cpu(mpi=not args.no_mpi)
    hardware = cpu if args.hardware == "cpu" else get_hardware(args.hardware)

    report = {
        "setting": {"context": args.context, "batch": args.batch, "max_tp": args.max_tp},
        "paper_comparison": paper_comparison(context=args.context),
        "paper_sensitivity": paper_sensitivity(context=args.context),
        "hardware": hardware.describe(),
        "projections": [decode_projection(layout, hardware, range(1, args.max_tp + 1), args.context, args.batch)
                        for layout in layouts],
        "layouts": {layout.name: {"source": layout.source, "assumptions": list(layout.assumptions),
                                  "parameters": parameter_count(layout), "blocks": len(layout.blocks),
                                  "blocks_with_attention": sum(b.attention for b in layout.blocks),
                                  "fusion_groups": [list(g) for g in layout.fusion_groups]}
                    for layout in layouts + [get_layout(name) for name in PAPER_TABLE2]},
        "measured": None,
        "left_out": LEFT_OUT,
    }
    if tp_results:
        rows = [row | {"file": path} for path, result in tp_results for row in predict_tp_run(result, cpu)]
        report["measured"] = {"hardware": cpu.describe(), "rows": rows}
    if args.json:
        print_json(report)
    else:
        print_report(report)
    return 0


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}"


def print_report(report: dict) -> None:
    paper = report["paper_comparison"]
    print(f"Llama-3.1-405B -> 253B PreFusion -> 253B fused: single-user decode at TP{paper['tp']} on 8 x H100 SXM, "
          f"{paper['precision'].upper()} weights, BF16 activations and KV cache, {paper['context']} cached positions")
    rows = [[r["model"], f"{r['parameters'] / 1e9:.1f}B", r["allreduce_count"], r["kernels"],
             f"{r['weight_bytes_per_device'] / 1e9:.1f}", _ms(r["roofline_seconds"]),
             _ms(r["kernel_overhead_seconds"]), _ms(r["allreduce_seconds"]), _ms(r["seconds"]),
             f"{r['tokens_per_second']:.2f}", f"{r['paper_tokens_per_second']:.2f}",
             f"{r['projected_speedup']:.2f}x", f"{r['paper_speedup']:.2f}x"] for r in paper["rows"]]
    print(format_table(["model", "params", "all-reduces", "kernels", "GB/GPU", "roofline ms", "overhead ms",
                        "all-reduce ms", "ms/token", "tok/s model", "tok/s paper", "speedup model",
                        "speedup paper"], rows))
    fusion = paper["fusion_alone"]
    print(f"fusion alone (fused / PreFusion): model {fusion['projected']:.3f}x, paper {fusion['paper']:.3f}x\n")

    print("how the ratios move with each chosen number (tokens/s: 405B / PreFusion / fused)")
    print(format_table(["variant", "tokens/s", "PreFusion", "fused", "fusion alone"],
                       [[r["variant"], " / ".join(f"{t:.1f}" for t in r["tokens_per_second"]),
                         f"{r['prefusion_speedup']:.3f}x", f"{r['fused_speedup']:.3f}x", f"{r['fusion_alone']:.3f}x"]
                        for r in report["paper_sensitivity"]]) + "\n")

    hw = report["hardware"]
    setting = report["setting"]
    who = "single-user decode" if setting["batch"] == 1 else \
        f"decode of {setting['batch']} sequences at once (tokens/s counts them all)"
    print(f"projected {who} on {hw['name']} ({hw['precision']} weights), context {setting['context']}")
    for projection in report["projections"]:
        print(f"\n{projection['model']}: {projection['parameters'] / 1e9:.4g}B parameters, {projection['blocks']} "
              f"blocks -> {projection['fused_blocks']} after fusing {projection['fusion_groups'] or 'nothing'}")
        rows = [[r["tp"], r["sequential"]["allreduce_count"], r["fused"]["allreduce_count"],
                 _ms(r["sequential"]["seconds"]), _ms(r["fused"]["seconds"]),
                 f"{r['sequential']['tokens_per_second']:.4g}", f"{r['fused']['tokens_per_second']:.4g}",
                 f"{r['fusion_speedup']:.3f}x",
                 {True: "yes", False: "no", None: "-"}[r["sequential"]["fits_in_memory"]]]
                for r in projection["rows"]]
        print(format_table(["TP", "all-reduces seq", "all-reduces fused", "ms/token seq", "ms/token fused",
                            "tok/s seq", "tok/s fused", "fusion speedup", "weights fit"], rows))
        if projection["skipped_tp"]:
            reasons = sorted(set(projection["skipped_tp"].values()), key=len)
            why = reasons[0] if len(reasons) == 1 else "a head count or an FFN width does not divide by them"
            print(f"  TP {', '.join(projection['skipped_tp'])} skipped: {why} (reasons in --json)")

    print("\nlayouts: where they come from and what is assumed")
    for name, info in report["layouts"].items():
        print(f"  {name}: {info['parameters'] / 1e9:.4g}B parameters, {info['blocks']} blocks, "
              f"{info['blocks_with_attention']} with attention; {info['source'] or 'a reffuse model'}")
        for assumption in info["assumptions"]:
            print(f"    ASSUMPTION: {assumption}")

    print(f"\nhardware {hw['name']}: peak {hw['peak_flops'] / 1e12:.4g} TFLOP/s, memory {hw['memory_bandwidth'] / 1e9:.4g}"
          f" GB/s, {hw['kernel_overhead'] * 1e6:.3g} us per kernel, kernels {hw['kernels']}, all-reduce alpha "
          + (f"{hw['allreduce_alpha'] * 1e6:.3g} us/step, link {hw['link_bandwidth'] / 1e9:.4g} GB/s"
             if hw["allreduce_alpha"] is not None else "unknown"))
    for source in hw["sources"]:
        print(f"  source: {source}")

    if report["measured"]:
        print_measured(report["measured"])
    print("\n" + report["left_out"])


def print_measured(measured: dict) -> None:
    cal = measured["hardware"]["calibration"]
    mpi = cal["mpi_allreduce"]
    load = "" if cal.get("load_average") is None else f" at load average {cal['load_average']:.1f}"
    print(f"\nthis machine, calibrated in {cal['calibration_seconds']:.1f} s{load}: {cal['cores']} cores; GEMM "
          f"{cal['gemm_flops_1_thread'] / 1e9:.3g} GFLOP/s on 1 thread, {cal['gemm_flops_all_threads'] / 1e9:.3g} on "
          f"all; GEMV {cal['gemv_bandwidth_1_thread'] / 1e9:.3g} GB/s on 1 thread, machine "
          f"{cal['machine_bandwidth'] / 1e9:.3g} GB/s; {cal['numpy_call_seconds'] * 1e6:.3g} us per NumPy call; "
          + (f"MPI all-reduce alpha {mpi['alpha'] * 1e6:.3g} us/step, beta {mpi['link_bandwidth'] / 1e9:.3g} GB/s"
             if mpi["available"] else f"MPI not measured ({mpi['reason']})"))
    print("measured (reffuse tp, rank 0, medians) vs predicted, per forward; 'rest' is the forward less its "
          "all-reduces")
    rows = [[r["model"], r["ranks"], r["variant"], r["phase"],
             f"{r['measured_allreduce_count']:g} / {r['predicted_allreduce_count']}",
             f"{_ms(r['measured_seconds'])} / {_ms(r['predicted_seconds'])}", f"{r['measured_over_predicted']:.2f}",
             f"{_ms(r['measured_compute_seconds'])} / {_ms(r['predicted_compute_seconds'])}",
             f"{_ms(r['measured_allreduce_seconds'])} / {_ms(r['predicted_allreduce_seconds'])}",
             "-" if r.get("load_average") is None else f"{r['load_average']:.1f}"] for r in measured["rows"]]
    print(format_table(["model", "N", "variant", "phase", "all-reduces", "total ms", "measured/model", "rest ms",
                        "all-reduce ms", "load"], rows))
    print("(columns with two numbers: measured / model)")
    print("(at N=1 reffuse tp still calls MPI's Allreduce on its one rank, which returns at once; the model counts "
          "no all-reduce there)")
