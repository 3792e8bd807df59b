"""(f) Norm "fold" (exact, each block's gain folded into its own weights) vs "last" (the paper's: every fused FFN
reads the last block's norm), at every k of (a). Both are measured with (a), and (f)'s KL is a column of (a)'s
table: this finding has a rule and no section of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.a_intensity import by_steps
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference
from reffuse.experiments.study import format_kl

if TYPE_CHECKING:  # named for the annotations only
    from reffuse.experiments.findings import StudyResult


def judge(r: StudyResult) -> Verdict:
    rows = by_steps(r)
    diffs = [difference(row.fold, row.last) for row in rows]
    return Verdict(
        "f", "fold vs last norm",
        paper="the paper feeds every fused FFN the last block's norm (its §3) and does not ablate it; folding each "
              "block's gain into its weights is exact for the parallel form [INF]",
        here="; ".join(f"{row.steps} steps: fold KL {format_kl(row.fold.kl)}, last "
                       f"{format_kl(row.last.kl)}, fold - last {describe(d)}" for row, d in zip(rows, diffs)),
        rule="not a test of the paper: held if fold is resolved better at every k; partly if at some k and "
             "resolved worse at none; did not hold if last is resolved better at some k and fold at none; else "
             "not resolved",
        verdict=decide_lower(diffs))
