"""The report of `reffuse costmodel`: the paper comparison, TP projections, layouts, and predictions for this
machine's `reffuse tp` runs beside what they measured."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from reffuse.core.layout import Layout
from reffuse.errors import ReffuseError
from reffuse.files import read_json
from reffuse.progress import note
from reffuse.records import as_tuple, present_fields, records_of
from reffuse.speed.costmodel.calibration import calibrate_cpu, get_hardware
from reffuse.speed.costmodel.hardware import Calibration, HardwareRecord, cpu_hardware
from reffuse.speed.costmodel.latency import Projection, decode_projection, parameter_count
from reffuse.speed.costmodel.paper import (LEFT_OUT, PAPER_TABLE2, PaperComparison, PaperGrid, SensitivityRow,
                                           paper_comparison, paper_grid, paper_sensitivity)
from reffuse.speed.costmodel.presets import get_layout
from reffuse.speed.costmodel.tp_runs import TpRunPrediction, predict_tp_run
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


def recorded_calibration(path) -> Calibration:
    """The CPU calibration in a `reffuse costmodel --json` output."""
    report = read_json(path, "--calibration takes the --json output of an earlier `reffuse costmodel` run")
    for hardware in ((report.get("measured") or {}).get("hardware"), report.get("hardware")):
        if hardware and hardware.get("calibration"):
            return Calibration.from_json(hardware["calibration"])
    raise ReffuseError(f"--calibration {path} holds no CPU calibration: it must be the --json output of a "
                       "`reffuse costmodel` run with --hardware cpu or --measured")


@dataclass(frozen=True)
class Setting:
    """What the projections were asked for."""
    context: int                        # cached positions while decoding
    batch: int                          # sequences decoded together
    max_tp: int                         # TP degrees 1..max_tp were projected

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> Setting:
        return cls(raw["context"], raw["batch"], raw["max_tp"])


@dataclass(frozen=True)
class LayoutSummary:
    """A layout the report projects: where it comes from, what is assumed, its size."""
    source: str
    assumptions: tuple[str, ...]
    parameters: int
    blocks: int
    blocks_with_attention: int
    fusion_groups: tuple[tuple[int, int], ...]  # the groups its fused variant fuses

    @classmethod
    def of(cls, layout: Layout) -> LayoutSummary:
        return cls(layout.source, tuple(layout.assumptions), parameter_count(layout), len(layout.blocks),
                   sum(b.attention for b in layout.blocks), tuple(tuple(g) for g in layout.fusion_groups))

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> LayoutSummary:
        return cls(raw["source"], tuple(raw["assumptions"]), raw["parameters"], raw["blocks"],
                   raw["blocks_with_attention"], as_tuple(raw["fusion_groups"]))


@dataclass(frozen=True)
class MeasuredRuns:
    """`reffuse tp` runs on this machine beside the model's predictions, on the calibrated `cpu` hardware."""
    hardware: HardwareRecord
    rows: tuple[TpRunPrediction, ...]

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> MeasuredRuns:
        return cls(HardwareRecord.from_json(raw["hardware"]), tuple(TpRunPrediction.from_json(r) for r in raw["rows"]))


@dataclass(frozen=True)
class CostmodelReport:
    """What `reffuse costmodel` prints, and its --json (benchmarks/results/costmodel.json)."""
    setting: Setting
    paper_comparison: PaperComparison
    paper_sensitivity: tuple[SensitivityRow, ...]
    paper_grid: PaperGrid
    hardware: HardwareRecord            # of the projections
    projections: tuple[Projection, ...]     # one per --model
    layouts: dict[str, LayoutSummary]   # layout name -> its summary: the projected ones and Table 2's
    measured: MeasuredRuns | None       # None without --measured
    left_out: str                       # what the model leaves out (paper.LEFT_OUT)

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("measured",))

    @classmethod
    def from_json(cls, raw: dict) -> CostmodelReport:
        return cls(Setting.from_json(raw["setting"]), PaperComparison.from_json(raw["paper_comparison"]),
                   tuple(SensitivityRow.from_json(r) for r in raw["paper_sensitivity"]),
                   PaperGrid.from_json(raw["paper_grid"]), HardwareRecord.from_json(raw["hardware"]),
                   tuple(Projection.from_json(p) for p in raw["projections"]),
                   records_of(LayoutSummary, raw["layouts"]),
                   None if raw["measured"] is None else MeasuredRuns.from_json(raw["measured"]), raw["left_out"])


def costmodel_report(models, groups=None, hardware: str = "h100-sxm", max_tp: int = 8, context: int = 1024,
                     batch: int = 1, measured=(), calibration=None, mpi: bool = True) -> CostmodelReport:
    """What `reffuse costmodel` prints: the paper comparison, its sensitivity and its grid, decode projected at
    TP 1..max_tp for each of `models` on `hardware`, their layouts, and (with `measured` tp results) this
    machine's predictions beside the measured times. `calibration`: a recorded costmodel JSON to reuse instead of
    calibrating the CPU."""
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

    runs = None
    if tp_results:
        rows = tuple(dataclasses.replace(row, file=path) for path, result in tp_results
                     for row in predict_tp_run(result, cpu))
        runs = MeasuredRuns(cpu.describe(), rows)
    return CostmodelReport(
        setting=Setting(context, batch, max_tp),
        paper_comparison=paper_comparison(context=context),
        paper_sensitivity=paper_sensitivity(context=context),
        paper_grid=paper_grid(context=context),
        hardware=chosen.describe(),
        projections=tuple(decode_projection(layout, chosen, range(1, max_tp + 1), context, batch)
                          for layout in layouts),
        layouts={layout.name: LayoutSummary.of(layout)
                 for layout in layouts + [get_layout(name) for name in PAPER_TABLE2]},
        measured=runs,
        left_out=LEFT_OUT)
