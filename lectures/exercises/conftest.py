"""Which implementation the graded exercises call, and the weights they are graded on.

    python -m pytest lectures/exercises                   grades student.py, the student's file
    python -m pytest lectures/exercises --solutions       grades solutions.py, the teacher's
    REFFUSE_EXERCISES=solutions python -m pytest ...      the same from the environment (=student for the other)

The project's own test run, `python -m pytest` from the checkout with no paths (pytest's testpaths), grades the
solutions, so that they are checked wherever the project's tests run; naming this folder or a file in it grades
the student's file. A function still raising NotImplementedError fails its tests with one line,
"not implemented yet: ...".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import reffuse
from reffuse.core.model import plain
from reffuse.core.tiny import build_tiny
from reffuse.formats.fetch import cached_path

HERE = Path(__file__).resolve().parent
CHOICE = "REFFUSE_EXERCISES"
GRADED_FILES = {"student": "student.py", "solutions": "solutions.py"}


def pytest_addoption(parser):
    parser.addoption("--solutions", action="store_true",
                     help="graded exercises: grade lectures/exercises/solutions.py (the teacher's) instead of "
                          f"student.py (also: {CHOICE}=solutions)")


def graded_choice(config) -> str:
    """"student" or "solutions": --solutions, else the environment, else solutions for the project's own run."""
    if config.getoption("solutions", default=False):
        return "solutions"
    chosen = os.environ.get(CHOICE, "")
    if chosen:
        if chosen not in GRADED_FILES:
            raise pytest.UsageError(f"{CHOICE}={chosen!r} is not a file to grade: set it to student or solutions, "
                                    "or unset it")
        return chosen
    return "solutions" if config.args_source == pytest.Config.ArgsSource.TESTPATHS else "student"


def pytest_report_header(config):
    return f"graded exercises: lectures/exercises/{GRADED_FILES[graded_choice(config)]}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A stub still in place fails with its own one-line message, not a traceback through the stub."""
    try:
        return (yield)
    except NotImplementedError as stub:
        missing = str(stub) or "not implemented yet"
    pytest.fail(missing, pytrace=False)  # outside the except: no "during handling of the above exception"


@pytest.fixture(scope="session")
def graded(pytestconfig):
    """The module graded: student.py or solutions.py, loaded from its file."""
    choice = graded_choice(pytestconfig)
    spec = importlib.util.spec_from_file_location(f"graded_{choice}", HERE / GRADED_FILES[choice])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny():
    """reffuse's synthetic tiny model in float64, on the plain functions of reffuse.core.model."""
    return plain(reffuse.cast(build_tiny(), "float64"))


@pytest.fixture
def rng():
    return np.random.default_rng(26)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32) on the plain functions, if reffuse's cache holds it; the tests cast the
    blocks they read to float64."""
    if not cached_path("smollm2").exists():
        pytest.skip("SmolLM2 is not in reffuse's cache: run `reffuse fetch smollm2` (98 MB) to be graded on its "
                    "weights too")
    return plain(reffuse.load_model("smollm2"))


@pytest.fixture(scope="session")
def smollm2_part(smollm2):
    """A function (first, stop, token_ids) -> SmolLM2's blocks first..stop-1 as a float64 model whose vocabulary
    is the rows of `token_ids` (its token i is token_ids[i]): nothing of size vocabulary x d is cast."""
    def part(first, stop, token_ids):
        rows = smollm2.embed[np.asarray(token_ids)]
        config = dataclasses.replace(smollm2.config, vocab_size=len(rows))
        return reffuse.cast(dataclasses.replace(smollm2, config=config, embed=rows, lm_head=rows,
                                                blocks=smollm2.blocks[first:stop]), "float64")
    return part
