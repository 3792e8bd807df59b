"""(c) The last FFN of the run: fusing [a, b-1] (the paper's span, the last FFN left out) vs [a+1, b] vs [a, b], one
group each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.rules import Verdict, decide, difference
from reffuse.experiments.study import SCORE_COLUMNS, ScoredVariant, Study, format_kl, score_cells

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult

LAST_FFN_CHOICES = ("leave out the last FFN", "leave out the first FFN", "the whole run, last FFN included")


@dataclass(frozen=True)
class LastFfnRow:
    """One choice of LAST_FFN_CHOICES: the group it fuses and the scores."""
    label: str
    group: tuple[int, int]
    scores: ScoredVariant

    def to_json(self) -> dict:
        return {"label": self.label, "group": list(self.group), **self.scores.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> LastFfnRow:
        return cls(raw["label"], tuple(raw["group"]), ScoredVariant.from_json(raw))


def last_ffn(study: Study) -> list[LastFfnRow]:
    """Fusing [a, b-1] vs [a+1, b] vs [a, b], one group each."""
    a, b = study.region
    groups = dict(zip(LAST_FFN_CHOICES, [(a, b - 1), (a + 1, b), (a, b)]))
    return [LastFfnRow(label, group, study.scores(fuse(study.pre, [group]), a)) for label, group in groups.items()]


def judge(r: StudyResult) -> Verdict:
    last = {row.label: row for row in r.last_ffn}
    left_out = last["leave out the last FFN"]
    versus = {label: difference(left_out.scores, row.scores) for label, row in last.items()
              if label != "leave out the last FFN"}
    whole = versus["the whole run, last FFN included"]
    return Verdict(
        "c", "the last FFN of a run",
        paper="including the run's last FFN hurts most (MT-Bench 8.25 -> 7.30 when layers 51 and 70 are included); "
              "shifting the group by one to include it is worse than leaving it out",
        here="; ".join(f"{row.label} ({row.group[0]}-{row.group[1]}) KL {format_kl(row.scores.kl)}"
                       for row in r.last_ffn)
             + "; leaving out the last FFN against "
             + "; ".join(f"{label}: {describe(d)}" for label, d in versus.items()),
        rule="held if leaving out the last FFN has a resolved lower KL than both other choices; partly if only "
             "than the whole run; did not hold if the whole run is resolved lower; else not resolved",
        verdict=decide(all(d.lower for d in versus.values()), whole.lower, whole.higher))


def section(r: StudyResult) -> list[str]:
    """Each of the three groups' scores."""
    lines = ["", "## (c) The last FFN", "", "| group | " + SCORE_COLUMNS[1:], "|---|---:|---:|---:|---:|---:|"]
    for row in r.last_ffn:
        lines.append(f"| {row.label}: {row.group[0]}-{row.group[1]} | {score_cells(row.scores)} |")
    return lines
