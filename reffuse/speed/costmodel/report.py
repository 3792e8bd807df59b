"""The report of `reffuse costmodel`: the paper comparison, TP projections, layouts, and predictions for this
machine's `reffuse tp` runs beside what they measured."""

from __future__ import annotations

from reffuse.errors import ReffuseError
from reffuse.files import read_json
from reffuse.progress import note
from reffuse.speed.costmodel.calibration import calibrate_cpu, get_hardware
from reffuse.speed.costmodel.hardware import cpu_hardware
from reffuse.speed.costmodel.latency import decode_projection, parameter_count
from reffuse.speed.costmodel.paper import LEFT_OUT, PAPER_TABLE2, paper_comparison, paper_grid, paper_sensitivity
from reffuse.speed.costmodel.presets import get_layout
from reffuse.speed.costmodel.tp_runs import predict_tp_run
from reffuse.speed.tp_result import TpResult


def read_tp_results(paths) -> list[tuple[str, TpResult]]:
    """(path, result) of each `reffuse tp --json` output."""
    results = []
    for path in paths:
        raw = read_json(path, "give the JSON that `mpiexec -n N reffuse tp ... --json > FILE` writes")
        if not isinstance(raw, dict):
            raise ReffuseError(f"{path} is not the JSON object that `reffuse tp --json` prints")
        try:
            results.append((str(path), TpResult.from_json(raw)))
        except KeyError as missing:
            raise ReffuseError(f"{path} lacks {missing}: is it the output of `reffuse tp --json`?") from None
    return results


def recorded_calibration(path) -> dict:
    """The CPU calibration in a `reffuse costmodel --json` output."""
    report = read_json(path, "--calibration takes the --json output of an earlier `reffuse costmodel` run")
    for hardware in ((report.get("measured") or {}).get("hardware"), report.get("hardware")):
        if hardware and hardware.get("calibration"):
            return hardware["calibration"]
    raise ReffuseError(f"--calibration {path} holds no CPU calibration: it must be the --json output of a "
                       "`reffuse costmodel` run with --hardware cpu or --measured")


def costmodel_report(models, groups=None, hardware: str = "h100-sxm", max_tp: int = 8, context: int = 1024,
                     batch: int = 1, measured=(), calibration=None, mpi: bool = True) -> dict:
    """What `reffuse costmodel` prints: the paper comparison, its sensitivity and its grid, decode projected at TP 1..max_tp
    for each of `models` on `hardware`, their layouts, and (with `measured` tp results) this machine's predictions
    beside the measured times. `calibration`: a recorded costmodel JSON to reuse instead of calibrating the CPU."""
    if max_tp < 1 or context < 0 or batch < 1:
        raise ReffuseError("--max-tp and --batch must be at least 1 and --context at least 0")
    if groups is not None and len(models) != 1:
        raise ReffuseError("--groups applies to one model: give exactly one --model with it")
    layouts = [get_layout(name, groups) for name in models]
    tp_results = read_tp_results(measured)

    cpu = None
    if calibration:
        cpu = cpu_hardware(recorded_calibration(calibration))
    elif hardware == "cpu" or tp_results:
        note("calibrating this CPU (GEMM, GEMV bandwidth, per-call overhead, MPI all-reduce): a few seconds")
        cpu = calibrate_cpu(mpi=mpi)
    chosen = cpu if hardware == "cpu" else get_hardware(hardware)

    report = {
        "setting": {"context": context, "batch": batch, "max_tp": max_tp},
        "paper_comparison": paper_comparison(context=context),
        "paper_sensitivity": paper_sensitivity(context=context),
        "paper_grid": paper_grid(context=context),
        "hardware": chosen.describe(),
        "projections": [decode_projection(layout, chosen, range(1, max_tp + 1), context, batch)
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
    return report
