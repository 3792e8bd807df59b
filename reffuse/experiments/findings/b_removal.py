"""(b) FFN removal vs fusion at equal depth reduction: removing the L - k least important FFNs of the span (by the
KL of removing each alone, on calibration text) against fusing the span into k steps; decode latency of every
model of (a), (b) and (i) in the same run, in alternation (reffuse.speed.bench.decode_samples).
"""

from __future__ import annotations

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference, higher, lower
from reffuse.experiments.study import (SCORE_COLUMNS, Study, format_kl, format_perplexity, fused_name, removed_name,
                                       score_cells)
from reffuse.method.removal import cheapest, drop_ffns, ffn_scores
from reffuse.speed.bench import decode_samples, prompt_ids, reffuse_decode


def ffn_removal(study: Study, intensity: list[dict]) -> dict:
    """The L - k least important FFNs of the span removed (by the KL of removing each alone, on calibration
    text), for every depth reduction of `intensity`."""
    importance = ffn_scores(study.pre, study.texts.scoring(study.scoring_tokens, min(study.window, 128)),
                            layers=range(study.span[0], study.span[1] + 1))
    rows = []
    for row in intensity:
        dropped = cheapest(importance, row["depth_reduction"])
        rows.append({"depth_reduction": row["depth_reduction"], "removed": dropped,
                     **study.scores(drop_ffns(study.pre, dropped), study.span[0])})
    return {"ffn_scores": {str(k): v for k, v in importance.items()}, "rows": rows}


def judge(r: dict) -> Verdict:
    latency = r["decode"]
    base_ms = latency["pre-fusion"]["ms_per_token"]
    pairs = list(zip(r["intensity"], r["removal"]["rows"]))
    plain = [difference(row["fold"], removal) for row, removal in pairs]
    calibrated = [difference(row["calibrated"], removal) for row, removal in pairs]
    here = []
    for (row, removal), d, c in zip(pairs, plain, calibrated):
        fused_ms = latency[fused_name(row["steps"])]["ms_per_token"]
        removed_ms = latency[removed_name(removal["depth_reduction"])]["ms_per_token"]
        here.append(f"depth -{row['depth_reduction']}: fusion KL {format_kl(row['fold']['kl'])} (calibrated "
                    f"{format_kl(row['calibrated']['kl'])}), {100 * (fused_ms / base_ms - 1):+.1f}% decode latency; "
                    f"removal KL {format_kl(removal['kl'])}, {100 * (removed_ms / base_ms - 1):+.1f}%; fusion - "
                    f"removal {describe(d)}; calibrated fusion - removal {describe(c)}")
    return Verdict(
        "b", "FFN removal vs fusion",
        paper="at a similar latency, fusion keeps more accuracy than removal (fusion step 3: -10% latency, -3.5% "
              "accuracy; removing 15 FFNs: -7.5% latency, -5% accuracy; 20 FFNs: -11%, -8.7%)",
        here="; ".join(here),
        rule="at equal depth reduction (not the paper's equal latency): held if plain fusion has the resolved lower "
             "KL at every depth; partly if at some depth, or calibrated fusion at every depth, and removal is "
             "resolved lower at none; did not hold if removal is resolved lower at some depth and plain fusion at "
             "none; else not resolved. Latency is reported, not judged: a CPU decode of a 135M model is bound by "
             "reading weights, which fusion does not reduce",
        verdict=decide_lower(plain, also_partly=all(lower(c) for c in calibrated)),
        note=f"plain fusion resolved lower at {sum(map(lower, plain))} of {len(plain)} depths, removal at "
             f"{sum(map(higher, plain))}; calibrated fusion resolved lower at {sum(map(lower, calibrated))}")


def decode_latency(study: Study, intensity: list[dict], removal_rows: list[dict], decode_tokens: int,
                   repeats: int, removal_counts: list[dict] = ()) -> dict:
    """Greedy decode of the original, the pre-fusion, every fused and every FFN-removed model (those of (b), and
    of (i) when given), timed in alternation in one run (reffuse.speed.bench.decode_samples): the median and
    the quartiles of the repeats, per token."""
    models = {"original": study.original, "pre-fusion": study.pre}
    for row in intensity:
        models[fused_name(row["steps"])] = fuse(study.pre, [tuple(g) for g in row["groups"]])
    for row in removal_rows:
        models[removed_name(row["depth_reduction"])] = drop_ffns(study.pre, row["removed"])
    for row in removal_counts:
        models[removed_name(row["removed_count"])] = drop_ffns(study.pre, row["removed"])
    seconds, _ = decode_samples({name: (lambda p, n, m=m: reffuse_decode(m, p, n)) for name, m in models.items()},
                                prompt_ids(study.original, 32), decode_tokens, repeats)
    result = {}
    for name, samples in seconds.items():
        q1, median, q3 = np.quantile(np.asarray(samples) * 1e3 / decode_tokens, [0.25, 0.5, 0.75])
        result[name] = {"ms_per_token": float(median), "tokens_per_second": 1e3 / float(median),
                        "ms_interquartile": [float(q1), float(q3)], "repeats": len(samples)}
    return result


def section(r: dict) -> list[str]:
    """Each fused model, plain and calibrated, beside the removal of as many FFNs, with its decode latency."""
    lat = r["decode"]
    base_ms = lat["pre-fusion"]["ms_per_token"]
    sink_norm = r["sink"]["pre_fusion_norms"][r["sink"]["layer"]]
    lines = ["", "## (b) FFN removal vs fusion at equal depth reduction", "",
             "FFNs of the span scored by the KL of removing each alone (calibration text); the least important "
             "removed. Decode latency of every model measured in the same run, in alternation.", "",
             "| model | depth reduction | " + SCORE_COLUMNS[1:] + " decode ms/token | vs pre-fusion |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| original | - | - | {format_perplexity(r['original']['perplexity'])} | - | 0 | - | "
                 f"{lat['original']['ms_per_token']:.2f} "
                 f"| {100 * (lat['original']['ms_per_token'] / base_ms - 1):+.1f}% |")
    lines.append(f"| pre-fusion | 0 | 0 | {format_perplexity(r['pre_fusion']['perplexity'])} | 100% | "
                 f"{format_kl(r['pre_fusion']['kl_vs_original'])} | {sink_norm:.0f} | {base_ms:.2f} | 0% |")
    for row, removal_row in zip(r["intensity"], r["removal"]["rows"]):
        fused_ms = lat[fused_name(row["steps"])]["ms_per_token"]
        removed_ms = lat[removed_name(removal_row["depth_reduction"])]["ms_per_token"]
        lines.append(f"| fused {row['groups_text']} | {row['depth_reduction']} | {score_cells(row['fold'])} | "
                     f"{fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| fused {row['groups_text']}, calibrated | {row['depth_reduction']} | "
                     f"{score_cells(row['calibrated'])} | {fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| removed FFNs {','.join(map(str, removal_row['removed']))} | {removal_row['depth_reduction']}"
                     f" | {score_cells(removal_row)} | {removed_ms:.2f} | {100 * (removed_ms / base_ms - 1):+.1f}% |")
    return lines
