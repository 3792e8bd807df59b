"""The lectures: each notebook runs start to finish, is committed without outputs and in sync with its jupytext
source (the reviewed `.py`), ends with exercises, and the exercises' solutions run.

Notebooks run with the lectures folder as working directory, as `jupyter` and nbmake run them, and write nothing
into the repository, so these tests can run in parallel.
"""

import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

LECTURES = Path(__file__).resolve().parent.parent / "lectures"
SOURCES = sorted(LECTURES.glob("[0-9][0-9]_*.py"))


def solutions_of(source: Path) -> Path:
    return LECTURES / "solutions" / f"{source.name[:2]}_solutions.py"


def test_every_lecture_is_there():
    assert [s.name[:2] for s in SOURCES] == ["01", "02", "03", "04", "05", "06", "07"]
    for source in SOURCES:
        assert source.with_suffix(".ipynb").exists(), f"{source.name} has no paired notebook: jupytext --sync it"
        assert solutions_of(source).exists(), f"{source.name} has no solutions file"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_matches_source_and_has_no_outputs(source):
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    paired = jupytext.read(source)
    cells = [(c.cell_type, c.source) for c in notebook.cells]
    assert cells == [(c.cell_type, c.source) for c in paired.cells], \
        f"{source.name} and its notebook differ: run `jupytext --sync {source.name}`"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{source.stem}.ipynb carries outputs"
    last = notebook.cells[-1]
    assert last.cell_type == "markdown" and last.source.lstrip().startswith("## Exercises"), \
        f"{source.name} must end with its exercises"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source):
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",  # a hang guard per cell
                                     resources={"metadata": {"path": str(LECTURES)}})
    client.execute()


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_solutions_run(source):
    solutions = solutions_of(source)
    done = subprocess.run([sys.executable, str(solutions)], cwd=LECTURES, capture_output=True, text=True,
                          timeout=1800)  # a hang guard only: a lecture runs in under a minute alone
    assert done.returncode == 0, f"{solutions.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
