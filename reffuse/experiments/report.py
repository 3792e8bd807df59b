"""The report of `reffuse experiments` as Markdown, from the run's JSON result."""

from __future__ import annotations

from reffuse.experiments.findings import ON_THE_PLANS, OTHERS, REVISIONS, StudyResult, by_steps
from reffuse.experiments.findings.rules import RuleRevision
from reffuse.experiments.provenance import Provenance, describe_changes
from reffuse.experiments.run import RegionRow, RegionSummary
from reffuse.experiments.study import ScoredVariant, format_correlation, format_interval, format_kl, format_perplexity
from reffuse.formats.corpus import WindowsRecord
from reffuse.stats import MIN_BOOTSTRAP_WINDOWS


def rules_line(rules: Provenance | None) -> str:
    """Which commit the verdict rules come from, and whether they were changed since."""
    if rules is None or not rules.commit:
        return "The verdict rules (reffuse/experiments/findings/) were applied outside a git checkout."
    state = ("with uncommitted changes to them: no commit records the rules this run applied"
             if rules.uncommitted_changes else "committed before this run, unchanged when it ran")
    return (f"The verdict rules are {' and '.join(f'`{f}`' for f in rules.files)} as of commit "
            f"`{rules.commit[:12]}` ({rules.committed_at}), {state}. Every comparison is a paired "
            "difference over the same held-out predictions with 95% intervals over windows and over blocks of 32 "
            "tokens; it counts only when resolved (both intervals exclude 0).")


def intervals_line(held_out: WindowsRecord) -> str:
    """Which interval over windows the run's comparisons use (reffuse.stats.paired_difference), and what it
    leaves out."""
    windows, texts = held_out.windows, len(held_out.spans)
    if windows < MIN_BOOTSTRAP_WINDOWS:
        return (f"The intervals over windows are t-intervals over the {windows} held-out windows' own means (marked "
                f"(t)): with fewer than {MIN_BOOTSTRAP_WINDOWS} windows a percentile bootstrap over windows covers "
                "less than 95%. The interval over blocks of 32 tokens is a bootstrap, and treats neighbouring blocks "
                "as independent.")
    return (f"The intervals over windows are percentile bootstraps over the {windows} held-out windows. The windows "
            f"come from {texts} texts and windows of one text are correlated, which these intervals, like the one "
            "over blocks of 32 tokens, do not model: they are narrower than an interval over texts would be.")


def revised_rules(rules: Provenance | None) -> list[RuleRevision]:
    """The revisions of the rules (findings.REVISIONS) dated after the commit of the rules a run was made under."""
    made = (rules.committed_at if rules is not None else None) or ""
    return [revision for revision in REVISIONS if revision.date > made[:10]]


def revision_text(rules: Provenance | None) -> str:
    """The revisions after the rules a run was made under, one clause each: the findings, then the change."""
    return "; ".join(f"({'every finding' if x.findings == 'all' else x.findings}) {x.change}"
                     for x in revised_rules(rules))


def revision_lines(r: StudyResult) -> list[str]:
    """For a run judged again by revised rules (run.rejudge): when and why, what changed, and which setup files
    changed after the commit the run recorded."""
    revision = r.revision
    if revision is None:
        return []
    rules = revision.rules
    if not rules.commit:
        under = "outside a git checkout"
    else:
        under = (f"under the rules as of commit `{rules.commit[:12]}` ({rules.committed_at})"
                 + (", with uncommitted changes to them" if rules.uncommitted_changes else ""))
    changes = revision_text(r.rules)
    lines = ["", f"**Rules revised on {revision.date}.** The results were seen before these rules "
                 f"were revised; this report judges them again by `{revision.command}`, nothing measured again, "
                 f"{under}. What changed: {changes}. The verdict column gives the verdict by the revised rules, the "
                 "column 'as run' the one the run recorded."] if changes else [
        "", f"**Judged again, {revision.date}**, by `{revision.command}`, nothing measured again, {under}: no "
            "rule was revised after those the run was made under. The column 'as run' gives the verdict the run "
            "recorded."]
    setup = revision.setup_changes
    recorded = ("The run recorded the commit of its setup files" if r.setup is not None else
                "The run recorded only the commit of its rule files, not that of the code that set it up (the "
                "corpus split, the planner, calibration)")
    if setup is None or setup.files is None:
        return lines + ["", f"{recorded}; which setup files changed since could not be read."]
    if not setup.files:
        return lines + ["", f"{recorded}, `{setup.since[:12]}`. No setup file changed after it, up to "
                            f"`{setup.head[:12]}`."]

    files = describe_changes(setup.files)
    return lines + ["", f"{recorded}, `{setup.since[:12]}`. Setup files changed after that commit, up to "
                        f"`{setup.head[:12]}`: {files}. The same command on the current code need not give "
                        "these numbers."]


def sink_variants(r: StudyResult) -> list[tuple[str, str, ScoredVariant]]:
    """(finding, variant, its scores) for every scored variant of the run, in the report's order."""
    variants = []
    for row in by_steps(r):
        variants += [("a, f, g", f"{row.steps} steps, fold", row.fold),
                     ("a, f, g", f"{row.steps} steps, last", row.last),
                     ("a, f, g", f"{row.steps} steps, calibrated", row.calibrated)]
    variants += [("b", f"{row.depth_reduction} FFNs removed", row.scores) for row in r.removal.rows]
    variants += [("c", row.label, row.scores) for row in r.last_ffn]
    for row in r.reversed:
        span = f"{row.span[0]}-{row.span[1]}"
        variants += [("d", f"{span} fused", row.fused), ("d", f"{span} reversed", row.reversed)]
    variants += [("e", f"whole blocks, {row.steps} step(s)", row.scores) for row in r.full_block.rows]
    variants += [("k", f"{row.steps} steps, cosine-M's plan", row.cosine_m_plan.scores) for row in r.intensity
                 if row.cosine_m_plan is not None]
    if r.equal_latency is not None:
        for row in r.equal_latency.removal:
            variants += [("i", f"{row.removed_count} FFNs removed, plain", row.plain),
                         ("i", f"{row.removed_count} FFNs removed, refit", row.refit)]
    if r.calibration_scale is not None:
        variants += [("j", f"{row.steps} steps calibrated on {row.tokens} tokens", row.scores)
                     for row in r.calibration_scale.rows]
    return [v for v in variants if v[2].sink_restored is not None]


def sink_section(r: StudyResult) -> list[str]:
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
        share = f"{1 - s.sink_restored / s.kl:.0%}" if s.kl > 0 else "-"
        lines.append(f"| ({finding}) | {name} | {format_kl(s.kl)} | {format_kl(s.sink_restored)} | {share} |")
    dependency = r.ffn_dependency
    if dependency.first_token_matrix is not None:
        a = dependency.blocks[0]
        lines += ["", f"FFN-level dependency M[i, j] inside the run (blocks {a}-{dependency.blocks[1]}): measured on "
                      "every token but the first (what the plans use), and on the first token alone, which that "
                      "matrix leaves out. Rows i, columns j > i.", ""]
        for title, matrix in (("all tokens but the first", dependency.matrix),
                              ("the first token alone", dependency.first_token_matrix)):
            size = len(matrix)
            lines += [f"{title}:", "", "| i \\ j | " + " | ".join(str(a + j) for j in range(1, size)) + " |",
                      "|---|" + "---:|" * (size - 1)]
            for i in range(size - 1):
                cells = ["" if matrix[i][j] is None else f"{matrix[i][j]:.3f}" for j in range(1, size)]
                lines.append(f"| {a + i} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def text_kind_section(r: StudyResult) -> list[str]:
    """The main variants' KL on each kind of held-out text (drama, verse) and on each text, from the per-window
    values: whether a finding rests on one kind."""
    spans = r.texts.held_out.spans
    window = r.texts.held_out.window
    if len({s.kind for s in spans}) < 2:
        return []
    owner = [s for s in spans for _ in range(s.tokens // window)]   # the text of each window, in order
    kinds = sorted({s.kind for s in spans})

    def mean_by_kind(scores: ScoredVariant) -> dict[str, float]:
        sums, counts = {}, {}
        for span, kl in zip(owner, scores.per_token.kl):
            sums[span.kind] = sums.get(span.kind, 0.0) + sum(kl)
            counts[span.kind] = counts.get(span.kind, 0) + len(kl)
        return {k: sums[k] / counts[k] for k in sums}

    variants = [v for row in by_steps(r) for v in ((f"{row.steps} steps, fold", row.fold),
                                                   (f"{row.steps} steps, calibrated", row.calibrated))]
    variants += [(f"{row.depth_reduction} FFNs removed", row.scores) for row in r.removal.rows]
    lines = ["", "## Held-out text by kind", "",
             "Each variant's KL on each kind of held-out text (the mean over its predictions), from the per-window "
             "values; the texts: " + "; ".join(f"{s.title} ({s.kind}, {s.tokens} tokens)" for s in spans)
             + ".", "", "| variant | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for name, scores in variants:
        by_kind = mean_by_kind(scores)
        lines.append(f"| {name} | " + " | ".join(format_kl(by_kind[k]) for k in kinds) + " |")
    return lines


def markdown(r: StudyResult, command: str) -> str:
    """The report as Markdown: setup, one section per finding with its table and verdict."""
    removal, env = r.attention_removal, r.environment
    a, b = r.region
    span = r.span
    texts = r.texts
    cal, held = texts.calibration, texts.held_out

    def spans(part: WindowsRecord) -> str:
        return "; ".join(f"{s.title} characters {s.start}-{s.end} ({s.tokens} tokens)"
                         for s in part.spans) or part.split

    sink = r.sink
    norms = sink.pre_fusion_norms
    jump = max(range(1, len(norms)), key=lambda i: norms[i] / norms[i - 1])  # the block whose output jumps most
    pre = r.pre_fusion

    lines = [f"# FFN Fusion experiments at small scale: {r.model_name}", "",
             "Produced by:", "", f"    {command}", "",
             f"{r.seconds / 60:.1f} minutes on {env.cores} cores ({env.threads} BLAS threads), load average "
             f"{env.load_average_1min_at_start:.1f} at the start and {env.load_average_1min_at_end:.1f} at the "
             f"end. The JSON beside this file holds every number; `reffuse.plots.experiments` draws the figures "
             "from it.", "",
             "## Setup", "",
             f"- **Attention removal** (standing in for Puzzle): every block's attention scored by the KL of removing "
             f"it alone on {removal.scoring_tokens} calibration tokens; removed: blocks **{removal.blocks_text}**"
             f" ({removal.rule}). Summed single scores {removal.summed_score:.3f} nats, measured jointly "
             f"{removal.joint_kl:.3f} nats: removals interact.",
             f"- The attention-free run is **{a}-{b}**; the span fused is **{span[0]}-{span[1]}** (the run without "
             "its last block, as in the paper).",
             f"- **Held-out text**: {spans(held)}: {held.windows} windows of {held.window} tokens. "
             f"**Calibration text** (scores, dependencies, calibration): {spans(cal)}. Disjoint: {texts.disjoint}.",
             f"- Original model perplexity {format_perplexity(r.original.perplexity)}; pre-fusion (attention removed) "
             f"{format_perplexity(pre.perplexity)}, KL to the original {format_kl(pre.kl_vs_original)}, "
             f"top-1 agreement {100 * pre.top1_vs_original:.1f}%.",
             "- Quality proxy: KL(pre-fusion || variant) in nats on held-out text (0 = the pre-fusion model), "
             "perplexity, top-1 agreement with the pre-fusion model, and KL to the original model. The paper's "
             "MMLU / MT-Bench have no counterpart at this scale.",
             f"- The attention sink: the first token's stream norm in the pre-fusion model grows from "
             f"{norms[jump - 1]:.0f} to {norms[jump]:.0f} in block {jump - 1} (massive activations; later attention "
             f"leans on it). The tables give that norm where the stream leaves the run (entering block "
             f"{sink.layer}; pre-fusion {sink.norm_leaving_run:.0f}) as 'sink norm'.", "",
             "## Verdicts", "", rules_line(r.rules), "", intervals_line(held), *revision_lines(r), ""]
    as_run = {v.finding: v.verdict for v in r.verdicts_as_run or []}
    lines += (["| finding | paper | here | verdict | as run |", "|---|---|---|---|---|"] if as_run else
              ["| finding | paper | here | verdict |", "|---|---|---|---|"])
    for v in r.verdicts:
        note = f"; {v.note}" if v.note else ""
        was = f" {as_run.get(v.finding, '-')} |" if as_run else ""
        lines.append(f"| ({v.finding}) {v.title} | {v.paper} | {v.here} | **{v.verdict}** ({v.rule}{note}) |{was}")

    for finding in ON_THE_PLANS:
        lines += finding.section(r)
    lines += text_kind_section(r)
    for finding in OTHERS:
        lines += finding.section(r)
    lines += sink_section(r)
    lines += ["", "## Figures", "",
              "![fusion intensity](fusion_intensity.png)", "",
              "![removal vs fusion](removal_vs_fusion.png)", "",
              "![ablations](ablations.png)", "",
              "![full-block parallelization](full_block.png)", "",
              "![attention removal scores](attention_scores.png)", ""]
    return "\n".join(lines)


VERDICT_ORDER = ("held", "partly held", "not resolved", "did not hold", "not measured")


def overlap_line(regions: list[RegionRow]) -> str:
    """Whether the regions' attention-removed blocks overlap: overlapping regions are not replications."""
    shared = set.intersection(*(set(r.blocks) for r in regions))
    pairs = sum(bool(set(a.blocks) & set(b.blocks)) for i, a in enumerate(regions) for b in regions[i + 1:])
    if not pairs:
        return "The regions do not overlap: no block's attention is removed in two of them."
    common = (f"; blocks {min(shared)}-{max(shared)} are in every one" if shared else "")
    every = len(regions) * (len(regions) - 1) // 2
    share = "every two of them share blocks" if pairs == every else f"{pairs} of the {every} pairs share blocks"
    return (f"**The regions overlap** ({', '.join(r.attention_removed for r in regions)}: {share}{common}), "
            "and all are judged on the same "
            "held-out text: they are the same study on neighbouring, largely shared parts of one model, not "
            "independent replications. A finding that holds in every region holds for these neighbouring "
            "regions, no more.")


def regions_markdown(summary: RegionSummary, command: str, minutes: float) -> str:
    """The replication across attention-removal regions: one row per finding, one column per region, and how
    many regions gave each verdict; each region's full report is in its folder."""
    regions = summary.regions
    lines = [f"# FFN Fusion experiments at small scale, repeated on {len(regions)} overlapping attention-removal "
             "regions", "", "Produced by:", "", f"    {command}", "",
             f"{minutes:.1f} minutes on this machine in all. Region k removes the attention of the window of "
             "consecutive blocks with the k-th least summed single-removal score; each region is a full run of "
             "(a)-(k), its report and JSON in `region-k/`.", "", overlap_line(regions), "",
             rules_line(summary.rules)]
    revision = summary.revision
    if revision is not None:
        rules = revision.rules
        lines += ["", f"**Rules revised on {revision.date}**, after these results were seen; every "
                      "region is judged again by them (`" + revision.command + "`, nothing measured again"
                      + (f"; rules as of commit `{rules.commit[:12]}`" if rules.commit else "")
                      + (", with uncommitted changes to them" if rules.uncommitted_changes else "")
                      + "): " + revision_text(summary.rules)
                      + ". Each cell gives the verdict by the revised rules, and in brackets the one the run "
                        "recorded where it differs. Each region's report says which setup files changed after "
                        "the commit the run recorded."]
    lines += ["", "| finding | " + " | ".join(f"[region {r.rank}](region-{r.rank}/README.md): attention removed "
                                              f"{r.attention_removed}, span {r.span[0]}-{r.span[1]}"
                                              for r in regions) + " | over the regions |",
              "|---|" + "---|" * len(regions) + "---|"]
    for finding in summary.findings:
        cells = []
        for r in regions:
            now, was = r.verdicts[finding.finding], (r.verdicts_as_run or {}).get(finding.finding)
            cells.append(now if was in (None, now) else f"{now} (as run: {was})")
        counts = ", ".join(f"{verdict} {finding.counts[verdict]}" for verdict in VERDICT_ORDER
                           if verdict in finding.counts)
        lines.append(f"| ({finding.finding}) {finding.title} | " + " | ".join(cells) + f" | {counts} |")
    region_columns = ["| predictor | " + " | ".join(f"region {r.rank}" for r in regions) + " |",
                      "|---|" + "---|" * len(regions)]
    if all(r.predictors is not None for r in regions):
        lines += ["", "(h) Spearman rank correlation of each predictor with the damage of every contiguous group of "
                      "the span fused alone, on calibration text, [95% bootstrap interval over groups]:", "",
                  *region_columns]
        for name in regions[0].predictors:
            cells = []
            for r in regions:
                c = r.predictors[name]
                cells.append(format_correlation(c.spearman) + ("" if c.interval_95 is None else
                                                               f" [{c.interval_95[0]:+.2f}, {c.interval_95[1]:+.2f}]"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tables = [r.predictors_against_size for r in regions]
    if all(table is not None and table.correlations for table in tables):
        lines += ["", f"(h) without the adjacent pairs (a pair's neighbour damage is its measured damage): Spearman "
                      f"with the damage of the {tables[0].groups} groups of three or more blocks [95% bootstrap "
                      "interval], and the lead over the groups' size [paired bootstrap interval]:", "",
                  *region_columns]
        for name in tables[0].correlations:
            cells = []
            for table in tables:
                c = table.correlations[name]
                cells.append(f"{format_correlation(c.correlation.spearman)} "
                             f"{format_interval(c.correlation.interval_95)}"
                             + ("" if c.lead is None else f"; lead {format_correlation(c.lead.lead)} "
                                                          f"{format_interval(c.lead.interval_95)}"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Summed single-removal scores of the regions (nats): "
              + ", ".join(f"region {r.rank} {r.summed_score:.4f}" for r in regions) + ".", ""]
    return "\n".join(lines)
