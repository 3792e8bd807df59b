"""(a) Fusion intensity: the span as k sequential FFN steps, k = ceil(L/2) .. 1 (L = b - a blocks), cut where the
least FFN-level dependency is left inside the groups (reffuse.method.planning), plain fusion, norm "fold" and
norm "last" (the latter judged by (f)); where cosine-M cuts the span differently, its plan too (judged by (k)).
The report's table of (a) holds the columns of (f) and (g) beside it.
"""

from __future__ import annotations

from reffuse.core.fusion import fuse
from reffuse.core.layout import format_groups
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.rules import Verdict, by_steps, decide, difference, higher, lower
from reffuse.experiments.study import Study, format_kl, format_perplexity, score_cells
from reffuse.progress import Progress


def fusion_intensity(study: Study) -> list[dict]:
    """Every plan of the planner with both norms; where cosine-M cuts the span differently, its plan too (for
    finding (k))."""
    a = study.span[0]
    rows = []
    with Progress("fusion variants", 2 * len(study.counts), "models") as bar:
        for k in study.counts:
            groups = study.plans[k]
            row = {"steps": k, "groups": [list(g) for g in groups], "groups_text": format_groups(groups),
                   "depth_reduction": study.length - k}
            for norm in ("fold", "last"):
                row[norm] = study.scores(fuse(study.pre, groups, norm=norm), a)
                bar.update()
            cosine = study.cosine_plans[k]
            if cosine != groups:
                row["cosine_m_plan"] = {"groups": [list(g) for g in cosine], "groups_text": format_groups(cosine),
                                        **study.scores(fuse(study.pre, cosine), a)}
            rows.append(row)
    return rows


def judge(r: dict) -> Verdict:
    rows = by_steps(r)
    sink = r["sink"]["pre_fusion_norms"][r["sink"]["layer"]]
    rises = [difference(after["fold"], before["fold"]) for before, after in zip(rows, rows[1:])]
    overall = difference(rows[-1]["fold"], rows[0]["fold"])
    return Verdict(
        "a", "fusion intensity",
        paper="Puzzle-49B, 26 FFNs fused into 12/6/3/2: accuracy falls gradually, about 1% at 12 and about 4% at 2 "
              "(84.71 -> 83.92 -> 82.84 -> 81.69 -> 81.24)",
        here="KL to the pre-fusion model " + ", ".join(f"{row['steps']} steps {format_kl(row['fold']['kl'])}"
                                                       for row in rows)
             + "; perplexity " + ", ".join(format_perplexity(row["fold"]["perplexity"]) for row in rows)
             + f" (pre-fusion {format_perplexity(r['pre_fusion']['perplexity'])}). Each step to fewer groups, KL "
               "after - before: " + "; ".join(f"{before['steps']} -> {after['steps']}: {describe(d)}"
                                             for before, after, d in zip(rows, rows[1:], rises))
             + f"; {rows[0]['steps']} -> {rows[-1]['steps']}: {describe(overall)}. The first token's norm leaving "
               f"the run " + ", ".join(f"{row['fold']['sink_norm']:.0f}" for row in rows) + f" (pre-fusion {sink:.0f})",
        rule="held if every step to fewer groups raises the KL, each rise resolved; partly if the fewest groups "
             "against the most is a resolved rise; did not hold if that is a resolved fall; else not resolved",
        verdict=decide(all(higher(d) for d in rises), higher(overall), lower(overall)))


def section(r: dict) -> list[str]:
    """The span at every k: plain fusion's scores, norm last's KL ((f)) and calibrated fusion's ((g))."""
    span, sink = r["span"], r["sink"]
    norms = sink["pre_fusion_norms"]
    planner = r.get("plan_costs", {}).get("predictor", "cosine-M")
    cut = ("least FFN-level dependency stays inside the groups" if planner == "cosine-M" else
           f"the least {planner} stays inside the groups (the KL of fusing each adjacent pair alone, on "
           f"{r['plan_costs']['tokens']} calibration tokens; reffuse.method.planning says why this predictor)")
    lines = ["", "## (a) Fusion intensity, (f) fold vs last, (g) calibrated", "",
             f"The span {span[0]}-{span[1]} ({span[1] - span[0] + 1} FFNs) as k sequential steps, cut where the "
             f"{cut}.", "",
             "| steps | groups | plain fusion: KL | perplexity | top-1 | KL vs original | sink norm | norm last: KL | "
             "calibrated: KL | calibrated perplexity | gap closed |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pre = r["pre_fusion"]
    lines.append(f"| {span[1] - span[0] + 1} (pre-fusion) | - | 0 | {format_perplexity(pre['perplexity'])} | 100% | "
                 f"{format_kl(pre['kl_vs_original'])} | {norms[sink['layer']]:.0f} | 0 | 0 | "
                 f"{format_perplexity(pre['perplexity'])} | - |")
    for row in r["intensity"]:
        closed = 1 - row["calibrated"]["kl"] / row["fold"]["kl"]
        lines.append(f"| {row['steps']} | {row['groups_text']} | {score_cells(row['fold'])} | "
                     f"{format_kl(row['last']['kl'])} | {format_kl(row['calibrated']['kl'])} | "
                     f"{format_perplexity(row['calibrated']['perplexity'])} | {100 * closed:.0f}% |")
    return lines
