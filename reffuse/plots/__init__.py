"""Figures, one module per concept; this file holds what they share.

matplotlib is optional (the `real` and `lectures` extras). Figures are deterministic: the Agg backend, fixed
sizes and fonts, and PNG metadata stripped, so that the same data gives the same bytes (tests check it).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from reffuse.outputs import write_bytes_atomic
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


def drawing_versions() -> dict:
    """The libraries whose versions decide the PNG bytes: the same data can rasterise differently in another."""
    matplotlib = require("matplotlib", "real", "drawing figures")
    from matplotlib import ft2font

    return {"matplotlib": matplotlib.__version__, "freetype": ft2font.__freetype_version__}


def _rounded(values) -> list:
    import numpy as np

    array = np.ma.filled(np.ma.asarray(values, dtype=float), np.nan)
    return [None if not np.isfinite(v) else float(f"{v:.6g}") for v in array.ravel()]


def figure_data(fig) -> dict:
    """What a figure shows, independent of how it is rasterised or laid out: per axes its title and labels, the
    data of its lines and bars, scatter offsets, images and texts, in data coordinates, to 6 significant digits."""
    from matplotlib.patches import Rectangle

    axes = []
    for ax in fig.axes:
        axes.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                     "lines": [_rounded(line.get_xydata()) for line in ax.get_lines()],
                     "bars": [_rounded([p.get_x(), p.get_y(), p.get_width(), p.get_height()])
                              for p in ax.patches if isinstance(p, Rectangle)],
                     "collections": [_rounded(c.get_offsets()) for c in ax.collections],
                     "images": [_rounded(image.get_array()) for image in ax.images],
                     "texts": [t.get_text() for t in ax.texts]})
    return {"axes": axes, "texts": [t.get_text() for t in fig.texts]}


def data_digest(fig) -> str:
    """sha256 of figure_data(fig)."""
    return hashlib.sha256(json.dumps(figure_data(fig), sort_keys=True).encode()).hexdigest()


def show(fig) -> None:
    """Display a figure in a notebook (reffuse draws on the Agg backend, which has no window), then close it."""
    display = require("IPython.display", "lectures", "showing figures in a notebook")
    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    pyplot().close(fig)
    display.display(display.Image(png.getvalue()))


def save_figure(fig, path) -> Path:
    """Write `fig` as a PNG with no metadata (no date, no version string), then close it."""
    plt = pyplot()
    png = io.BytesIO()
    fig.savefig(png, format="png", metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, png.getvalue())
