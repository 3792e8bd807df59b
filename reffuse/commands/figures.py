"""Regenerate every figure in figures/ from the committed results, deterministically.

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

examples:
  reffuse figures --out figures/
  reffuse figures --out /tmp/check --only dependency_heatmap.png,latency_model.png
"""

from __future__ import annotations

import json
from pathlib import Path

from reffuse.errors import ReffuseError
from reffuse.plots import data_digest, drawing_versions, save_figure

MANIFEST = "figures.json"  # the versions that drew the PNGs, and a digest of the data each one shows

HELP = "redraw every figure in figures/ from the committed results (deterministic PNGs)"


def default_root() -> Path:
    """The checkout that holds benchmarks/ and reports/: the one this package lives in, else the working folder."""
    package_checkout = Path(__file__).resolve().parents[2]
    if (package_checkout / "benchmarks").is_dir():
        return package_checkout
    return Path.cwd()


def add_arguments(parser):
    parser.add_argument("--out", required=True, type=Path, help="folder to write the PNGs into (created if needed)")
    parser.add_argument("--root", type=Path, default=None,
                        help="the checkout holding benchmarks/results and reports (default: this package's checkout)")
    parser.add_argument("--only", default=None,
                        help="comma-separated figure names to draw (default: all); see the table above")


def read_json(root: Path, relative: str, made_by: str):
    path = root / relative
    if not path.is_file():
        raise ReffuseError(f"{path} is missing: it is the committed output of `{made_by}`; run that command (or check "
                           "out the repository with its results) before drawing figures")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReffuseError(f"{path} is not valid JSON ({e}): rerun `{made_by}` to write it again") from None


# ---------------------------------------------------------------------------------------------------------------
# One function per figure: root folder -> matplotlib figure


def allreduce_counts(root: Path):
    from reffuse.plots.tp import allreduce_figure

    paths = sorted((root / "benchmarks" / "results").glob("tp_*.json"))
    if not paths:
        raise ReffuseError(f"no tp_*.json in {root / 'benchmarks' / 'results'}: they are the committed output of "
                           "`mpiexec -n N reffuse tp --json` (benchmarks/results/tp.md lists the commands)")
    results = [json.loads(p.read_text()) for p in paths]
    results.sort(key=lambda r: (r["model"], r["ranks"], r["allreduce"]))
    return allreduce_figure(results)


ANALYSIS_JSON = "reports/analysis/smollm2/analysis.json"
ANALYSIS_COMMAND = "reffuse analyze --model smollm2 --out reports/analysis/smollm2"


def analysis_title(analysis: dict) -> str:
    return f"{analysis['model']['name']} ({analysis['tokens']['measured']} tokens)"


def dependency_heatmap(root: Path):
    from reffuse.plots.dependency import dependency_heatmap as heatmap

    analysis = read_json(root, ANALYSIS_JSON, ANALYSIS_COMMAND)
    return heatmap(analysis["dependency"]["block"], f"Dependency between blocks, {analysis_title(analysis)}",
                   analysis["attention_removed"])


def block_metrics(root: Path):
    from reffuse.plots.dependency import block_metrics_figure

    analysis = read_json(root, ANALYSIS_JSON, ANALYSIS_COMMAND)
    attention_free = [row["block"] for row in analysis["model"]["layout"] if not row["attention"]]
    return block_metrics_figure(analysis["per_block"], f"Per-block metrics, {analysis_title(analysis)}",
                                attention_free)


def windows(root: Path):
    from reffuse.plots.dependency import window_figure

    analysis = read_json(root, ANALYSIS_JSON, ANALYSIS_COMMAND)
    stats = analysis["windows"]
    return window_figure(stats["rows"], analysis["greedy"]["steps"],
                         f"M_max and M_sum of every window of {stats['length']} blocks, greedy choices, "
                         f"{analysis_title(analysis)}", stats["length"])


BENCH_JSON = "benchmarks/results/bench_smollm2.json"
BENCH_COMMAND = "reffuse bench --model smollm2 --json --out benchmarks/results/bench_smollm2.json"


def ffn_speed_vs_tokens(root: Path):
    from reffuse.plots.speed import ffn_speed_figure

    return ffn_speed_figure(read_json(root, BENCH_JSON, BENCH_COMMAND),
                            "Fused vs sequential run of 8 SmolLM2 FFNs, by token count")


EXPERIMENTS_JSON = "reports/experiments/smollm2/experiments.json"
EXPERIMENTS_COMMAND = "reffuse experiments --out reports/experiments/smollm2"


def fusion_intensity(root: Path):
    from reffuse.plots.experiments import fusion_intensity_figure

    return fusion_intensity_figure(read_json(root, EXPERIMENTS_JSON, EXPERIMENTS_COMMAND))


def removal_vs_fusion(root: Path):
    from reffuse.plots.experiments import removal_vs_fusion_figure

    return removal_vs_fusion_figure(read_json(root, EXPERIMENTS_JSON, EXPERIMENTS_COMMAND))


TP_SMOLLM2_JSON = "benchmarks/results/tp_smollm2_n3.json"
TP_SMOLLM2_COMMAND = "mpiexec -n 3 reffuse tp --model smollm2 --json (benchmarks/results/tp.md)"


def layout_before_after(root: Path):
    """SmolLM2 as it is, with attention removed, and fused, as the committed `reffuse tp` run on SmolLM2 did it."""
    from reffuse.speed.costmodel import fuse_layout, get_layout, tp_run_layout
    from reffuse.plots.dependency import contiguous_ranges
    from reffuse.plots.layout import layout_figure

    result = read_json(root, TP_SMOLLM2_JSON, TP_SMOLLM2_COMMAND)
    removed = tp_run_layout(result)                   # attention removed where the run says, its groups to fuse
    removed_text = ",".join(f"{a}-{b}" for a, b in contiguous_ranges(result["attention_removed"]))
    groups_text = ",".join(f"{a}-{b}" for a, b in result["groups"])
    panels = {"SmolLM2-135M as trained": get_layout("smollm2"),
              f"attention removed in blocks {removed_text}": removed,
              f"FFNs {groups_text} fused into one wide FFN (Theorem 3.1)": fuse_layout(removed)}
    return layout_figure({label: layout.rows() for label, layout in panels.items()},
                         "Block layout before and after fusion (SmolLM2)")


COSTMODEL_JSON = "benchmarks/results/costmodel.json"
COSTMODEL_COMMAND = "reffuse costmodel --json (benchmarks/results/README.md has the exact command)"


def latency_model(root: Path):
    from reffuse.plots.costmodel import tp_projection_figure

    return tp_projection_figure(read_json(root, COSTMODEL_JSON, COSTMODEL_COMMAND))


def costmodel_measured_vs_predicted(root: Path):
    from reffuse.plots.costmodel import measured_vs_predicted_figure

    return measured_vs_predicted_figure(read_json(root, COSTMODEL_JSON, COSTMODEL_COMMAND))


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


def run(args) -> int:
    root = (args.root or default_root()).resolve()
    names = list(FIGURES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in FIGURES]
        if unknown:
            raise ReffuseError(f"unknown figure(s) {', '.join(unknown)}: choose from {', '.join(FIGURES)}")
    manifest = {"versions": drawing_versions(), "data_sha256": {}}
    for name in names:
        fig = FIGURES[name](root)
        manifest["data_sha256"][name] = data_digest(fig)
        print(save_figure(fig, args.out / name))
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(args.out / MANIFEST)
    return 0
