"""The pipeline's outcome (`reffuse demo`): quality and speed of the original, attention-removed and fused models.

Drawn from the demo's JSON: its "quality" rows (perplexity, KL to the original on held-out text) and its "speed"
rows (decode tokens/s, all models timed in one run).
"""

from __future__ import annotations

from reffuse.plots import pyplot

COLOURS = {"original": "black", "attention removed": "tab:red", "fused": "tab:blue",
           "fused, calibrated": "tab:green"}


def pipeline_summary_figure(result: dict):
    """Left: KL to the original (bars) with perplexity written on them. Right: decode tokens/s."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    quality = result["quality"]["models"]
    names = [n for n in quality if n != "original"]
    bars = left.bar(range(len(names)), [quality[n]["kl_vs_original"] for n in names],
                    color=[COLOURS.get(n, "0.5") for n in names])
    for bar, name in zip(bars, names):
        left.annotate(f"ppl {quality[name]['perplexity']:.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=7)
    left.set_xticks(range(len(names)), names, fontsize=8)
    left.set_ylabel("KL(original || model), nats")
    left.set_title(f"held-out quality (original perplexity {quality['original']['perplexity']:.4g})")
    decode = result["speed"]["decode"]
    speed_names = list(decode)
    bars = right.bar(range(len(speed_names)), [decode[n]["tokens_per_second"] for n in speed_names],
                     color=[COLOURS.get(n, "0.5") for n in speed_names])
    for bar, name in zip(bars, speed_names):
        right.annotate(f"{decode[name]['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       ha="center", va="bottom", fontsize=7)
    right.set_xticks(range(len(speed_names)), speed_names, fontsize=8)
    right.set_ylabel("decode tokens per second")
    right.set_title("greedy decode with the KV cache, one run (ratio to the original)")
    fig.suptitle(f"Attention removal and FFN Fusion on {result['model_name']}")
    fig.tight_layout()
    return fig
