"""Figures, one module per concept; this file holds what they share.

matplotlib is optional (the `real` and `lectures` extras). Figures are deterministic: the Agg backend, fixed
sizes and fonts, and PNG metadata stripped, so that the same data gives the same bytes (tests check it).
"""

from __future__ import annotations

from pathlib import Path

from reffuse.optional import require

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed)."""
    matplotlib = require("matplotlib", "real", "drawing figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 9, "axes.titlesize": 10,
                         "svg.hashsalt": "reffuse", "path.simplify": True})
    return plt


def save_figure(fig, path) -> Path:
    """Write `fig` as a PNG with no metadata (no date, no version string), then close it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return path
