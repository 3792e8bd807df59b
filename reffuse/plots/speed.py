"""Speed of a fused FFN run against the same run block by block, as the number of tokens grows.

Drawn from `reffuse bench` results (their FFN run, speed.bench_result.FfnRun): the sequential / fused time ratio
at each token count, above 1 where fusion is faster. Few tokens: the run is memory-bound and fusion saves the
per-block overhead (norms, residual adds, small matrix products); many tokens: both are compute-bound.
"""

from __future__ import annotations

from reffuse.plots import pyplot
from reffuse.speed.bench_result import BenchResult


def ffn_speed_figure(results, title: str = "Fused vs sequential FFN run"):
    """results: one BenchResult or a list of them (one line each)."""
    results = [results] if isinstance(results, BenchResult) else list(results)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for result in results:
        run = result.ffn_run
        rows = sorted(run.rows, key=lambda r: r.tokens)
        tokens = [r.tokens for r in rows]
        ratio = [r.speedup for r in rows]  # the median of the paired repeats' ratios
        threads = result.environment.threads
        label = (f"{result.model}: {run.blocks} FFNs of width {'/'.join(map(str, sorted(set(run.widths))))}"
                 f", {threads} thread{'s' if threads != 1 else ''}")
        if all(r.speedup_interval_95 for r in rows):
            below = [max(r.speedup - r.speedup_interval_95[0], 0) for r in rows]
            above = [max(r.speedup_interval_95[1] - r.speedup, 0) for r in rows]
            ax.errorbar(tokens, ratio, yerr=[below, above], marker="o", capsize=3, label=label + ", 95% intervals")
        else:
            ax.plot(tokens, ratio, marker="o", label=label)
        for t, r in zip(tokens, ratio):
            ax.annotate(f"{r:.2f}x", (t, r), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="equal time")
    ax.set_xscale("log", base=2)
    ticks = sorted({r.tokens for result in results for r in result.ffn_run.rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("tokens in the batch (log scale)")
    ax.set_ylabel("sequential time / fused time")
    top = max((r.speedup_interval_95 or (0, r.speedup))[1] for result in results for r in result.ffn_run.rows)
    ax.set_ylim(0, 1.15 * max(top, 1.0))  # room for the labels above the points
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
