"""Every figure in figures/, drawn from the results committed in benchmarks/results/ and reports/ (what
`reffuse figures` runs; its --help has the table of figures and sources).

Nothing is measured again, and the same inputs give the same bytes (reffuse.plots.save_figure). FIGURES maps
each PNG to the function that draws it, SOURCES each committed result to the command that made it; the
manifest figures.json records the versions that drew the PNGs and a digest of the data each one shows.
"""

from __future__ import annotations

import json
from pathlib import Path

from reffuse.core.layout import contiguous_ranges, format_groups
from reffuse.errors import ReffuseError
from reffuse.experiments.findings import StudyResult
from reffuse.files import read_json
from reffuse.method.analysis import Analysis
from reffuse.outputs import check_output_folder, write_text_atomic
from reffuse.plots import data_digest, drawing_versions, save_figure
from reffuse.plots.costmodel import measured_vs_predicted_figure, tp_projection_figure
from reffuse.plots.dependency import block_metrics_figure, window_figure
from reffuse.plots.dependency import dependency_heatmap as heatmap
from reffuse.plots.experiments import fusion_intensity_figure, removal_vs_fusion_figure
from reffuse.plots.layout import layout_figure
from reffuse.plots.speed import ffn_speed_figure
from reffuse.plots.tp import allreduce_figure
from reffuse.speed.bench_result import BenchResult
from reffuse.speed.costmodel import fuse_layout, get_layout, tp_run_layout
from reffuse.speed.costmodel.report import CostmodelReport
from reffuse.speed.tp_result import TpResult

MANIFEST = "figures.json"  # the versions that drew the PNGs, and a digest of the data each one shows


# The committed results the figures are drawn from: name -> (path under the checkout, the command that made it).
SOURCES = {
    "analysis": ("reports/analysis/smollm2/analysis.json",
                 "reffuse analyze --model smollm2 --out reports/analysis/smollm2"),
    "bench": ("benchmarks/results/bench_smollm2.json",
              "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE reffuse bench --model smollm2 --threads 2 --repeats 11 "
              "--against llama.cpp --out benchmarks/results/bench_smollm2.json"),  # OpenBLAS's own choice of kernels
    "experiments": ("reports/experiments/smollm2/experiments.json",
                    "reffuse experiments --out reports/experiments/smollm2"),
    "tp_smollm2": ("benchmarks/results/tp_smollm2_n3.json",
                   "mpiexec -n 3 reffuse tp --model smollm2 --json (benchmarks/results/tp.md)"),
    "costmodel": ("benchmarks/results/costmodel.json",
                  "reffuse costmodel --json (benchmarks/results/costmodel.md has the exact command)"),
}


def committed(root: Path, source: str):
    """The committed result `source` (a key of SOURCES) under `root`."""
    relative, made_by = SOURCES[source]
    return read_json(root / relative, f"it is the committed output of `{made_by}`; run that command (or check out "
                     "the repository with its results) before drawing figures")


# ---------------------------------------------------------------------------------------------------------------
# One function per figure: root folder -> matplotlib figure


def study(root: Path) -> StudyResult:
    return StudyResult.from_json(committed(root, "experiments"))


def costmodel(root: Path) -> CostmodelReport:
    return CostmodelReport.from_json(committed(root, "costmodel"))


def allreduce_counts(root: Path):
    paths = sorted((root / "benchmarks" / "results").glob("tp_*.json"))
    if not paths:
        raise ReffuseError(f"no tp_*.json in {root / 'benchmarks' / 'results'}: they are the committed output of "
                           "`mpiexec -n N reffuse tp --json` (benchmarks/results/tp.md lists the commands)")
    results = [TpResult.from_json(read_json(p, "it is the output of `reffuse tp --json`: run it again")) for p in paths]
    results.sort(key=lambda r: (r.model, r.ranks, r.allreduce))
    return allreduce_figure(results)


def analysis_title(analysis: Analysis) -> str:
    return f"{analysis.model.name} ({analysis.tokens.measured} tokens)"


def dependency_heatmap(root: Path):
    analysis = Analysis.from_json(committed(root, "analysis"))
    return heatmap(analysis.dependency.block, f"Dependency between blocks, {analysis_title(analysis)}",
                   analysis.attention_removed)


def block_metrics(root: Path):
    analysis = Analysis.from_json(committed(root, "analysis"))
    return block_metrics_figure(analysis.per_block, f"Per-block metrics, {analysis_title(analysis)}",
                                analysis.attention_free_blocks())


def windows(root: Path):
    analysis = Analysis.from_json(committed(root, "analysis"))
    stats = analysis.windows
    return window_figure(stats.rows, analysis.greedy.steps,
                         f"M_max and M_sum of every window of {stats.length} blocks, greedy choices, "
                         f"{analysis_title(analysis)}", stats.length)


def ffn_speed_vs_tokens(root: Path):
    return ffn_speed_figure(BenchResult.from_json(committed(root, "bench")),
                            "Fused vs sequential run of 8 SmolLM2 FFNs, by token count")


def layout_before_after(root: Path):
    """SmolLM2 as it is, with attention removed, and fused, as the committed `reffuse tp` run on SmolLM2 did it."""
    result = TpResult.from_json(committed(root, "tp_smollm2"))
    removed = tp_run_layout(result)                   # attention removed where the run says, its groups to fuse
    removed_text = format_groups(contiguous_ranges(result.attention_removed))
    panels = {"SmolLM2-135M as trained": get_layout("smollm2"),
              f"attention removed in blocks {removed_text}": removed,
              f"FFNs {format_groups(result.groups)} fused into one wide FFN (Theorem 3.1)": fuse_layout(removed)}
    return layout_figure({label: layout.blocks for label, layout in panels.items()},
                         "Block layout before and after fusion (SmolLM2)")


FIGURES = {
    "dependency_heatmap.png": dependency_heatmap,
    "block_metrics.png": block_metrics,
    "windows.png": windows,
    "layout_before_after.png": layout_before_after,
    "fusion_intensity.png": lambda root: fusion_intensity_figure(study(root)),
    "removal_vs_fusion.png": lambda root: removal_vs_fusion_figure(study(root)),
    "ffn_speed_vs_tokens.png": ffn_speed_vs_tokens,
    "allreduce_counts.png": allreduce_counts,
    "latency_model.png": lambda root: tp_projection_figure(costmodel(root)),
    "costmodel_measured_vs_predicted.png": lambda root: measured_vs_predicted_figure(costmodel(root)),
}


def draw_figures(out: Path, root: Path, names=None) -> list[Path]:
    """Draw the figures `names` (default: all) from the results under `root` into `out`, with the manifest;
    returns the paths written."""
    names = list(FIGURES) if names is None else names
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ReffuseError(f"unknown figure(s) {', '.join(unknown)}: choose from {', '.join(FIGURES)}")
    check_output_folder(out, overwrite=True, what="figure set")
    manifest = {"versions": drawing_versions(), "data_sha256": {}}
    written = []
    for name in names:
        fig = FIGURES[name](root)
        manifest["data_sha256"][name] = data_digest(fig)
        written.append(save_figure(fig, out / name))
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return written + [out / MANIFEST]
