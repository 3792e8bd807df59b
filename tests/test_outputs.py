"""One output rule for every command that writes (reffuse.outputs): what reffuse did not write is never written
over, with or without --overwrite; a result of the same command is replaced only with --overwrite; a result is
published whole, or not at all; of two processes writing to one path one publishes and the other says why; and
SIGTERM, SIGINT or SIGKILL leave the old result or the new one, and no temporary file after the next command."""

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from reffuse.cli import main
from reffuse.core.tiny import build_tiny
from reffuse.files import PARTIAL, host_name
from reffuse.formats.checkpoint import save_model
from reffuse.formats.registry import load_model
from reffuse.outputs import MARKER, read_marker

from byte_tokenizer import byte_tokenizer

# a hang guard only: each command here takes seconds; on a loaded machine ten times that is still no hang
HANG_GUARD_SECONDS = 600
EXPERIMENTS = ["--model", "tiny", "--held-out-tokens", "128", "--calibration-tokens", "1024", "--scoring-tokens",
               "64", "--dependency-tokens", "64", "--window", "64", "--decode-tokens", "2", "--repeats", "1",
               "--scale-tokens", "256,512"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different tiny models with a tokenizer (so that a result says which one it came from)."""
    folder = tmp_path_factory.mktemp("models")
    tiny = build_tiny()
    return {"a": save_model(tiny, folder / "a", tokenizer=byte_tokenizer()),
            "b": save_model(tiny, folder / "b", tokenizer=byte_tokenizer(), files={"which.txt": "b"})}


def writers(models, out: Path) -> dict[str, list[str]]:
    """Each command that writes, with --out (its own arguments small)."""
    return {
        "fuse": ["fuse", "--model", "tiny", "--groups", "4-8", "--out", str(out)],
        "heal": ["heal", "--model", str(models["a"]), "--teacher", "tiny", "--window", "64", "--held-out-tokens",
                 "128", "--training-tokens", "128", "--out", str(out)],
        "export gguf": ["export", "--model", str(models["a"]), "--format", "gguf", "--out", str(out)],
        "export nemotron-nas": ["export", "--model", "tiny", "--format", "nemotron-nas", "--out", str(out)],
        "export hf": ["export", "--model", str(models["a"]), "--format", "hf", "--out", str(out)],
        "dump": ["dump", "--model", "tiny", "--ids", "1,2,3", "--out", str(out)],
        "bench": ["bench", "--model", "tiny", "--repeats", "1", "--threads", "1", "--no-transformers", "--out",
                  str(out)],
        "experiments": ["experiments", *EXPERIMENTS, "--out", str(out)],
        "analyze": ["analyze", "--model", "tiny", "--dependency-tokens", "16", "--no-figures", "--out", str(out)],
        "figures": ["figures", "--only", "windows.png", "--out", str(out)],
        "demo": ["demo", "--model", "tiny", "--out", str(out)],
        "conformance": ["conformance", "--reference-tokens", "4", "--out", str(out)],
    }


FILE_OUTPUTS = {"export gguf": "x.gguf", "dump": "x.npz", "bench": "x.json"}


@pytest.mark.parametrize("command", list(writers({"a": "a"}, Path("x"))))
def test_what_reffuse_did_not_write_is_left_alone(command, models, tmp_path, capsys):
    """A folder holding the project's README (the checkout), or a file of the user's, is refused before any work,
    with and without --overwrite, and nothing in it is touched."""
    if command in FILE_OUTPUTS:
        out = tmp_path / FILE_OUTPUTS[command]
        out.write_bytes(b"the user's own file\n")
        kept = {out: out.read_bytes()}
    else:
        out = tmp_path / "checkout"
        out.mkdir()
        (out / "README.md").write_text("# the project's README\n")
        kept = {out / "README.md": (out / "README.md").read_bytes()}
    for extra in ([], ["--overwrite"]):
        assert main(writers(models, out)[command] + extra) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "not a" in error and "reffuse wrote" in error, error
    assert {path: path.read_bytes() for path in kept} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]               # nothing beside it either


def test_a_companion_file_follows_the_rule(tmp_path, capsys):
    """bench --out X.json writes X.md beside it: a user's X.md is refused like X.json would be."""
    out = tmp_path / "bench.json"
    (tmp_path / "bench.md").write_text("my notes\n")
    arguments = writers({"a": "a"}, out)["bench"]
    for extra in ([], ["--overwrite"]):
        assert main(arguments + extra) == 2
        assert "bench.md exists and is not a benchmark report reffuse wrote" in capsys.readouterr().err
    assert (tmp_path / "bench.md").read_text() == "my notes\n" and not out.exists()


@pytest.mark.parametrize("command", ["dump", "analyze", "fuse", "export nemotron-nas"])
def test_a_result_of_the_command_is_replaced_only_with_overwrite(command, models, tmp_path, capsys):
    out = tmp_path / FILE_OUTPUTS.get(command, "out")
    arguments = writers(models, out)[command]
    assert main(arguments) == 0
    first = sorted(os.listdir(tmp_path))
    assert main(arguments) == 2
    assert "--overwrite to replace it" in capsys.readouterr().err
    assert main(arguments + ["--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == first                                  # the same files, no debris


def test_a_result_of_another_command_is_not_replaced(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(writers(models, out)["analyze"]) == 0
    assert main(writers(models, out)["fuse"] + ["--overwrite"]) == 2
    assert "holds a analysis that `reffuse analyze` wrote, not a model of `reffuse fuse`" in capsys.readouterr().err
    assert json.loads((out / MARKER).read_text())["command"] == "analyze"


def test_a_multi_part_result_is_published_whole(models, tmp_path, capsys, monkeypatch):
    """A disk that fills while analyze writes its figures: one line naming the folder, the old analysis as it
    was, and no half of the new one anywhere."""
    pytest.importorskip("matplotlib")
    import reffuse.plots.dependency as dependency
    out = tmp_path / "analysis"
    arguments = writers(models, out)["analyze"]
    assert main(arguments) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(result, folder):
        (folder / "dependency_block.png").write_bytes(b"the first figure")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dependency, "write_analysis_figures", full_disk)
    arguments.remove("--no-figures")
    assert main(arguments + ["--overwrite"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]   # after the progress lines
    assert error == (f"reffuse analyze: error: the analysis for {out} could not be written (No space left on device): "
                     f"nothing was published at {out}; check the free space and the permissions")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(tmp_path) == ["analysis"]


@pytest.mark.parametrize("command", ["export gguf", "dump"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_the_old_one(command, models, tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / FILE_OUTPUTS[command]
    arguments = writers(models, out)[command]
    assert main(arguments) == 0
    before = out.read_bytes()

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() says it: no file name

    def half_written(model, path, *args):
        Path(path).write_bytes(b"GGUF and half a tensor")
        full_disk()

    if command == "export gguf":
        import reffuse.commands.export as export
        monkeypatch.setattr(export, "save_gguf", half_written)
    else:
        monkeypatch.setattr(os, "fsync", full_disk)
    assert main(arguments + ["--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.endswith(
        f"for {out} could not be written (No space left on device): nothing was published at {out}; check the free "
        "space and the permissions\n"), error
    assert out.read_bytes() == before and os.listdir(tmp_path) == [out.name]


def reffuse(*args) -> subprocess.Popen:
    """`reffuse ARGS` in a process of its own, on one BLAS thread (two of them on a small machine do not spin
    against each other, which takes minutes and changes nothing that is judged); its stderr goes to a file, which
    never fills as a pipe would and stop the process in a write."""
    stderr = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-m", "reffuse", *args], stdout=subprocess.DEVNULL, stderr=stderr,
                               text=True, env=os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    process.stderr_file = stderr
    return process


def ended(process: subprocess.Popen) -> tuple[int, str]:
    """The exit status of `process` and what it wrote on stderr, once it has ended."""
    code = process.wait(timeout=HANG_GUARD_SECONDS)
    with process.stderr_file as stderr:
        stderr.seek(0)
        return code, stderr.read()


# Two tiny experiments runs cost about 3 CPU-minutes: one trial in the test command, five when asked for
# (REFFUSE_EXPERIMENTS_RACE_TRIALS=5), as the other commands get.
RACE_TRIALS = {"experiments": int(os.environ.get("REFFUSE_EXPERIMENTS_RACE_TRIALS", "1"))}


def partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if PARTIAL.match(p.name)]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fuse", "export gguf", "dump", "bench", "experiments"])
def test_two_processes_racing_to_one_out_one_wins_the_other_says_why(command, models, tmp_path):
    for trial in range(RACE_TRIALS.get(command, 5)):
        out = tmp_path / str(trial) / FILE_OUTPUTS.get(command, "out")
        out.parent.mkdir()
        racers = [reffuse(*writers(models, out)[command]) for _ in range(2)]
        results = [ended(r) for r in racers]
        assert sorted(code for code, _ in results) == [0, 2], results
        error = next(err for code, err in results if code == 2).strip().splitlines()[-1]
        # lost at the check before the work, or at the one when publishing
        assert ("exists: give another file, or --overwrite" in error or "already holds a" in error
                or "changed while this command ran (another process wrote there)" in error), error
        assert not partials(out.parent)


def layout_of(path: Path) -> list:
    return [b.to_json() for b in load_model(path).layout().blocks]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fuse", "export gguf", "experiments"])
def test_sigterm_or_sigint_leaves_the_old_result_or_the_new_one_and_nothing_partial(command, models, tmp_path):
    out = tmp_path / FILE_OUTPUTS.get(command, "out")
    old, new = writers(models, out)[command], writers(models, out)[command] + ["--overwrite"]
    if command == "fuse":
        new[new.index("4-8")] = "4-6"
    assert main(old) == 0
    rng = np.random.default_rng(0)
    for trial in range(6):
        sent = (signal.SIGTERM, signal.SIGINT)[trial % 2]
        process = reffuse(*new)
        if trial < 3:  # at a moment the process does not choose: while it starts, works or publishes
            try:
                process.wait(timeout=float(rng.uniform(0.0, 1.0 if command != "experiments" else 6.0)))
            except subprocess.TimeoutExpired:
                process.send_signal(sent)
        else:          # while its result is half made beside the target (the poll ends when the process does)
            while not partials(out.parent) and process.poll() is None:
                time.sleep(0.001)
            process.send_signal(sent)
        code, stderr = ended(process)
        # done; ended by reffuse on the signal; or ended by it before reffuse ran
        assert code in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM), stderr
        assert not partials(out.parent), stderr
        if command == "experiments":                                                  # whole: old or new
            assert sorted(os.listdir(out)) == sorted([*read_marker(out)["files"], MARKER])
            result = json.loads((out / "experiments.json").read_text())
            assert result["verdicts"] and result["command"] in (out / "README.md").read_text()
        elif command == "fuse":
            assert len(layout_of(out)) in (8, 10)                                       # 4-8 fused, or 4-6
        else:
            load_model(out)                                                             # a whole GGUF file


def test_a_killed_export_leaves_debris_that_the_next_write_beside_it_removes(models, tmp_path):
    out = tmp_path / "x.gguf"
    process = reffuse(*writers(models, out)["export gguf"])
    while not partials(tmp_path) and process.poll() is None:   # ends when the export does: a hang guard is its own
        time.sleep(0.001)
    process.kill()                                # SIGKILL: nothing of the process runs, its temporary file stays
    ended(process)
    stale = tmp_path / f".x.gguf.partial-{host_name()}-{2 ** 30}-0123abcd"     # and one of a process long gone
    stale.write_bytes(b"half a GGUF")
    assert main(writers(models, tmp_path / "y.npz")["dump"]) == 0
    assert not partials(tmp_path)
