"""`reffuse figures` is deterministic: two runs write the same bytes, and those are the committed figures/.

Each run is a fresh process (`python -m reffuse figures`), so nothing cached in one process (fonts, hash seeds)
can make two runs agree that would not agree on another day. The figures are drawn from committed results
only, so this takes seconds.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "figures"


def draw(out: Path) -> dict[str, bytes]:
    done = subprocess.run([sys.executable, "-m", "reffuse", "figures", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, f"reffuse figures failed:\n{done.stderr[-3000:]}"
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_figures_are_deterministic_and_match_the_committed_ones(tmp_path):
    first, second = draw(tmp_path / "A"), draw(tmp_path / "B")
    assert len(first) >= 8, f"only {len(first)} figures: {sorted(first)}"
    assert first.keys() == second.keys()
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"two runs gave different bytes for {differ}"

    committed = {p.name: p.read_bytes() for p in sorted(COMMITTED.glob("*.png"))}
    assert committed.keys() == first.keys(), \
        "figures/ does not hold exactly the figures `reffuse figures` draws: run `reffuse figures --out figures/`"
    stale = [name for name in first if first[name] != committed[name]]
    assert not stale, f"committed figures differ from a fresh draw: {stale}; run `reffuse figures --out figures/`"
