"""The command line: help that teaches, one-line errors with exit status 2, JSON that parses."""

import json
import subprocess
import sys

import pytest

from reffuse.cli import COMMANDS, main


def reffuse(*args):
    # a hang guard only: each command here takes about a second; ten minutes is no verdict on speed
    return subprocess.run([sys.executable, "-m", "reffuse", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out


def test_demo_tiny_json_is_exact(tmp_path):
    # its figures in a folder of its own: the default one is shared by every demo of tiny run in this checkout
    result = reffuse("demo", "--model", "tiny", "--json", "--repeats", "3", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fused_vs_parallel_relative_error"]["float64"] <= 1e-12
    assert report["fused_vs_parallel_relative_error"]["float32"] <= 1e-5


@pytest.mark.parametrize("args, message", [
    (["demo", "--model", "tiny", "--groups", "2-5"], "contains block 2, which has attention"),
    (["demo", "--model", "nope"], "unknown model 'nope'"),
    (["demo", "--model", "tiny", "--groups", "4-x"], "is not a range FIRST-LAST"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = reffuse(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["dump", "--model", "tiny", "--ids", "1,2", "--tokens", "0", "--out", "x.npz"],
     "argument --tokens: 0 is not a count: give 1 or more"),
    (["eval", "--model", "tiny", "--held-out-tokens", "-5"], "argument --held-out-tokens: -5 is not a count"),
    (["generate", "--model", "tiny", "hello", "--seed", "-1"], "argument --seed: -1 is negative"),
    (["demo", "--model", "tiny", "--groups", ""], "no group given"),
    (["demo", "--model", "tiny", "--groups", "8-4"], "is reversed: first > last"),
    (["fuse", "--model", "tiny", "--groups", "4-8", "--out", "README.md"], "README.md is a file: give a folder"),
    (["analyze", "--model", "tiny", "--out", "README.md"], "README.md is a file: give a folder"),
    (["dump", "--model", "tiny", "--ids", "1,2", "--out", "reffuse"], "reffuse is a folder: give the path of a file"),
    (["bench", "--model", "tiny", "--out", "README.md/x.json"], "README.md is a file, so README.md/x.json cannot be "
                                                                 "written"),
])
def test_bad_values_fail_fast_in_one_line(args, message):
    result = reffuse(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, suggestion", [
    (["dem"], "(did you mean demo?)"),
    (["demo", "--modl", "tiny"], "unrecognized arguments: --modl tiny (did you mean --model?)"),
    (["demo", "--norm", "fol"], "(did you mean fold?)"),
    (["healing-stud"], "(did you mean healing-study?)"),
])
def test_a_mistyped_command_choice_or_flag_gets_a_suggestion(args, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and suggestion in error, error


def test_nothing_is_suggested_where_nothing_is_close(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--bogus"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("unrecognized arguments: --bogus"), last


def test_export_writes_the_formats_another_engine_reads(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "new" / "tiny-nemotron"
    assert reffuse("export", "--model", "tiny", "--format", "nemotron-nas", "--out", str(out)).returncode == 0
    assert (out / "config.json").is_file()  # a synthetic model goes without a tokenizer
    result = reffuse("export", "--model", "tiny", "--format", "gguf", "--out", str(tmp_path / "a" / "tiny.gguf"))
    assert result.returncode == 2 and "no tokenizer found for 'tiny'" in result.stderr  # llama.cpp needs one
    result = reffuse("export", "--model", "tiny", "--format", "hf", "--out", str(tmp_path / "hf"))
    assert result.returncode == 2 and "--format nemotron-nas" in result.stderr  # tiny has an attention-free run
