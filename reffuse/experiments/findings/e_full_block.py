"""(e) Full-block parallelization: the paper's greedy selection (reffuse.method.metrics.greedy_windows) of windows of
4 blocks that have both attention and an FFN, on the block-level dependency matrix of the pre-fusion model, 1 to 4
steps, each window run as x + Σ_j h_j(x) with h_j(x) = f_j(x) - x the whole block's update. This combination rule
is [INF]: the paper does not write it down (its App. B); it is eq. 5 for whole blocks. And every eligible window
alone, to see whether M predicts the damage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reffuse.core.layout import format_groups, full_blocks
from reffuse.evaluation.intervals import describe
from reffuse.evaluation.prefix import cache_prefix, score_variant, sink_restored
from reffuse.experiments.findings.rules import Verdict, decide, difference
from reffuse.experiments.study import (DEFINITIONS, MAX_STEPS, WINDOW, ScoredVariant, Study, format_interval,
                                       format_kl, format_perplexity)
from reffuse.method.metrics import (GreedyStep, block_evaluations_needed, dependency, greedy_windows,
                                    matrix_to_json, window_statistics)
from reffuse.progress import Progress
from reffuse.records import FlatRecord, as_tuple
from reffuse.stats import spearman, spearman_interval, verdict

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult


@dataclass(frozen=True)
class FullBlockRow:
    """The first `steps` greedy windows run in parallel together, and the scores (no sink norm is recorded)."""
    steps: int
    windows: tuple[tuple[int, int], ...]
    windows_text: str
    scores: ScoredVariant

    def to_json(self) -> dict:
        return {"steps": self.steps, "windows": [list(w) for w in self.windows], "windows_text": self.windows_text,
                **self.scores.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> FullBlockRow:
        return cls(raw["steps"], as_tuple(raw["windows"]), raw["windows_text"], ScoredVariant.from_json(raw))


@dataclass(frozen=True)
class SingleWindow(FlatRecord):
    """One eligible window [first, last] parallelized alone: its M_max and M_sum, and its KL on the first two
    held-out windows."""
    first: int
    last: int
    max: float
    sum: float
    kl: float


@dataclass(frozen=True)
class FullBlock:
    """Finding (e)'s measurement: the greedy steps and the rows they give, the block-level dependency matrix they
    were chosen on, and every eligible window alone."""
    window: int                            # blocks per window
    greedy: list[GreedyStep]
    rows: list[FullBlockRow]
    matrix: list[list[float | None]]       # block-level M (reffuse.method.metrics.matrix_to_json)
    tokens: int                            # calibration tokens M was measured on
    eligible_blocks: list[int]             # blocks with both attention and an FFN
    single_windows: list[SingleWindow]
    single_window_tokens: int
    rank_correlation_max_kl: float | None  # Spearman of the single windows' M_max with their KL

    def to_json(self) -> dict:
        return {"window": self.window, "greedy": [s.to_json() for s in self.greedy],
                "rows": [row.to_json() for row in self.rows], "matrix": self.matrix, "tokens": self.tokens,
                "eligible_blocks": self.eligible_blocks, "single_windows": [w.to_json() for w in self.single_windows],
                "single_window_tokens": self.single_window_tokens,
                "rank_correlation_max_kl": self.rank_correlation_max_kl}

    @classmethod
    def from_json(cls, raw: dict) -> FullBlock:
        return cls(raw["window"], [GreedyStep.from_json(s) for s in raw["greedy"]],
                   [FullBlockRow.from_json(row) for row in raw["rows"]], raw["matrix"], raw["tokens"],
                   raw["eligible_blocks"], [SingleWindow.from_json(w) for w in raw["single_windows"]],
                   raw["single_window_tokens"], raw["rank_correlation_max_kl"])


def full_block(study: Study) -> FullBlock:
    """The paper's greedy selection of windows of 4 blocks that have attention and an FFN, on the block-level
    dependency matrix of the pre-fusion model, 1 to 4 steps, each window run as x + Σ_j (f_j(x) - x); and every
    eligible window alone, to see whether M predicts the damage."""
    pre, prefix = study.pre, study.prefix
    eligible = full_blocks(pre)
    block_windows = study.texts.scoring(study.dependency_tokens, min(study.window, 64))
    with Progress("block-level dependencies", block_evaluations_needed(pre, len(block_windows), ("block",)),
                  "block evaluations") as bar:
        block_M = dependency(pre, list(block_windows), granularities=("block",), progress=bar.update).matrices["block"]
    steps = greedy_windows(block_M, WINDOW, eligible=eligible, max_steps=MAX_STEPS)
    rows = []
    for n in range(1, len(steps) + 1):
        chosen = [(s.first, s.last) for s in steps[:n]]
        first = min(s for s, _ in chosen)
        s = score_variant(prefix, pre, first, reference=study.original_prefix, parallel=chosen, whole_blocks=True,
                          per_token=True)
        restored = sink_restored(prefix, pre, first, max(e for _, e in chosen) + 1, chosen, whole_blocks=True)
        rows.append(FullBlockRow(n, tuple(chosen), format_groups(chosen),
                                 ScoredVariant(s.kl_from_base, s.perplexity, s.top1_agreement, s.kl_from_reference,
                                               per_token=s.per_token, sink_restored=restored.kl_from_base)))
    scan = cache_prefix(pre, study.texts.held_out.ids[:2])  # the first two held-out windows
    candidates = [w for w in window_statistics(block_M, WINDOW)
                  if math.isfinite(w.max) and all(eligible[w.first:w.last + 1])]
    single = []
    with Progress("full-block windows one at a time", len(candidates), "windows") as bar:
        for w in candidates:
            kl = score_variant(scan, pre, w.first, kl_only=True, parallel=[(w.first, w.last)],
                               whole_blocks=True).kl_from_base
            single.append(SingleWindow(w.first, w.last, w.max, w.sum, kl))
            bar.update()
    return FullBlock(WINDOW, steps, rows, matrix_to_json(block_M), study.dependency_tokens,
                     [i for i, e in enumerate(eligible) if e], single, int(study.texts.held_out.ids[:2].size),
                     spearman([w.max for w in single], [w.kl for w in single]))


def max_kl_interval(full: FullBlock) -> list[float] | None:
    """The 95% bootstrap interval over the single windows of the rank correlation of their M_max with their KL."""
    return spearman_interval([w.max for w in full.single_windows], [w.kl for w in full.single_windows])


def _prediction_note(full: FullBlock) -> str:
    single = full.single_windows
    if not single:
        return ""
    best, worst = min(single, key=lambda w: w.kl), max(single, key=lambda w: w.kl)
    rho = full.rank_correlation_max_kl
    if rho is None:
        return ""
    interval = max_kl_interval(full)
    side = ("resolved above 0" if verdict(interval, 0.0, ">") == "met" else
            "resolved below 0" if verdict(interval, 0.0, "<") == "met" else
            "not resolved: the data do not say whether M_max ranks the damage")
    judged = f"{format_interval(interval)} (bootstrap over the windows), {side}"
    return (f"each of the {len(single)} eligible windows alone: KL from {format_kl(best.kl)} ({best.first}-"
            f"{best.last}) to {format_kl(worst.kl)} ({worst.first}-{worst.last}); rank correlation of "
            f"M_max with that KL {rho:.2f} {judged}")


def judge(r: StudyResult) -> Verdict:
    full = r.full_block.rows
    if not full:
        return Verdict("e", "full-block parallelization", paper="see the paper's App. B, Table 7",
                       here="no window of 4 consecutive blocks with attention and FFN exists", rule="-",
                       verdict="not measured")
    ffn_four = next((row.fused for row in r.reversed if row.length == WINDOW), None)
    collapse = difference(full[-1].scores, full[1].scores, y_scale=2.0) if len(full) >= 2 else None  # last - 2 x step 2
    harder = difference(full[0].scores, ffn_four) if ffn_four is not None else None                  # 1 window - 4 FFNs
    here = "; ".join(f"step {row.steps} (+{row.windows_text.split(',')[-1]}, M_max {step.max:.3f}) KL "
                     f"{format_kl(row.scores.kl)}" for row, step in zip(full, r.full_block.greedy))
    if collapse is not None:
        here += f"; KL after the last step - 2 x after step 2: {describe(collapse)}"
    if harder is not None:
        here += (f"; one window of {WINDOW} whole blocks - fusing {WINDOW} attention-free FFNs (KL "
                 f"{format_kl(ffn_four.kl)}): {describe(harder)}")
    cheap_start = collapse is not None and collapse.higher
    return Verdict(
        "e", "full-block parallelization",
        paper="greedy windows of 4 whole blocks: the first two steps are cheap (MMLU 80.73 -> 80.51 -> 80.04), the "
              "third and fourth collapse (77.86, 56.12); whole blocks are harder to parallelize than FFNs",
        here=here,
        rule=f"held if the KL after the last step is resolved above twice the KL after step 2 (cheap first steps, "
             f"then a collapse) and one window of {WINDOW} whole blocks has a resolved higher KL than fusing {WINDOW} "
             f"attention-free FFNs; partly if one of the two holds; did not hold if the window of whole blocks is "
             f"resolved lower; else not resolved",
        verdict=decide(cheap_start and harder is not None and harder.higher,
                       cheap_start or (harder is not None and harder.higher),
                       harder is not None and harder.lower),
        note=_prediction_note(r.full_block))


def section(r: StudyResult) -> list[str]:
    """The greedy steps, then every eligible window alone with the rank correlation of M_max with its KL."""
    full = r.full_block
    lines = ["", "## (e) Full-block parallelization", "",
             f"Rule: {DEFINITIONS['full_block_rule']}. Greedy selection (lowest M_max, ties by M_sum) over windows "
             f"of {full.window} blocks that have both attention and an FFN, on the block-level dependency matrix "
             f"of the pre-fusion model ({full.tokens} calibration tokens).", "",
             "| steps | windows in parallel | M_max of the new window | KL | perplexity | top-1 | KL vs original |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row, step in zip(full.rows, full.greedy):
        s = row.scores
        lines.append(f"| {row.steps} | {row.windows_text} | {step.max:.4f} | {format_kl(s.kl)} | "
                     f"{format_perplexity(s.perplexity)} | {100 * s.top1:.1f}% | {format_kl(s.kl_vs_original)} |")
    if full.single_windows:
        lines += ["", f"Every eligible window alone (first {full.single_window_tokens} held-out tokens), to see "
                      "whether M_max predicts the damage:", "", "| window | M_max | M_sum | KL |",
                  "|---|---:|---:|---:|"]
        for w in sorted(full.single_windows, key=lambda w: w.max):
            lines.append(f"| {w.first}-{w.last} | {w.max:.4f} | {w.sum:.4f} | {format_kl(w.kl)} |")
        rho = full.rank_correlation_max_kl
        if rho is not None:
            lines += ["", f"Spearman rank correlation between M_max and KL: **{rho:.2f}**, 95% interval "
                          f"{format_interval(max_kl_interval(full))} (bootstrap over the windows)."]
    return lines
