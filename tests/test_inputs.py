"""Inputs refused by type and range before any work, in one line that names the flag, file or key and what to do:
numeric flags, token ids and the context length, flags that would do nothing, dumps that are not real-valued
activations, tokenizer settings of the wrong type, chat templates that never end, text that is not UTF-8, and
files that are not regular files."""

import dataclasses
import json
import os

import numpy as np
import pytest

from reffuse.cli import main
from reffuse.core.tiny import build_tiny
from reffuse.errors import ReffuseError
from reffuse.evaluation.activations import activations, save_activations
from reffuse.evaluation.conformance import KIT_FILE, KIT_FORMAT
from reffuse.formats import tokenizer as tokenizers
from reffuse.formats.checkpoint import save_model
from reffuse.formats.registry import load_tokenizer
from reffuse.formats.tokenizer import Tokenizer

from byte_tokenizer import byte_tokenizer

CONTEXT = 16  # the context length of the short-context model below


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The tiny model with a recorded context length of 16 positions, and a byte tokenizer without a chat
    template."""
    tiny = build_tiny()
    model = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, max_positions=CONTEXT))
    return save_model(model, tmp_path_factory.mktemp("models") / "short", tokenizer=byte_tokenizer())


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


@pytest.mark.parametrize("argv, message", [
    (["fuse", "--model", "tiny", "--groups", "4-8", "--calibrate", "--ridge", "inf", "--out", "x"],
     "argument --ridge: inf is not a finite number > 0"),
    (["demo", "--model", "tiny", "--ridge", "nan"], "argument --ridge: nan is not a finite number > 0"),
    (["verify", "--model", "tiny", "--against", "x.npz", "--rtol", "-1"], "argument --rtol: -1 is not a finite number"),
    (["verify", "--model", "tiny", "--against", "x.npz", "--atol", "nan"], "argument --atol: nan is not a finite"),
    (["tp", "--model", "tiny", "--timeout", "inf"], "argument --timeout: inf is not a duration"),
    (["generate", "--model", "tiny", "hi", "--temperature", "-0.5"], "argument --temperature: -0.5 is not a finite"),
    (["generate", "--model", "tiny", "hi", "--temperature", "inf"], "argument --temperature: inf is not a finite"),
    (["heal", "--model", "tiny", "--out", "x", "--temperature", "nan"], "argument --temperature: nan is not a finite"),
    (["dump", "--model", "tiny", "--ids", "1,-2", "--out", "x.npz"], "argument --ids: token id -2 is negative"),
    (["dump", "--model", "tiny", "--ids", "1,x", "--out", "x.npz"], "argument --ids: '1,x' is not a list of integers"),
    (["dump", "--model", "tiny", "--ids", ",", "--out", "x.npz"], "argument --ids: no token ids given"),
])
def test_numeric_flags_are_refused_by_type_and_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints the usage first
    assert message in error and "Traceback" not in error, error


def test_the_library_refuses_an_infinite_ridge_and_top_k_without_temperature(tiny32):
    from reffuse.core.generate import generate
    from reffuse.method.calibrate import check_ridge
    with pytest.raises(ReffuseError, match="ridge inf must be positive and finite"):
        check_ridge(float("inf"))
    with pytest.raises(ReffuseError, match="top_k 5 does nothing at temperature 0"):
        generate(tiny32, [1, 2, 3], 4, top_k=5)
    with pytest.raises(ReffuseError, match="temperature must be >= 0 and finite"):
        generate(tiny32, [1, 2, 3], 4, temperature=float("inf"))


def test_token_counts_past_the_context_length_are_refused_before_the_work(short_context, tmp_path, capsys):
    model = str(short_context)
    ids = ",".join(["1"] * (CONTEXT + 1))
    assert (f"--ids: {CONTEXT + 1} positions are past the context length of {model}, {CONTEXT}: give at most "
            f"{CONTEXT}") in one_line_error(capsys, ["dump", "--model", model, "--ids", ids, "--out",
                                                     str(tmp_path / "x.npz")])
    assert "--ids: token id 300 is past the vocabulary" in one_line_error(
        capsys, ["dump", "--model", model, "--ids", "1,300", "--out", str(tmp_path / "x.npz")])
    assert f"--window: 32 positions are past the context length of {model}, {CONTEXT}" in one_line_error(
        capsys, ["eval", "--model", model, "--window", "32"])
    assert "the prompt and --max-new-tokens: 18 positions are past the context length" in one_line_error(
        capsys, ["generate", "--model", model, "hi", "--max-new-tokens", "16"])
    assert f"--window: 64 positions are past the context length of {model}, {CONTEXT}" in one_line_error(
        capsys, ["heal", "--model", model, "--teacher", "tiny", "--window", "64", "--out", str(tmp_path / "h")])
    assert "--dependency-tokens (one sequence): 512 positions are past" in one_line_error(
        capsys, ["analyze", "--model", model, "--out", str(tmp_path / "a")])
    dump = save_activations(tmp_path / "long.npz", activations(build_tiny(), np.arange(CONTEXT + 4)), "tiny")
    assert f"its {CONTEXT + 4} token ids are past the context length" in one_line_error(
        capsys, ["verify", "--model", model, "--against", str(dump)])
    assert "has a context length of 16 positions, and `reffuse bench` times sequences of up to 512" in \
        one_line_error(capsys, ["bench", "--model", model, "--repeats", "1", "--no-transformers", "--out",
                                str(tmp_path / "b.json")])
    assert os.listdir(tmp_path) == ["long.npz"]                                   # nothing written by the refusals


def test_text_a_command_cuts_into_windows_itself_stays_within_the_context_length(short_context, tmp_path):
    """fuse reads calibration text in windows of its own length (256 tokens): of the context length where that
    is shorter, never past it."""
    out = tmp_path / "fused"
    assert main(["fuse", "--model", str(short_context), "--groups", "4-8", "--calibrate", "--calibration-tokens",
                 "256", "--out", str(out)]) == 0
    texts = json.loads((out / "fuse.json").read_text())["texts"]
    assert texts["calibration"]["window"] == texts["held_out"]["window"] == CONTEXT


def test_flags_that_would_do_nothing_are_refused(short_context, tmp_path, capsys):
    model = str(short_context)
    assert "--top-k matters only when sampling, and --temperature 0 is greedy" in one_line_error(
        capsys, ["generate", "--model", model, "hi", "--top-k", "5"])
    assert "--chat: the tokenizer" in one_line_error(capsys, ["generate", "--model", model, "hi", "--chat"])
    dump = save_activations(tmp_path / "d.npz", activations(build_tiny(), np.arange(4)), "tiny")
    assert "--ids: a dump brings its own token ids" in one_line_error(
        capsys, ["verify", "--model", "tiny", "--against", str(dump), "--ids", "1,2"])
    kit = tmp_path / "kit"  # the flags are refused before the kit is read: its marker file is enough
    kit.mkdir()
    (kit / KIT_FILE).write_text(json.dumps({"format": KIT_FORMAT}))
    assert "--tokens: a conformance kit brings its own token ids" in one_line_error(
        capsys, ["verify", "--model", str(kit), "--against", "llama.cpp", "--tokens", "16"])
    assert "--tensor-type q8_0 is for --format gguf" in one_line_error(
        capsys, ["export", "--model", "tiny", "--format", "nemotron-nas", "--tensor-type", "q8_0", "--out",
                 str(tmp_path / "n")])


@pytest.mark.parametrize("dtype", [np.complex128, np.int32, np.bool_])
def test_a_dump_holds_real_floats_only(dtype, tmp_path, capsys):
    acts = activations(build_tiny(), np.arange(6))
    acts = dataclasses.replace(acts, logits=acts.logits.astype(dtype), hidden_states=acts.hidden_states.astype(dtype))
    path = save_activations(tmp_path / "odd.npz", acts, "tiny")
    error = one_line_error(capsys, ["verify", "--model", "tiny", "--against", str(path)])
    assert f"hidden_states has dtype {np.dtype(dtype)}; a dump holds real floating-point activations" in error


def test_what_is_not_a_dump_is_named_before_any_work(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    assert f"--against {gguf} is not an .npz archive: give transformers, llama.cpp, or a dump" in one_line_error(
        capsys, ["verify", "--model", "tiny", "--against", str(gguf)])
    os.mkfifo(tmp_path / "pipe.npz")
    assert "pipe.npz is not a regular file" in one_line_error(
        capsys, ["verify", "--model", "tiny", "--against", str(tmp_path / "pipe.npz")])


def write_tokenizer(folder, **config):
    byte_tokenizer().save(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("config, message", [
    ({"add_bos_token": "false"}, "add_bos_token must be true or false, got 'false' (str): write it as a boolean"),
    ({"chat_template": 42}, "chat_template must be a Jinja template (text), or a list of named templates"),
    ({"chat_template": [{"name": "tool_use", "template": "x"}]}, "chat_template must be a Jinja template"),
    ({"bos_token": 1}, "bos_token must be a token (text), got 1"),
])
def test_tokenizer_settings_of_the_wrong_type_are_refused(config, message, tmp_path):
    with pytest.raises(ReffuseError, match=f"tokenizer_config.json: {message}".replace("(", r"\(").replace(")", r"\)")):
        load_tokenizer(write_tokenizer(tmp_path, **config))


def test_tokenizer_settings_of_the_right_type_are_read(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path, add_bos_token=False, chat_template=[
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages[0].content }}!"}]))
    assert tokenizer.add_bos is False and tokenizer.chat_prompt("hi") == "hi!"


@pytest.mark.parametrize("template", [
    "{{ 7 ** 777777777 % 10 }}",                     # one step of hours, in C: nothing runs between its parts
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # nothing but loops
])
def test_the_chat_template_time_limit_holds_for_any_template(template, monkeypatch):
    # templates that never end: the verdict does not depend on how fast the machine is, only the test's length
    monkeypatch.setattr(tokenizers, "CHAT_TEMPLATE_SECONDS", 0.5)
    tokenizer = Tokenizer(None, None, None, template, False, "a test template")
    with pytest.raises(ReffuseError, match="the chat template of a test template ran longer than 0.5 s"):
        tokenizer.chat_prompt("hello")


def test_text_that_is_not_utf8_is_one_line(short_context, capsys):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv
    assert "the text to encode is not valid UTF-8 (character 3, b'\\xe9'): give UTF-8 text" in one_line_error(
        capsys, ["generate", "--model", str(short_context), prompt])


def test_files_that_are_not_regular_are_not_opened(tmp_path, monkeypatch):
    """A FIFO blocks whoever reads it until someone writes: reffuse names it instead of waiting."""
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "tokenizer.json")
    with pytest.raises(ReffuseError, match="tokenizer.json is not a regular file"):
        load_tokenizer(folder)
    from reffuse.formats.fetch import CACHE_ENV, cached_path, fetch
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cached_path("smollm2").parent.mkdir(parents=True)
    os.mkfifo(cached_path("smollm2"))
    with pytest.raises(ReffuseError, match="is not a regular file .*: delete it and run `reffuse fetch smollm2` again"):
        fetch("smollm2")


def test_a_tokenizer_config_nested_too_deeply_is_one_line(tmp_path):
    byte_tokenizer().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ReffuseError, match="tokenizer_config.json nests its JSON values too deeply to be read"):
        load_tokenizer(tmp_path)
