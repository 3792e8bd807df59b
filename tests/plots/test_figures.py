"""`reffuse figures` is deterministic: two runs write the same bytes, and the committed figures/ show the same data
(and have the same bytes where figures/figures.json records the matplotlib and FreeType versions of this run).

Each run is a fresh process (`python -m reffuse figures`), so nothing cached in one process (fonts, hash seeds)
can make two runs agree that would not agree on another day. The figures are drawn from committed results
only, so this takes seconds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "figures"


def draw(out: Path) -> tuple[dict[str, bytes], dict]:
    done = subprocess.run([sys.executable, "-m", "reffuse", "figures", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)  # a hang guard: a draw takes seconds
    assert done.returncode == 0, f"reffuse figures failed:\n{done.stderr[-3000:]}"
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}, json.loads((out / "figures.json").read_text())


@pytest.mark.slow
def test_figures_are_deterministic_and_match_the_committed_ones(tmp_path):
    (first, manifest), (second, _) = draw(tmp_path / "A"), draw(tmp_path / "B")
    assert len(first) >= 8, f"only {len(first)} figures: {sorted(first)}"
    assert first.keys() == second.keys()
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"two runs gave different bytes for {differ}"

    committed = {p.name: p.read_bytes() for p in sorted(COMMITTED.glob("*.png"))}
    assert committed.keys() == first.keys(), \
        "figures/ does not hold exactly the figures `reffuse figures` draws: run `reffuse figures --out figures/`"
    recorded = json.loads((COMMITTED / "figures.json").read_text())
    stale = [name for name in first if recorded["data_sha256"].get(name) != manifest["data_sha256"][name]]
    assert not stale, \
        f"committed figures show other data than a fresh draw: {stale}; run `reffuse figures --out figures/`"
    if recorded["versions"] == manifest["versions"]:  # same rasteriser: the same bytes
        stale = [name for name in first if first[name] != committed[name]]
        assert not stale, f"committed figures differ from a fresh draw: {stale}; run `reffuse figures --out figures/`"
