"""The report of `reffuse experiments` as Markdown, from the run's JSON result."""

from __future__ import annotations

from reffuse.experiments.findings import REVISIONS, format_interval, predictors_against_size
from reffuse.experiments.study import (DEFINITIONS, format_correlation, format_kl, format_perplexity, fused_name,
                                       removed_name)
from reffuse.stats import MIN_BOOTSTRAP_WINDOWS, spearman_interval


def rules_line(rules: dict | None) -> str:
    """Which commit the verdict rules come from, and whether they were changed since."""
    if not rules or not rules.get("commit"):
        return "The verdict rules (reffuse/experiments/findings.py) were applied outside a git checkout."
    state = ("with uncommitted changes to them: no commit records the rules this run applied"
             if rules["uncommitted_changes"] else "committed before this run, unchanged when it ran")
    return (f"The verdict rules are {' and '.join(f'`{f}`' for f in rules['files'])} as of commit "
            f"`{rules['commit'][:12]}` ({rules['committed_at']}), {state}. Every comparison is a paired "
            "difference over the same held-out predictions with 95% intervals over windows and over blocks of 32 "
            "tokens; it counts only when resolved (both intervals exclude 0).")


def intervals_line(held_out: dict) -> str:
    """Which interval over windows the run's comparisons use (reffuse.stats.paired_difference), and what it
    leaves out."""
    windows, texts = held_out["windows"], len(held_out["spans"])
    if windows < MIN_BOOTSTRAP_WINDOWS:
        return (f"The intervals over windows are t-intervals over the {windows} held-out windows' own means (marked "
                f"(t)): with fewer than {MIN_BOOTSTRAP_WINDOWS} windows a percentile bootstrap over windows covers "
                "less than 95%. The interval over blocks of 32 tokens is a bootstrap, and treats neighbouring blocks "
                "as independent.")
    return (f"The intervals over windows are percentile bootstraps over the {windows} held-out windows. The windows "
            f"come from {texts} texts and windows of one text are correlated, which these intervals, like the one "
            "over blocks of 32 tokens, do not model: they are narrower than an interval over texts would be.")


def revised_rules(rules: dict) -> list[dict]:
    """The revisions of the rules (findings.REVISIONS) dated after the commit of the rules a run was made under."""
    made = (rules or {}).get("committed_at") or ""
    return [revision for revision in REVISIONS if revision["date"] > made[:10]]


def revision_text(rules: dict) -> str:
    """The revisions after the rules a run was made under, one clause each: the findings, then the change."""
    return "; ".join(f"({'every finding' if x['findings'] == 'all' else x['findings']}) {x['change']}"
                     for x in revised_rules(rules))


def revision_lines(r: dict) -> list[str]:
    """For a run judged again by revised rules (run.rejudge): when and why, what changed, and which setup files
    changed after the commit the run recorded."""
    revision = r.get("revision")
    if not revision:
        return []
    rules = revision["rules"]
    if not rules.get("commit"):
        under = "outside a git checkout"
    else:
        under = (f"under the rules as of commit `{rules['commit'][:12]}` ({rules['committed_at']})"
                 + (", with uncommitted changes to them" if rules["uncommitted_changes"] else ""))
    changes = revision_text(r.get("rules"))
    lines = ["", f"**Rules revised after review, {revision['date']}.** The results were seen before these rules "
                 f"were revised; this report judges them again by `{revision['command']}`, nothing measured again, "
                 f"{under}. What changed: {changes}. The verdict column gives the verdict by the revised rules, the "
                 "column 'as run' the one the run recorded."] if changes else [
        "", f"**Judged again, {revision['date']}**, by `{revision['command']}`, nothing measured again, {under}: no "
            "rule was revised after those the run was made under. The column 'as run' gives the verdict the run "
            "recorded."]
    setup = revision.get("setup_changes")
    recorded = ("The run recorded the commit of its setup files" if "setup" in r else
                "The run recorded only the commit of its rule files, not that of the code that set it up (the "
                "corpus split, the planner, calibration)")
    if setup is None or setup["files"] is None:
        return lines + ["", f"{recorded}; which setup files changed since could not be read."]
    if not setup["files"]:
        return lines + ["", f"{recorded}, `{setup['since'][:12]}`. No setup file changed after it, up to "
                            f"`{setup['head'][:12]}`."]

    def when(f):
        if not f["commits"]:
            return "uncommitted changes"
        first, last = f["first"][:10], f["last"][:10]
        return (f"{f['commits']} commit{'s' if f['commits'] != 1 else ''}, "
                + (first if first == last else f"{first} to {last}")
                + (", and uncommitted changes" if f["uncommitted"] else ""))

    files = "; ".join(f"`{f['file']}` ({when(f)})" for f in setup["files"])
    return lines + ["", f"{recorded}, `{setup['since'][:12]}`. Setup files changed after that commit, up to "
                        f"`{setup['head'][:12]}`: {files}. The same command on the current code need not give "
                        "these numbers."]


def predictors_against_size_lines(compared: dict) -> list[str]:
    """(h) without the adjacent pairs, each predictor against the groups' size (findings.predictors_against_size)."""
    table = compared["correlations"]
    if table is None:
        return []
    lines = ["", f"The {compared['left_out']} adjacent pairs among these groups cannot test the neighbour damage: a "
                 "pair's neighbour damage is its measured damage. And a predictor that only tracks how many blocks a "
                 "group fuses adds nothing: the groups' size is the baseline. Without the "
                 f"pairs ({compared['groups']} groups of three or more blocks), each predictor beside the groups' "
                 "size, and its lead over size (paired bootstrap over the groups): a predictor adds information "
                 "only where that lead is resolved above 0.", "",
             "| predictor | Spearman with the damage | 95% interval | lead over group size | 95% interval |",
             "|---|---:|---|---:|---|"]
    for name, c in table.items():
        lead = (f"{format_correlation(c['lead_over_size'])} | {format_interval(c['lead_interval_95'])}"
                if "lead_over_size" in c else "- | -")
        lines.append(f"| {name} | {format_correlation(c['spearman'])} | {format_interval(c['interval_95'])} | "
                     f"{lead} |")
    return lines


def sink_variants(r: dict) -> list[tuple[str, str, dict]]:
    """(finding, variant, its scores) for every scored variant of the run, in the report's order."""
    variants = []
    for row in sorted(r["intensity"], key=lambda row: -row["steps"]):
        variants += [("a, f, g", f"{row['steps']} steps, {kind}", row[kind]) for kind in ("fold", "last", "calibrated")]
    variants += [("b", f"{row['depth_reduction']} FFNs removed", row) for row in r["removal"]["rows"]]
    variants += [("c", row["label"], row) for row in r["last_ffn"]]
    for row in r["reversed"]:
        span = f"{row['span'][0]}-{row['span'][1]}"
        variants += [("d", f"{span} fused", row["fused"]), ("d", f"{span} reversed", row["reversed"])]
    variants += [("e", f"whole blocks, {row['steps']} step(s)", row) for row in r["full_block"]["rows"]]
    variants += [("k", f"{row['steps']} steps, cosine-M's plan", row["cosine_m_plan"]) for row in r["intensity"]
                 if "cosine_m_plan" in row]
    for row in r.get("equal_latency", {}).get("removal", []):
        variants += [("i", f"{row['removed_count']} FFNs removed, {kind}", row[kind]) for kind in ("plain", "refit")]
    variants += [("j", f"{row['steps']} steps calibrated on {row['tokens']} tokens", row)
                 for row in r.get("calibration_scale", {}).get("rows", [])]
    return [v for v in variants if "sink_restored" in v[2]]


def sink_section(r: dict) -> list[str]:
    """Every variant's KL beside its KL with the first token's stream restored, and the two dependency matrices."""
    variants = sink_variants(r)
    if not variants:
        return []
    lines = ["", "## The attention sink as a channel", "",
             "Each variant's KL beside the same with the first token's stream put back to the pre-fusion model's "
             "where the changed blocks end: the share of the damage that goes through the attention sink is "
             "1 - restored / KL.", "", "| finding | variant | KL | KL, sink restored | through the sink |",
             "|---|---|---:|---:|---:|"]
    for finding, name, s in variants:
        restored = s["sink_restored"]["kl_from_base"]
        share = f"{1 - restored / s['kl']:.0%}" if s["kl"] > 0 else "-"
        lines.append(f"| ({finding}) | {name} | {format_kl(s['kl'])} | {format_kl(restored)} | {share} |")
    dependency = r["ffn_dependency"]
    if "first_token_matrix" in dependency:
        a = dependency["blocks"][0]
        lines += ["", f"FFN-level dependency M[i, j] inside the run (blocks {a}-{dependency['blocks'][1]}): measured on "
                      "every token but the first (what the plans use), and on the first token alone, which that "
                      "matrix leaves out. Rows i, columns j > i.", ""]
        for title, matrix in (("all tokens but the first", dependency["matrix"]),
                              ("the first token alone", dependency["first_token_matrix"])):
            size = len(matrix)
            lines += [f"{title}:", "", "| i \\ j | " + " | ".join(str(a + j) for j in range(1, size)) + " |",
                      "|---|" + "---:|" * (size - 1)]
            for i in range(size - 1):
                cells = ["" if matrix[i][j] is None else f"{matrix[i][j]:.3f}" for j in range(1, size)]
                lines.append(f"| {a + i} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def planner_section(r: dict) -> list[str]:
    """(k): the planner's plans against cosine-M's where the two cut the span differently."""
    if "plan_costs" not in r:
        return []
    costs = r["plan_costs"]
    a = costs["blocks"][0]
    lines = ["", "## (k) The planner's predictor against cosine-M", "",
             f"The planner's cost, the {costs['predictor']} of each adjacent pair (KL of fusing FFNs i, i+1 alone, "
             f"{costs['tokens']} calibration tokens): "
             + ", ".join(f"{a + i}-{a + i + 1} {format_kl(costs['matrix'][i][i + 1])}"
                         for i in range(len(costs["matrix"]) - 1)) + ".", ""]
    rows = [row for row in sorted(r["intensity"], key=lambda row: -row["steps"]) if "cosine_m_plan" in row]
    if not rows:
        return lines + ["Cosine-M cuts the span the same way at every k."]
    lines += ["| steps | planner's groups | KL | cosine-M's groups | KL |", "|---:|---|---:|---|---:|"]
    for row in rows:
        lines.append(f"| {row['steps']} | {row['groups_text']} | {format_kl(row['fold']['kl'])} | "
                     f"{row['cosine_m_plan']['groups_text']} | {format_kl(row['cosine_m_plan']['kl'])} |")
    return lines


def equal_latency_section(r: dict) -> list[str]:
    """(i): every removal count, plain and refitted, with its modelled and measured decode latency."""
    if "equal_latency" not in r:
        return []
    e, lat = r["equal_latency"], r["decode"]
    modelled = e["modelled"]
    lines = ["", "## (i) FFN removal vs fusion at equal latency", "",
             f"Every count of the span's FFNs removed (least important first), plain and with the refit calibrated "
             f"fusion gets (each kept FFN's down-projection fitted to the sequential update of the blocks it stands "
             f"for). Decode latency per token: modelled by the cost model on {modelled['hardware']} at TP "
             f"{modelled['tp']} and TP 1 (context {modelled['context']}), and measured on this CPU (median and "
             f"interquartile range of {lat['pre-fusion'].get('repeats', '?')} repeats, models in alternation).", "",
             f"| model | KL | perplexity | refitted: KL | refitted perplexity | TP {modelled['tp']} ms | TP 1 ms | "
             "CPU ms (IQR) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cpu(name):
        v = lat[name]
        spread = f" ({v['ms_interquartile'][0]:.2f}-{v['ms_interquartile'][1]:.2f})" if "ms_interquartile" in v else ""
        return f"{v['ms_per_token']:.2f}{spread}"

    lines.append(f"| pre-fusion | 0 | {format_perplexity(r['pre_fusion']['perplexity'])} | - | - | "
                 f"{modelled['ms']['pre-fusion']:.3f} | {modelled['ms_tp1']['pre-fusion']:.3f} | {cpu('pre-fusion')} |")
    for row in sorted(r["intensity"], key=lambda row: -row["steps"]):
        name = fused_name(row["steps"])
        lines.append(f"| {name} ({row['groups_text']}) | {format_kl(row['fold']['kl'])} | "
                     f"{format_perplexity(row['fold']['perplexity'])} | {format_kl(row['calibrated']['kl'])} "
                     f"(calibrated) | {format_perplexity(row['calibrated']['perplexity'])} | {modelled['ms'][name]:.3f} "
                     f"| {modelled['ms_tp1'][name]:.3f} | {cpu(name)} |")
    for row in e["removal"]:
        name = removed_name(row["removed_count"])
        lines.append(f"| {name} ({','.join(map(str, row['removed']))}) | {format_kl(row['plain']['kl'])} | "
                     f"{format_perplexity(row['plain']['perplexity'])} | {format_kl(row['refit']['kl'])} | "
                     f"{format_perplexity(row['refit']['perplexity'])} | {modelled['ms'][name]:.3f} | "
                     f"{modelled['ms_tp1'][name]:.3f} | {cpu(name)} |")
    return lines


def calibration_scale_section(r: dict) -> list[str]:
    """(j): each plan calibrated on more and more text, with its residuals."""
    if "calibration_scale" not in r:
        return []
    scale = r["calibration_scale"]
    lines = ["", "## (j) Calibration at scale", "",
             f"The plans calibrated on the first {', '.join(map(str, scale['sizes']))} calibration tokens (weighting "
             f"{scale['weighting']}, ridge {scale['ridge']:g}, as chosen for (g)). Residual: ||H W^T - R||² / ||R||² "
             "of the fused down-projection against the sequential run's update, mean over the groups, on the "
             "tokens it was fitted on and on the held-out streams entering each group in the pre-fusion model "
             "(plain fusion's in brackets).", "",
             "| steps | calibration tokens | KL | perplexity | residual, fitted tokens | residual, held-out (plain) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in scale["rows"]:
        fitted = sum(f["fit_error_calibrated"] for f in row["fits"]) / len(row["fits"])
        held = sum(g["calibrated"] for g in row["held_out_residual"]) / len(row["held_out_residual"])
        plain = sum(g["plain"] for g in row["held_out_residual"]) / len(row["held_out_residual"])
        lines.append(f"| {row['steps']} | {row['tokens']} | {format_kl(row['kl'])} | "
                     f"{format_perplexity(row['perplexity'])} | {fitted:.3f} | {held:.3f} ({plain:.3f}) |")
    return lines


def text_kind_section(r: dict) -> list[str]:
    """The main variants' KL on each kind of held-out text (drama, verse) and on each text, from the per-window
    values: whether a finding rests on one kind."""
    spans = r["texts"]["held_out"]["spans"]
    window = r["texts"]["held_out"]["window"]
    if len({s.get("kind", "drama") for s in spans}) < 2:
        return []
    owner = [s for s in spans for _ in range(s["tokens"] // window)]   # the text of each window, in order
    kinds = sorted({s["kind"] for s in spans})

    def mean_by(scores, key):
        sums, counts = {}, {}
        for span, kl in zip(owner, scores["per_token"]["kl"]):
            sums[key(span)] = sums.get(key(span), 0.0) + sum(kl)
            counts[key(span)] = counts.get(key(span), 0) + len(kl)
        return {k: sums[k] / counts[k] for k in sums}

    variants = [(f"{row['steps']} steps, {kind}", row[kind]) for row in sorted(r["intensity"], key=lambda x: -x["steps"])
                for kind in ("fold", "calibrated")]
    variants += [(f"{row['depth_reduction']} FFNs removed", row) for row in r["removal"]["rows"]]
    lines = ["", "## Held-out text by kind", "",
             "Each variant's KL on each kind of held-out text (the mean over its predictions), from the per-window "
             "values; the texts: " + "; ".join(f"{s['title']} ({s['kind']}, {s['tokens']} tokens)" for s in spans)
             + ".", "", "| variant | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for name, scores in variants:
        by_kind = mean_by(scores, lambda span: span["kind"])
        lines.append(f"| {name} | " + " | ".join(format_kl(by_kind[k]) for k in kinds) + " |")
    return lines


def markdown(r: dict, command: str) -> str:
    """The report as Markdown: setup, one section per finding with its table and verdict."""
    removal, env = r["attention_removal"], r["environment"]
    a, b = r["region"]
    span = r["span"]
    texts = r["texts"]
    cal, held = texts["calibration"], texts["held_out"]

    def spans(part):
        return "; ".join(f"{s['title']} characters {s['start']}-{s['end']} ({s['tokens']} tokens)"
                         for s in part["spans"]) or part["split"]

    def row_scores(s):
        return (f"{format_kl(s['kl'])} | {format_perplexity(s['perplexity'])} | {100 * s['top1']:.1f}% | {format_kl(s['kl_vs_original'])} | "
                f"{s['sink_norm']:.0f}")

    sink = r["sink"]
    norms = sink["pre_fusion_norms"]
    jump = max(range(1, len(norms)), key=lambda i: norms[i] / norms[i - 1])  # the block whose output jumps most

    lines = [f"# FFN Fusion experiments at small scale: {r['model_name']}", "",
             "Produced by:", "", f"    {command}", "",
             f"{r['seconds'] / 60:.1f} minutes on {env['cores']} cores ({env['threads']} BLAS threads), load average "
             f"{env['load_average_1min_at_start']:.1f} at the start and {env['load_average_1min_at_end']:.1f} at the "
             f"end. The JSON beside this file holds every number; `reffuse.plots.experiments` draws the figures "
             "from it.", "",
             "## Setup", "",
             f"- **Attention removal** (standing in for Puzzle): every block's attention scored by the KL of removing "
             f"it alone on {removal['scoring_tokens']} calibration tokens; removed: blocks **{removal['blocks_text']}**"
             f" ({removal['rule']}). Summed single scores {removal['summed_score']:.3f} nats, measured jointly "
             f"{removal['joint_kl']:.3f} nats: removals interact.",
             f"- The attention-free run is **{a}-{b}**; the span fused is **{span[0]}-{span[1]}** (the run without "
             "its last block, as in the paper).",
             f"- **Held-out text**: {spans(held)}: {held['windows']} windows of {held['window']} tokens. "
             f"**Calibration text** (scores, dependencies, calibration): {spans(cal)}. Disjoint: {texts['disjoint']}.",
             f"- Original model perplexity {format_perplexity(r['original']['perplexity'])}; pre-fusion (attention removed) "
             f"{format_perplexity(r['pre_fusion']['perplexity'])}, KL to the original {format_kl(r['pre_fusion']['kl_vs_original'])}, "
             f"top-1 agreement {100 * r['pre_fusion']['top1_vs_original']:.1f}%.",
             "- Quality proxy: KL(pre-fusion || variant) in nats on held-out text (0 = the pre-fusion model), "
             "perplexity, top-1 agreement with the pre-fusion model, and KL to the original model. The paper's "
             "MMLU / MT-Bench have no counterpart at this scale.",
             f"- The attention sink: the first token's stream norm in the pre-fusion model grows from "
             f"{norms[jump - 1]:.0f} to {norms[jump]:.0f} in block {jump - 1} (massive activations; later attention "
             f"leans on it). The tables give that norm where the stream leaves the run (entering block "
             f"{sink['layer']}; pre-fusion {norms[sink['layer']]:.0f}) as 'sink norm'.", "",
             "## Verdicts", "", rules_line(r.get("rules")), "", intervals_line(held), *revision_lines(r), ""]
    as_run = {v["finding"]: v["verdict"] for v in r.get("verdicts_as_run", [])}
    lines += (["| finding | paper | here | verdict | as run |", "|---|---|---|---|---|"] if as_run else
              ["| finding | paper | here | verdict |", "|---|---|---|---|"])
    for v in r["verdicts"]:
        note = f"; {v['note']}" if v.get("note") else ""
        was = f" {as_run.get(v['finding'], '-')} |" if as_run else ""
        lines.append(f"| ({v['finding']}) {v['title']} | {v['paper']} | {v['here']} | **{v['verdict']}** "
                     f"({v['rule']}{note}) |{was}")

    header = "| KL | perplexity | top-1 | KL vs original | sink norm |"
    planner = r.get("plan_costs", {}).get("predictor", "cosine-M")
    cut = ("least FFN-level dependency stays inside the groups" if planner == "cosine-M" else
           f"the least {planner} stays inside the groups (the KL of fusing each adjacent pair alone, on "
           f"{r['plan_costs']['tokens']} calibration tokens; reffuse.method.planning says why this predictor)")
    lines += ["", "## (a) Fusion intensity, (f) fold vs last, (g) calibrated", "",
              f"The span {span[0]}-{span[1]} ({span[1] - span[0] + 1} FFNs) as k sequential steps, cut where the "
              f"{cut}.", "",
              "| steps | groups | plain fusion: KL | perplexity | top-1 | KL vs original | sink norm | norm last: KL | "
              "calibrated: KL | calibrated perplexity | gap closed |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| {span[1] - span[0] + 1} (pre-fusion) | - | 0 | {format_perplexity(r['pre_fusion']['perplexity'])} | 100% | "
                 f"{format_kl(r['pre_fusion']['kl_vs_original'])} | {norms[sink['layer']]:.0f} | 0 | 0 | "
                 f"{format_perplexity(r['pre_fusion']['perplexity'])} | - |")
    for row in r["intensity"]:
        closed = 1 - row["calibrated"]["kl"] / row["fold"]["kl"]
        lines.append(f"| {row['steps']} | {row['groups_text']} | {row_scores(row['fold'])} | "
                     f"{format_kl(row['last']['kl'])} | {format_kl(row['calibrated']['kl'])} | "
                     f"{format_perplexity(row['calibrated']['perplexity'])} | {100 * closed:.0f}% |")
    c = r["calibration"]
    sweep = ", ".join(f"{s['weighting']} {s['ridge']:g}: {s['geometric_mean_ratio']:.3f}" for s in c["sweep"])
    lines += ["", "Calibration: token weighting (none or relative, see reffuse.method.calibrate) and ridge chosen together on "
                  f"{c['validation_tokens']} validation tokens of the calibration text, every plan above fitted on "
                  f"the other {c['fit_tokens']}; the score is the geometric mean over the plans of KL(calibrated) / "
                  f"KL(plain): {sweep}. Chosen: **{c['weighting']}, ridge {c['ridge']:g}** (the library defaults are "
                  f"{c['default_weighting']}, {c['default_ridge']:g}), then refitted on all {c['tokens']} calibration "
                  "tokens. Held-out text played no part in the choice."]

    lat = r["decode"]
    base_ms = lat["pre-fusion"]["ms_per_token"]
    lines += ["", "## (b) FFN removal vs fusion at equal depth reduction", "",
              "FFNs of the span scored by the KL of removing each alone (calibration text); the least important "
              "removed. Decode latency of every model measured in the same run, in alternation.", "",
              "| model | depth reduction | " + header[1:] + " decode ms/token | vs pre-fusion |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| original | - | - | {format_perplexity(r['original']['perplexity'])} | - | 0 | - | "
                 f"{lat['original']['ms_per_token']:.2f} "
                 f"| {100 * (lat['original']['ms_per_token'] / base_ms - 1):+.1f}% |")
    lines.append(f"| pre-fusion | 0 | 0 | {format_perplexity(r['pre_fusion']['perplexity'])} | 100% | "
                 f"{format_kl(r['pre_fusion']['kl_vs_original'])} | {norms[sink['layer']]:.0f} | {base_ms:.2f} | 0% |")
    for row, removal_row in zip(r["intensity"], r["removal"]["rows"]):
        fused_ms = lat[fused_name(row["steps"])]["ms_per_token"]
        removed_ms = lat[removed_name(removal_row["depth_reduction"])]["ms_per_token"]
        lines.append(f"| fused {row['groups_text']} | {row['depth_reduction']} | {row_scores(row['fold'])} | "
                     f"{fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| fused {row['groups_text']}, calibrated | {row['depth_reduction']} | "
                     f"{row_scores(row['calibrated'])} | {fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| removed FFNs {','.join(map(str, removal_row['removed']))} | {removal_row['depth_reduction']}"
                     f" | {row_scores(removal_row)} | {removed_ms:.2f} | {100 * (removed_ms / base_ms - 1):+.1f}% |")

    lines += planner_section(r) + equal_latency_section(r) + calibration_scale_section(r) + text_kind_section(r)
    lines += ["", "## (c) The last FFN", "", "| group | " + header[1:], "|---|---:|---:|---:|---:|---:|"]
    for row in r["last_ffn"]:
        lines.append(f"| {row['label']}: {row['group'][0]}-{row['group'][1]} | {row_scores(row)} |")

    lines += ["", "## (d) Reversed order vs fusion", "",
              "| span | fused KL | reversed KL | fused perplexity | reversed perplexity | fused sink norm | "
              "reversed sink norm |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["reversed"]:
        lines.append(f"| {row['span'][0]}-{row['span'][1]} | {format_kl(row['fused']['kl'])} | "
                     f"{format_kl(row['reversed']['kl'])} | "
                     f"{format_perplexity(row['fused']['perplexity'])} | {format_perplexity(row['reversed']['perplexity'])} | "
                     f"{row['fused']['sink_norm']:.0f} | {row['reversed']['sink_norm']:.0f} |")

    full = r["full_block"]
    lines += ["", "## (e) Full-block parallelization", "",
              f"Rule: {DEFINITIONS['full_block_rule']}. Greedy selection (lowest M_max, ties by M_sum) over windows "
              f"of {full['window']} blocks that have both attention and an FFN, on the block-level dependency matrix "
              f"of the pre-fusion model ({full['tokens']} calibration tokens).", "",
              "| steps | windows in parallel | M_max of the new window | KL | perplexity | top-1 | KL vs original |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for row, step in zip(full["rows"], full["greedy"]):
        lines.append(f"| {row['steps']} | {row['windows_text']} | {step['max']:.4f} | {format_kl(row['kl'])} | "
                     f"{format_perplexity(row['perplexity'])} | {100 * row['top1']:.1f}% | {format_kl(row['kl_vs_original'])} |")
    if full["single_windows"]:
        lines += ["", f"Every eligible window alone (first {full['single_window_tokens']} held-out tokens), to see "
                      "whether M_max predicts the damage:", "", "| window | M_max | M_sum | KL |",
                  "|---|---:|---:|---:|"]
        for w in sorted(full["single_windows"], key=lambda w: w["max"]):
            lines.append(f"| {w['first']}-{w['last']} | {w['max']:.4f} | {w['sum']:.4f} | {format_kl(w['kl'])} |")
        rho = full["rank_correlation_max_kl"]
        if rho is not None:
            interval = spearman_interval([w["max"] for w in full["single_windows"]],
                                         [w["kl"] for w in full["single_windows"]])
            lines += ["", f"Spearman rank correlation between M_max and KL: **{rho:.2f}**, 95% interval "
                          f"{format_interval(interval)} (bootstrap over the windows)."]
    if "predictors" in r:
        p = r["predictors"]
        lines += ["", "## (h) Which predictor ranks fusion damage", "",
                  f"Each of the {len(p['groups'])} contiguous groups of the span fused alone, its KL to the pre-fusion "
                  f"model on {p['tokens']} calibration tokens, against what each predictor says from the pre-fusion "
                  "model alone (reffuse.method.predictors):", "",
                  "| predictor | Spearman with the damage | 95% interval (bootstrap over groups) |", "|---|---:|---|"]
        for name, c in p["correlations"].items():
            interval = "-" if c["interval_95"] is None else f"{c['interval_95'][0]:+.2f} to {c['interval_95'][1]:+.2f}"
            lines.append(f"| {name} | {format_correlation(c['spearman'])} | {interval} |")
        lines += predictors_against_size_lines(predictors_against_size(p))
    lines += sink_section(r)
    lines += ["", "## Figures", "",
              "![fusion intensity](fusion_intensity.png)", "",
              "![removal vs fusion](removal_vs_fusion.png)", "",
              "![ablations](ablations.png)", "",
              "![full-block parallelization](full_block.png)", "",
              "![attention removal scores](attention_scores.png)", ""]
    return "\n".join(lines)


VERDICT_ORDER = ("held", "partly held", "not resolved", "did not hold", "not measured")


def overlap_line(regions: list[dict]) -> str:
    """Whether the regions' attention-removed blocks overlap: overlapping regions are not replications."""
    if any("blocks" not in r for r in regions):
        return "The regions are the cheapest windows of blocks, which may overlap."
    shared = set.intersection(*(set(r["blocks"]) for r in regions))
    pairs = sum(bool(set(a["blocks"]) & set(b["blocks"])) for i, a in enumerate(regions) for b in regions[i + 1:])
    if not pairs:
        return "The regions do not overlap: no block's attention is removed in two of them."
    common = (f"; blocks {min(shared)}-{max(shared)} are in every one" if shared else "")
    every = len(regions) * (len(regions) - 1) // 2
    share = "every two of them share blocks" if pairs == every else f"{pairs} of the {every} pairs share blocks"
    return (f"**The regions overlap** ({', '.join(r['attention_removed'] for r in regions)}: {share}{common}), "
            "and all are judged on the same "
            "held-out text: they are the same study on neighbouring, largely shared parts of one model, not "
            "independent replications. A finding that holds in every region holds for these neighbouring "
            "regions, no more.")


def regions_markdown(summary: dict, command: str, minutes: float) -> str:
    """The replication across attention-removal regions: one row per finding, one column per region, and how
    many regions gave each verdict; each region's full report is in its folder."""
    regions = summary["regions"]
    lines = [f"# FFN Fusion experiments at small scale, repeated on {len(regions)} overlapping attention-removal "
             "regions", "", "Produced by:", "", f"    {command}", "",
             f"{minutes:.1f} minutes on this machine in all. Region k removes the attention of the window of "
             "consecutive blocks with the k-th least summed single-removal score; each region is a full run of "
             "(a)-(k), its report and JSON in `region-k/`.", "", overlap_line(regions), "",
             rules_line(summary.get("rules"))]
    revision = summary.get("revision")
    if revision:
        rules = revision["rules"]
        lines += ["", f"**Rules revised after review, {revision['date']}**, after these results were seen; every "
                      "region is judged again by them (`" + revision["command"] + "`, nothing measured again"
                      + (f"; rules as of commit `{rules['commit'][:12]}`" if rules.get("commit") else "")
                      + (", with uncommitted changes to them" if rules.get("uncommitted_changes") else "")
                      + "): " + revision_text(summary.get("rules"))
                      + ". Each cell gives the verdict by the revised rules, and in brackets the one the run "
                        "recorded where it differs. Each region's report says which setup files changed after "
                        "the commit the run recorded."]
    lines += ["", "| finding | " + " | ".join(f"[region {r['rank']}](region-{r['rank']}/README.md): attention removed "
                                              f"{r['attention_removed']}, span {r['span'][0]}-{r['span'][1]}"
                                              for r in regions) + " | over the regions |",
              "|---|" + "---|" * len(regions) + "---|"]
    for finding in summary["findings"]:
        cells = []
        for r in regions:
            now, was = r["verdicts"][finding["finding"]], r.get("verdicts_as_run", {}).get(finding["finding"])
            cells.append(now if was in (None, now) else f"{now} (as run: {was})")
        counts = ", ".join(f"{verdict} {finding['counts'][verdict]}" for verdict in VERDICT_ORDER
                           if verdict in finding["counts"])
        lines.append(f"| ({finding['finding']}) {finding['title']} | " + " | ".join(cells) + f" | {counts} |")
    if all("predictors" in r for r in regions):
        names = list(regions[0]["predictors"])
        lines += ["", "(h) Spearman rank correlation of each predictor with the damage of every contiguous group of "
                      "the span fused alone, on calibration text, [95% bootstrap interval over groups]:", "",
                  "| predictor | " + " | ".join(f"region {r['rank']}" for r in regions) + " |",
                  "|---|" + "---|" * len(regions)]
        for name in names:
            cells = []
            for r in regions:
                c = r["predictors"][name]
                cells.append(format_correlation(c["spearman"]) + ("" if c["interval_95"] is None else
                                                        f" [{c['interval_95'][0]:+.2f}, {c['interval_95'][1]:+.2f}]"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if all(r.get("predictors_against_size", {}).get("correlations") for r in regions):
        tables = [r["predictors_against_size"] for r in regions]
        lines += ["", f"(h) without the adjacent pairs (a pair's neighbour damage is its measured damage): Spearman "
                      f"with the damage of the {tables[0]['groups']} groups of three or more blocks [95% bootstrap "
                      "interval], and the lead over the groups' size [paired bootstrap interval]:", "",
                  "| predictor | " + " | ".join(f"region {r['rank']}" for r in regions) + " |",
                  "|---|" + "---|" * len(regions)]
        for name in tables[0]["correlations"]:
            cells = []
            for table in tables:
                c = table["correlations"][name]
                cells.append(f"{format_correlation(c['spearman'])} {format_interval(c['interval_95'])}"
                             + (f"; lead {format_correlation(c['lead_over_size'])} "
                                f"{format_interval(c['lead_interval_95'])}" if "lead_over_size" in c else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Summed single-removal scores of the regions (nats): "
              + ", ".join(f"region {r['rank']} {r['summed_score']:.4f}" for r in regions) + ".", ""]
    return "\n".join(lines)

