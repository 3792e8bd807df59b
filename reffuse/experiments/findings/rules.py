"""What the rules of the findings share: the Verdict they return, the words it may hold, the paired difference
every comparison is, and the revisions of the rules made after runs were seen (REVISIONS)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from reffuse.experiments.study import ScoredVariant
from reffuse.stats import MIN_BOOTSTRAP_WINDOWS, PairedDifference, paired_difference


@dataclass(frozen=True)
class RuleRevision:
    """A revision of the rules made after runs were seen."""
    date: str        # ISO 8601 day
    findings: str    # the findings whose verdicts the change can move: letters, or "all" for every comparison
    change: str


# The rules revised after runs already made, newest last. A report of a run made under earlier rules lists the
# revisions dated after them.
REVISIONS = (
    RuleRevision(
        "2026-12-05", "all",
        f"an interval over fewer than {MIN_BOOTSTRAP_WINDOWS} held-out windows is a t-interval over the "
        "windows' own means, no longer a percentile bootstrap over windows (which covers less than 95% with "
        "so few: about 90% with 8)"),
    RuleRevision(
        "2026-12-05", "h",
        "the adjacent pairs are left out of every predictor's rank correlation (a pair's neighbour damage is "
        "its measured damage itself), and cosine-M counts only where it ranks the damage better than the "
        "groups' size does (was: its rank correlation over all groups above 0)"),
    RuleRevision(
        "2026-12-05", "e",
        "the rank correlation of M_max with the damage of the single windows is given with its bootstrap "
        "interval (a note; the verdict is unchanged)"),
)


@dataclass(frozen=True)
class Verdict:
    """A finding judged against the paper's observation."""
    finding: str
    title: str
    paper: str      # what the paper observed
    here: str       # what was measured here
    rule: str       # what decides
    verdict: str
    note: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, raw: dict) -> Verdict:
        return cls(**raw)


def decide(ok: bool, partly: bool = False, against: bool = True) -> str:
    """held / partly held; else "did not hold" when the data resolve against the paper, "not resolved" when not."""
    return "held" if ok else "partly held" if partly else "did not hold" if against else "not resolved"


def decide_lower(diffs: list[PairedDifference], also_partly: bool = False) -> str:
    """The rule most findings share, for differences x - y where the paper expects x lower: held if every one is
    resolved lower; partly if some are (or `also_partly`) and none is resolved higher; did not hold if some are
    resolved higher and none lower; else not resolved."""
    some_lower, some_higher = any(d.lower for d in diffs), any(d.higher for d in diffs)
    return decide(all(d.lower for d in diffs), (some_lower or also_partly) and not some_higher,
                  some_higher and not some_lower)


def difference(x: ScoredVariant, y: ScoredVariant, measure: str = "kl", y_scale: float = 1.0) -> PairedDifference:
    """The paired difference x - y_scale·y of two scored variants' per-prediction `measure` ("kl" or "nll")."""
    return paired_difference(getattr(x.per_token, measure),
                             [np.asarray(w) * y_scale for w in getattr(y.per_token, measure)])

