"""Every figure in figures/, drawn from the committed results, deterministically (what `reffuse figures` runs).

Nothing is measured again: figures of timings are drawn from the benchmark results committed in
benchmarks/results/, figures of model analysis from the JSON committed in reports/ (both written by the commands
named below). The same inputs give the same bytes: the Agg backend, fixed sizes, no PNG metadata
(reffuse.plots.save_figure), and sorted inputs. figures.json beside the PNGs records the matplotlib and FreeType
versions that drew them and a digest of the data each shows. tests/plots/test_figures.py runs this twice and compares
the bytes with each other, and with the committed figures/ where the versions match (else the data shown).

    figure                               drawn by                                 from (made by)
    dependency_heatmap.png               plots.dependency.dependency_heatmap      reports/analysis/smollm2/analysis.json
    block_metrics.png                    plots.dependency.block_metrics_figure      (reffuse analyze)
    windows.png                          plots.dependency.window_figure
    layout_before_after.png              plots.layout.layout_figure               benchmarks/results/tp_smollm2_n3.json
                                                                                    (its attention removal and groups)
    fusion_intensity.png                 plots.experiments.fusion_intensity_figure  reports/experiments/smollm2/
    removal_vs_fusion.png                plots.experiments.removal_vs_fusion_figure   experiments.json (reffuse experiments)
    ffn_speed_vs_tokens.png              plots.speed.ffn_speed_figure             benchmarks/results/bench_smollm2.json
                                                                                    (reffuse bench)
    allreduce_counts.png                 plots.tp.allreduce_figure                benchmarks/results/tp_*.json
                                                                                    (mpiexec -n N reffuse tp)
    latency_model.png                    plots.costmodel.tp_projection_figure     benchmarks/results/costmodel.json
    costmodel_measured_vs_predicted.png  plots.costmodel.measured_vs_predicted      (reffuse costmodel)

"""

from __future__ import annotations

import json
from pathlib import Path

from reffuse.core.layout import contiguous_ranges, format_groups
from reffuse.errors import ReffuseError
from reffuse.files import read_json
from reffuse.plots import data_digest, drawing_versions, save_figure
from reffuse.plots.costmodel import measured_vs_predicted_figure, tp_projection_figure
from reffuse.plots.dependency import block_metrics_figure, window_figure
from reffuse.plots.dependency import dependency_heatmap as heatmap
from reffuse.plots.experiments import fusion_intensity_figure, removal_vs_fusion_figure
from reffuse.plots.layout import layout_figure
from reffuse.plots.speed import ffn_speed_figure
from reffuse.plots.tp import allreduce_figure
from reffuse.speed.costmodel import fuse_layout, get_layout, tp_run_layout

MANIFEST = "figures.json"  # the versions that drew the PNGs, and a digest of the data each one shows


def default_root() -> Path:
    """The checkout that holds benchmarks/ and reports/: the one this package lives in, else the working folder."""
    package_checkout = Path(__file__).resolve().parents[2]
    if (package_checkout / "benchmarks").is_dir():
        return package_checkout
    return Path.cwd()


def committed(root: Path, relative: str, made_by: str):
    """A committed result under `root`, made by the command `made_by`."""
    return read_json(root / relative, f"it is the committed output of `{made_by}`; run that command (or check out "
                     "the repository with its results) before drawing figures")


# ---------------------------------------------------------------------------------------------------------------
# One function per figure: root folder -> matplotlib figure


def allreduce_counts(root: Path):
    paths = sorted((root / "benchmarks" / "results").glob("tp_*.json"))
    if not paths:
        raise ReffuseError(f"no tp_*.json in {root / 'benchmarks' / 'results'}: they are the committed output of "
                           "`mpiexec -n N reffuse tp --json` (benchmarks/results/tp.md lists the commands)")
    results = [read_json(p, "it is the output of `reffuse tp --json`: run it again") for p in paths]
    results.sort(key=lambda r: (r["model"], r["ranks"], r["allreduce"]))
    return allreduce_figure(results)


ANALYSIS_JSON = "reports/analysis/smollm2/analysis.json"
ANALYSIS_COMMAND = "reffuse analyze --model smollm2 --out reports/analysis/smollm2"


def analysis_of(root: Path) -> dict:
    return committed(root, ANALYSIS_JSON, ANALYSIS_COMMAND)


def analysis_title(analysis: dict) -> str:
    return f"{analysis['model']['name']} ({analysis['tokens']['measured']} tokens)"


def dependency_heatmap(root: Path):
    analysis = analysis_of(root)
    return heatmap(analysis["dependency"]["block"], f"Dependency between blocks, {analysis_title(analysis)}",
                   analysis["attention_removed"])


def block_metrics(root: Path):
    analysis = analysis_of(root)
    attention_free = [row["block"] for row in analysis["model"]["layout"] if not row["attention"]]
    return block_metrics_figure(analysis["per_block"], f"Per-block metrics, {analysis_title(analysis)}",
                                attention_free)


def windows(root: Path):
    analysis = analysis_of(root)
    stats = analysis["windows"]
    return window_figure(stats["rows"], analysis["greedy"]["steps"],
                         f"M_max and M_sum of every window of {stats['length']} blocks, greedy choices, "
                         f"{analysis_title(analysis)}", stats["length"])


BENCH_JSON = "benchmarks/results/bench_smollm2.json"
BENCH_COMMAND = "reffuse bench --model smollm2 --json --out benchmarks/results/bench_smollm2.json"


def ffn_speed_vs_tokens(root: Path):
    return ffn_speed_figure(committed(root, BENCH_JSON, BENCH_COMMAND),
                            "Fused vs sequential run of 8 SmolLM2 FFNs, by token count")


EXPERIMENTS_JSON = "reports/experiments/smollm2/experiments.json"
EXPERIMENTS_COMMAND = "reffuse experiments --out reports/experiments/smollm2"


def experiments_of(root: Path) -> dict:
    return committed(root, EXPERIMENTS_JSON, EXPERIMENTS_COMMAND)


def fusion_intensity(root: Path):
    return fusion_intensity_figure(experiments_of(root))


def removal_vs_fusion(root: Path):
    return removal_vs_fusion_figure(experiments_of(root))


TP_SMOLLM2_JSON = "benchmarks/results/tp_smollm2_n3.json"
TP_SMOLLM2_COMMAND = "mpiexec -n 3 reffuse tp --model smollm2 --json (benchmarks/results/tp.md)"


def layout_before_after(root: Path):
    """SmolLM2 as it is, with attention removed, and fused, as the committed `reffuse tp` run on SmolLM2 did it."""
    result = committed(root, TP_SMOLLM2_JSON, TP_SMOLLM2_COMMAND)
    removed = tp_run_layout(result)                   # attention removed where the run says, its groups to fuse
    removed_text = ",".join(f"{a}-{b}" for a, b in contiguous_ranges(result["attention_removed"]))
    panels = {"SmolLM2-135M as trained": get_layout("smollm2"),
              f"attention removed in blocks {removed_text}": removed,
              f"FFNs {format_groups(result['groups'])} fused into one wide FFN (Theorem 3.1)": fuse_layout(removed)}
    return layout_figure({label: layout.rows() for label, layout in panels.items()},
                         "Block layout before and after fusion (SmolLM2)")


COSTMODEL_JSON = "benchmarks/results/costmodel.json"
COSTMODEL_COMMAND = "reffuse costmodel --json (benchmarks/results/README.md has the exact command)"


def costmodel_of(root: Path) -> dict:
    return committed(root, COSTMODEL_JSON, COSTMODEL_COMMAND)


def latency_model(root: Path):
    return tp_projection_figure(costmodel_of(root))


def costmodel_measured_vs_predicted(root: Path):
    return measured_vs_predicted_figure(costmodel_of(root))


FIGURES = {
    "dependency_heatmap.png": dependency_heatmap,
    "block_metrics.png": block_metrics,
    "windows.png": windows,
    "layout_before_after.png": layout_before_after,
    "fusion_intensity.png": fusion_intensity,
    "removal_vs_fusion.png": removal_vs_fusion,
    "ffn_speed_vs_tokens.png": ffn_speed_vs_tokens,
    "allreduce_counts.png": allreduce_counts,
    "latency_model.png": latency_model,
    "costmodel_measured_vs_predicted.png": costmodel_measured_vs_predicted,
}


def draw_figures(out: Path, root: Path, names=None) -> list[Path]:
    """Draw the figures `names` (default: all) from the results under `root` into `out`, with the manifest;
    returns the paths written."""
    names = list(FIGURES) if names is None else names
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ReffuseError(f"unknown figure(s) {', '.join(unknown)}: choose from {', '.join(FIGURES)}")
    manifest = {"versions": drawing_versions(), "data_sha256": {}}
    written = []
    for name in names:
        fig = FIGURES[name](root)
        manifest["data_sha256"][name] = data_digest(fig)
        written.append(save_figure(fig, out / name))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return written + [out / MANIFEST]
