"""Regenerate every figure in figures/ from the committed results, deterministically.

Nothing is measured again: figures of timings are drawn from the benchmark results committed in
benchmarks/results/, figures of model analysis from the JSON committed in reports/ (both written by the commands
named below). The same inputs give the same bytes: the Agg backend, fixed sizes, no PNG metadata
(reffuse.plots.save_figure), and sorted inputs. tests/test_figures.py runs this twice and compares the bytes with
each other and with the committed figures/.

    figure                         drawn by                                   from (made by)
    dependency_heatmap.png         plots.dependency.dependency_heatmap        reports/analysis (reffuse analyze)
    block_metrics.png              plots.dependency.block_metrics_figure      reports/analysis
    windows.png                    plots.dependency.window_figure             reports/analysis
    layout_before_after.png        plots.layout.layout_figure                 reports/analysis (its plan)
    fusion_intensity.png           plots.experiments                          reports/experiments (reffuse experiments)
    removal_vs_fusion.png          plots.experiments                          reports/experiments
    ffn_speed_vs_tokens.png        plots.speed                                benchmarks/results (reffuse bench)
    allreduce_counts.png           plots.tp.allreduce_figure                  benchmarks/results/tp_*.json (reffuse tp)
    latency_model.png              plots.costmodel.tp_projection_figure       benchmarks/results (reffuse costmodel)
    costmodel_measured_vs_predicted.png  plots.costmodel                      benchmarks/results (reffuse costmodel)

examples:
  reffuse figures --out figures/
  reffuse figures --out /tmp/check --only dependency_heatmap.png,latency_model.png
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ReffuseError
from ..plots import save_figure

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
    from ..plots.tp import allreduce_figure

    paths = sorted((root / "benchmarks" / "results").glob("tp_*.json"))
    if not paths:
        raise ReffuseError(f"no tp_*.json in {root / 'benchmarks' / 'results'}: they are the committed output of "
                           "`mpiexec -n N reffuse tp --json` (benchmarks/results/tp.md lists the commands)")
    results = [json.loads(p.read_text()) for p in paths]
    results.sort(key=lambda r: (r["model"], r["ranks"], r["allreduce"]))
    return allreduce_figure(results)


COSTMODEL_JSON = "benchmarks/results/costmodel.json"
COSTMODEL_COMMAND = "reffuse costmodel --json (benchmarks/results/README.md has the exact command)"


def latency_model(root: Path):
    from ..plots.costmodel import tp_projection_figure

    return tp_projection_figure(read_json(root, COSTMODEL_JSON, COSTMODEL_COMMAND))


def costmodel_measured_vs_predicted(root: Path):
    from ..plots.costmodel import measured_vs_predicted_figure

    return measured_vs_predicted_figure(read_json(root, COSTMODEL_JSON, COSTMODEL_COMMAND))


FIGURES = {
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
    for name in names:
        path = save_figure(FIGURES[name](root), args.out / name)
        print(path)
    return 0
