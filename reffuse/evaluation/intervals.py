"""The text of a paired comparison of two variants scored on the same held-out predictions
(reffuse.stats.paired_difference: the mean of x - y, its 95% intervals over windows, a bootstrap or from few
windows a t-interval, and over token blocks, and the sign count).
"""

from __future__ import annotations

import math

from reffuse.stats import PairedDifference


def describe(diff: PairedDifference) -> str:
    """'+0.0123 [+0.0050, +0.0190] over windows, [+0.0061, +0.0180] over tokens, lower in 2/8 windows', the
    numbers to three significant digits of the largest of them; "over windows (t)" where the interval over windows
    is a t-interval (few windows), not a bootstrap."""
    w, t = diff.windows_interval_95, diff.tokens_interval_95
    largest = max(abs(v) for v in [diff.mean, *w, *t])

    def number(v):
        if largest < 1e-3:
            return f"{v:+.2e}"
        return f"{v:+.{max(0, 2 - math.floor(math.log10(largest)))}f}"

    by_t = " (t)" if diff.windows_interval == "t" else ""
    return (f"{number(diff.mean)} [{number(w[0])}, {number(w[1])}] over windows{by_t}, "
            f"[{number(t[0])}, {number(t[1])}] "
            f"over tokens, lower in {diff.x_below_y_windows}/{diff.windows} windows"
            + ("" if diff.resolved else ", not resolved"))
