"""(d) Reversed order vs fusion: the blocks of a span run sequentially in reverse order, against fusing them,
judged by an equivalence test: the paper found that the two cost about as much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.rules import Verdict, decide, difference
from reffuse.experiments.study import ScoredVariant, Study, format_kl, format_perplexity, reversed_run
from reffuse.stats import PairedDifference, verdict

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult


@dataclass(frozen=True)
class ReversedRow:
    """A span [first, last] fused into one group, and run sequentially in reverse order."""
    span: tuple[int, int]
    fused: ScoredVariant
    reversed: ScoredVariant

    @property
    def length(self) -> int:
        return self.span[1] - self.span[0] + 1

    def to_json(self) -> dict:
        return {"span": list(self.span), "fused": self.fused.to_json(), "reversed": self.reversed.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> ReversedRow:
        return cls(tuple(raw["span"]), ScoredVariant.from_json(raw["fused"]), ScoredVariant.from_json(raw["reversed"]))


def reversed_order(study: Study) -> list[ReversedRow]:
    """The blocks of a span run sequentially in reverse order, against fusing them: the first and last spans of
    up to 4 blocks, and the whole span."""
    span = study.span
    half = min(4, study.length)
    return [ReversedRow((first, last), study.scores(fuse(study.pre, [(first, last)]), first),
                        study.scores(reversed_run(study.pre, first, last), first))
            for first, last in sorted({(span[0], span[0] + half - 1), (span[1] - half + 1, span[1]), span})]


# (d)'s equivalence margin: "about as much" as the paper's 0.25 points of about 84 is 0.3%; at this scale a KL
# ratio is the proxy, and the margin is a fifth of the fused KL either way.
REVERSED_MARGIN = 0.2


def within_margin(d: PairedDifference, margin: float) -> bool:
    """Both intervals of the difference d lie within [-margin, +margin]: the two variants are equivalent."""
    return all(verdict(interval, -margin, ">=") == "met" and verdict(interval, margin, "<=") == "met"
               for interval in (d.windows_interval_95, d.tokens_interval_95))


def beyond_margin(d: PairedDifference, margin: float) -> bool:
    """Both intervals of the difference d lie wholly beyond the margin on the side of its mean: the two variants
    differ by more than it."""
    side, threshold = (">", margin) if d.mean > 0 else ("<", -margin)
    return d.mean != 0 and all(verdict(interval, threshold, side) == "met"
                               for interval in (d.windows_interval_95, d.tokens_interval_95))


def judge(r: StudyResult) -> Verdict:
    diffs = [difference(row.reversed, row.fused) for row in r.reversed]
    margins = [REVERSED_MARGIN * row.fused.kl for row in r.reversed]
    inside = [within_margin(d, m) for d, m in zip(diffs, margins)]
    outside = [beyond_margin(d, m) for d, m in zip(diffs, margins)]
    return Verdict(
        "d", "reversed order vs fusion",
        paper="running a span's FFNs in reverse order costs about as much as fusing them (combined accuracy within "
              "0.25 points, e.g. [42,49] 83.74 fused vs 83.52 reversed)",
        here="; ".join(f"{row.span[0]}-{row.span[1]}: fused KL {format_kl(row.fused.kl)}, reversed "
                       f"{format_kl(row.reversed.kl)}, reversed - fused {describe(d)} (margin ±{format_kl(m)}: "
                       + ("within it" if within else "beyond it" if beyond else "neither within it nor beyond it")
                       + ")" for row, d, m, within, beyond in zip(r.reversed, diffs, margins, inside, outside)),
        rule=f"an equivalence test: held if, for every span, both intervals of reversed - fused lie within "
             f"±{REVERSED_MARGIN:.0%} of the fused KL; did not hold if for some span both lie wholly beyond it; "
             "partly if some spans are within; else not resolved",
        verdict=decide(all(inside), any(inside) and not any(outside), any(outside)))


def section(r: StudyResult) -> list[str]:
    """Each span fused and reversed, side by side."""
    lines = ["", "## (d) Reversed order vs fusion", "",
             "| span | fused KL | reversed KL | fused perplexity | reversed perplexity | fused sink norm | "
             "reversed sink norm |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r.reversed:
        lines.append(f"| {row.span[0]}-{row.span[1]} | {format_kl(row.fused.kl)} | "
                     f"{format_kl(row.reversed.kl)} | {format_perplexity(row.fused.perplexity)} | "
                     f"{format_perplexity(row.reversed.perplexity)} | "
                     f"{row.fused.sink_norm:.0f} | {row.reversed.sink_norm:.0f} |")
    return lines
