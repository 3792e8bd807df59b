"""The findings (a)-(k) of `reffuse experiments`, one module each: the record of what the finding measures and the
function that measures it on a Study, the rule (`judge`) that turns the measurement into a verdict against the
paper's observation, and the finding's section of the report (`section`). A new finding is a new module, named in
FINDINGS and in the report's order below, with its measurement a field of StudyResult (findings.result).

A rule reads only the run's StudyResult (so it can be re-applied to a committed run, read back from its JSON) and
returns a Verdict (findings.rules): "held", "partly held", "did not hold", "not resolved" or "not measured", or
None where the run did not measure the finding.

Every comparison a rule makes is a paired difference over the same held-out predictions
(reffuse.stats.paired_difference): its mean, a 95% interval over windows and one over token blocks, and the sign
count. A difference counts for a verdict only when it is resolved (both intervals exclude 0); where the rule's
comparisons are not resolved the verdict says so. Whether an interval lies on a side of a threshold is decided by
reffuse.stats.verdict. The rules were fixed before the run that applies them; the report names the commit they
come from. A rule revised after a run's results were seen is listed in REVISIONS with its date, and a run judged
again by it (`reffuse experiments --report-only`) keeps the verdicts it recorded beside the new ones.
"""

from __future__ import annotations

from reffuse.experiments.findings import (a_intensity, b_removal, c_last_ffn, d_reversed, e_full_block, f_norm,
                                          g_calibrated, h_predictors, i_equal_latency, j_calibration_scale, k_planner)
from reffuse.experiments.findings.a_intensity import by_steps
from reffuse.experiments.findings.result import StudyResult
from reffuse.experiments.findings.rules import REVISIONS, Verdict, decide, difference

# The findings in letter order, the order of the verdict table; RULES, their rules in that order.
FINDINGS = (a_intensity, b_removal, c_last_ffn, d_reversed, e_full_block, f_norm, g_calibrated, h_predictors,
            i_equal_latency, j_calibration_scale, k_planner)
RULES = tuple(finding.judge for finding in FINDINGS)

# The order of the findings' sections in the report (reffuse.experiments.report): first those measured on the plans
# of (a), whose KL the report then breaks down by kind of held-out text, then the others. (f) has no section of its
# own: its KL is a column of (a)'s table.
ON_THE_PLANS = (a_intensity, g_calibrated, b_removal, k_planner, i_equal_latency, j_calibration_scale)
OTHERS = (c_last_ffn, d_reversed, e_full_block, h_predictors)

# What other modules take from the package: the above, the result, and what the rules share.
__all__ = ["FINDINGS", "ON_THE_PLANS", "OTHERS", "REVISIONS", "RULES", "StudyResult", "Verdict", "by_steps", "decide",
           "difference", "verdicts"]


def verdicts(result: StudyResult) -> list[Verdict]:
    """One verdict per finding, by the rules of FINDINGS: (a)-(h), and (i)-(k) where the run measured them (runs
    made before they existed did not)."""
    return [v for v in (rule(result) for rule in RULES) if v is not None]
