"""Regenerate every figure in figures/ from the committed results, deterministically (reffuse.plots.committed).

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
    removal_vs_fusion.png                plots.experiments.removal_vs_fusion_figure   experiments.json
                                                                                    (reffuse experiments)
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

import os
import shutil
from pathlib import Path

from reffuse.commands.common import add_overwrite_argument
from reffuse.files import checkout_root, read_json
from reffuse.outputs import MARKER, check_output_folder, staged_folder
from reffuse.plots.committed import FIGURES, MANIFEST, draw_figures

HELP = "redraw every figure in figures/ from the committed results (deterministic PNGs)"
FIGURE_SET = "figure set"


def is_figure_set(folder: Path) -> bool:
    """A folder of figures with their manifest, written before folders were marked."""
    return set(read_json(folder / MANIFEST, "")) >= {"versions", "data_sha256"}


def add_arguments(parser):
    parser.add_argument("--out", required=True, type=Path, help="folder to write the PNGs into (created if needed)")
    parser.add_argument("--root", type=Path, default=None,
                        help="the checkout holding benchmarks/results and reports (default: this package's checkout)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated figure names to draw (default: all): {', '.join(FIGURES)}")
    add_overwrite_argument(parser, "the figure set reffuse drew in --out (with --only, the figures named; the "
                                   "others are kept)")


def run(args) -> int:
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    check_output_folder(args.out, args.overwrite, is_figure_set, FIGURE_SET)
    with staged_folder(args.out, args.overwrite, is_figure_set, FIGURE_SET) as staging:
        drawn = [path.name for path in draw_figures(staging, (args.root or checkout_root()).resolve(), names)]
        if names is not None and args.out.is_dir():  # the figures not redrawn stay in the set
            for name in sorted(set(os.listdir(args.out)) - set(drawn) - {MARKER}):
                if (args.out / name).is_file():
                    shutil.copy2(args.out / name, staging / name)
    for name in drawn:
        print(args.out / name)
    return 0
