"""The decode-latency model's figures, drawn from the report of `reffuse costmodel` (its --json, read back with
CostmodelReport.from_json: benchmarks/results/costmodel.json).

    plot_tp_projection(report, path)          tokens/s vs TP degree, sequential vs fused, the paper's TP8 points,
                                              and where a token's time goes at TP8
    plot_measured_vs_predicted(report, path)  this machine: `reffuse tp` times against the model's predictions
"""

from __future__ import annotations

import numpy as np

from reffuse.plots import pyplot, save_figure
from reffuse.speed.costmodel.report import CostmodelReport

SEQUENTIAL, FUSED, PAPER = "tab:blue", "tab:orange", "black"
# (a field of CostSummary, its label, its colour): the parts of a token's time, stacked
PARTS = (("roofline_seconds", "weights and KV cache (roofline)", "tab:gray"),
         ("kernel_overhead_seconds", "kernel overhead", "tab:purple"),
         ("allreduce_seconds", "all-reduce (alpha-beta)", "tab:red"))


def tp_projection_figure(report: CostmodelReport):
    """Left: projected single-user decode tokens/s at each TP degree, sequential (solid) vs fused (dashed), hollow
    where the weights do not fit the GPU's memory, with the paper's Table 2 at TP8. Right: the TP8 token time of
    the paper's three models split into roofline, kernel overhead and all-reduce, beside the paper's."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    markers = iter("osD^v")
    for projection in report.projections:
        marker = next(markers)
        fused_differs = bool(projection.fusion_groups)
        for variant, colour, style in (("sequential", SEQUENTIAL, "-"), ("fused", FUSED, "--")):
            if variant == "fused" and not fused_differs:
                continue
            tp = [r.tp for r in projection.rows]
            costs = [getattr(r, variant) for r in projection.rows]        # ProjectionRow.sequential or .fused
            tokens = [cost.tokens_per_second for cost in costs]
            fits = [cost.fits_in_memory is not False for cost in costs]
            label = projection.model + (f" ({variant})" if fused_differs else "")
            line, = left.plot(tp, tokens, style, color=colour if fused_differs else "tab:green", label=label)
            left.scatter(tp, tokens, marker=marker, s=28, zorder=3, edgecolors=line.get_color(),
                         facecolors=[line.get_color() if f else "white" for f in fits])
    paper = report.paper_comparison
    for row in paper.rows:
        left.scatter([paper.tp], [row.paper_tokens_per_second], marker="*", s=90, color=PAPER, zorder=4)
        left.annotate(f"paper {row.paper_tokens_per_second:.2f}", (paper.tp, row.paper_tokens_per_second),
                      textcoords="offset points", xytext=(-62, -3), fontsize=7)
    left.scatter([], [], marker="*", s=90, color=PAPER, label="paper, Table 2 (TP8, 8 x H100)")
    left.scatter([], [], marker="o", s=28, facecolors="white", edgecolors="gray", label="weights do not fit 80 GB")
    hw = report.hardware
    left.set_title(f"projected single-user decode on {hw.name} ({hw.precision} weights)")
    left.set_xlabel("tensor-parallel degree (GPUs)")
    left.set_ylabel("tokens/s (one sequence)")
    left.set_xscale("log", base=2)
    left.set_xticks([r.tp for p in report.projections for r in p.rows])
    left.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    left.legend(fontsize=7, loc="upper left")
    left.grid(alpha=0.3)

    names = [row.model for row in paper.rows]
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for part, label, colour in PARTS:
        ms = np.array([1e3 * getattr(row.projected, part) for row in paper.rows])
        right.bar(x, ms, 0.55, bottom=bottom, color=colour, edgecolor="black", linewidth=0.3, label=label)
        bottom += ms
    right.scatter(x, [1e3 / row.paper_tokens_per_second for row in paper.rows], marker="*", s=90,
                  color=PAPER, zorder=3, label="paper (1000 / tokens/s)")
    for i, row in enumerate(paper.rows):
        right.annotate(f"{row.projected.allreduce_count} all-reduces", (i, bottom[i]), textcoords="offset points",
                       xytext=(0, 3), ha="center", fontsize=7)
    right.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    right.set_ylabel("ms per token")
    right.set_title(f"where a token's time goes at TP{paper.tp}")
    right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def plot_tp_projection(report: CostmodelReport, path):
    """tp_projection_figure(report), saved as a PNG at path."""
    return save_figure(tp_projection_figure(report), path)


def measured_vs_predicted_figure(report: CostmodelReport):
    """Each `reffuse tp` forward on this machine: measured seconds against predicted, log-log, with y = x and
    factor-of-2 bands. Colour: prefill or decode; marker: sequential or fused; label: model and ranks."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5))
    rows = report.measured.rows
    colours = {"prefill": "tab:green", "decode": "tab:purple"}
    markers = {"sequential": "o", "fused": "s"}
    for row in rows:
        ax.scatter(1e3 * row.predicted_seconds, 1e3 * row.measured_seconds, color=colours[row.phase],
                   marker=markers[row.variant], s=30, edgecolors="black", linewidths=0.3, zorder=3)
        ax.annotate(f"{row.model} N={row.ranks}", (1e3 * row.predicted_seconds, 1e3 * row.measured_seconds),
                    textcoords="offset points", xytext=(4, 2), fontsize=6)
    values = [1e3 * seconds for row in rows for seconds in (row.predicted_seconds, row.measured_seconds)]
    span = np.array([min(values) / 2, max(values) * 2])
    ax.plot(span, span, color="black", linewidth=0.8, label="measured = predicted")
    ax.fill_between(span, span / 2, span * 2, color="gray", alpha=0.15, label="within a factor of 2")
    for phase, colour in colours.items():
        ax.scatter([], [], color=colour, label=phase)
    for variant, marker in markers.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=variant)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*span)
    ax.set_ylim(*span)
    ax.set_xlabel("predicted ms per forward (cost model, calibrated CPU)")
    ax.set_ylabel("measured ms per forward (reffuse tp, rank 0, median)")
    ax.set_title("reffuse tp on this machine: measured vs predicted")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_measured_vs_predicted(report: CostmodelReport, path):
    """measured_vs_predicted_figure(report), saved as a PNG at path."""
    return save_figure(measured_vs_predicted_figure(report), path)
