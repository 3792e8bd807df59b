"""What the rules of the findings share: the Verdict they return, the words it may hold, the paired difference
every comparison is, and the revisions of the rules made after runs were seen (REVISIONS)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from reffuse.stats import MIN_BOOTSTRAP_WINDOWS, paired_difference

# The rules revised after runs already made, newest last: the date, the findings whose verdicts the
# change can move ("all" for every comparison), and what changed. A report of a run made under earlier rules lists
# the revisions dated after them.
REVISIONS = (
    {"date": "2026-12-05", "findings": "all",
     "change": f"an interval over fewer than {MIN_BOOTSTRAP_WINDOWS} held-out windows is a t-interval over the "
               "windows' own means, no longer a percentile bootstrap over windows (which covers less than 95% with "
               "so few: about 90% with 8)"},
    {"date": "2026-12-05", "findings": "h",
     "change": "the adjacent pairs are left out of every predictor's rank correlation (a pair's neighbour damage is "
               "its measured damage itself), and cosine-M counts only where it ranks the damage better than the "
               "groups' size does (was: its rank correlation over all groups above 0)"},
    {"date": "2026-12-05", "findings": "e",
     "change": "the rank correlation of M_max with the damage of the single windows is given with its bootstrap "
               "interval (a note; the verdict is unchanged)"},
)


@dataclass
class Verdict:
    finding: str
    title: str
    paper: str      # what the paper observed
    here: str       # what was measured here
    rule: str       # what decides
    verdict: str
    note: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def decide(ok: bool, partly: bool = False, against: bool = True) -> str:
    """held / partly held; else "did not hold" when the data resolve against the paper, "not resolved" when not."""
    return "held" if ok else "partly held" if partly else "did not hold" if against else "not resolved"


def decide_lower(diffs: list[dict], also_partly: bool = False) -> str:
    """The rule most findings share, for differences x - y where the paper expects x lower: held if every one is
    resolved lower; partly if some are (or `also_partly`) and none is resolved higher; did not hold if some are
    resolved higher and none lower; else not resolved."""
    some_lower, some_higher = any(lower(d) for d in diffs), any(higher(d) for d in diffs)
    return decide(all(lower(d) for d in diffs), (some_lower or also_partly) and not some_higher,
                  some_higher and not some_lower)


def difference(x: dict, y: dict, measure: str = "kl", y_scale: float = 1.0) -> dict:
    """The paired difference x - y_scale·y of two scored variants' per-prediction `measure` (kl or nll)."""
    return paired_difference(x["per_token"][measure], [np.asarray(w) * y_scale for w in y["per_token"][measure]])


def lower(d: dict) -> bool:
    """x resolved below y."""
    return d["resolved"] and d["mean"] < 0


def higher(d: dict) -> bool:
    """x resolved above y."""
    return d["resolved"] and d["mean"] > 0


def by_steps(r: dict) -> list[dict]:
    """The rows of finding (a), most steps first."""
    return sorted(r["intensity"], key=lambda row: -row["steps"])
