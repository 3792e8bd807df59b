"""The package as `pip install reffuse` gives it: a wheel built from this checkout and installed (not editable)
with numpy alone, its only dependency, in a fresh virtual environment, then run from a folder outside the
checkout. What the package reads at run time is in the wheel, the commands work there, and those that need an
extra or the checkout's committed results say so in one line."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reffuse"
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]  # what the build reads beside the package
HANG_GUARD = 1800  # seconds: a hang guard only; each step takes seconds, a minute or two on a loaded machine

pytestmark = pytest.mark.slow


def run(command, cwd, env, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD)
    if check:
        shown = " ".join(map(str, command))
        assert done.returncode == 0, f"{shown} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def clean_environment() -> dict:
    """This environment without what would lead a Python to another reffuse (PYTHONPATH), and with offline builds:
    setuptools validates classifiers against a list it would otherwise download."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return env | {"VALIDATE_PYPROJECT_NO_NETWORK": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the checkout's build inputs (so that nothing is built inside the checkout), built
    without build isolation: the setuptools of this environment, no download."""
    base = tmp_path_factory.mktemp("build")
    source = base / "source"
    shutil.copytree(PACKAGE, source / "reffuse", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", base / "dist",
         source], base, clean_environment())
    built, = (base / "dist").glob("reffuse-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh virtual environment holding the wheel and numpy (this environment's, linked: nothing is
    downloaded), and a working folder outside the checkout."""
    base = tmp_path_factory.mktemp("installed")
    env_folder = base / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env_folder], base, clean_environment())
    python = env_folder / "bin" / "python"
    environment = clean_environment() | {
        # Without threadpoolctl (the `real` extra) reffuse cannot pin BLAS threads; on a small shared machine a
        # second BLAS thread on the tiny model's products mostly waits.
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel], base, environment)
    numpy_home = Path(np.__file__).resolve().parents[1]
    linked = base / "numpy-only"
    linked.mkdir()
    for entry in [numpy_home / "numpy", numpy_home / "numpy.libs", *numpy_home.glob("numpy-*.dist-info")]:
        if entry.exists():  # the package, the libraries its wheel bundles (numpy.libs, on Linux), its metadata
            (linked / entry.name).symlink_to(entry)
    site, = (env_folder / "lib").glob("python*/site-packages")
    (site / "numpy-only.pth").write_text(f"{linked}\n")
    folder = base / "elsewhere"
    folder.mkdir()
    return {"python": python, "reffuse": env_folder / "bin" / "reffuse", "env": environment, "folder": folder,
            "site": site}


def reffuse(installed, *args, cwd=None, check=True) -> subprocess.CompletedProcess:
    """`reffuse ARGS` as the installed package runs it, in `cwd` (default: the folder outside the checkout)."""
    return run([installed["reffuse"], *args], cwd or installed["folder"], installed["env"], check=check)


def check_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    """That a command ended in one line of error that names `words`: exit status 2, no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in lines[-1], f"{word!r} is not in {lines[-1]!r}"


def test_the_wheel_holds_the_package_and_its_license_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_package = {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}
    missing = in_package - set(names)
    assert not missing, f"files of reffuse/ the wheel leaves out (package data the code may read): {sorted(missing)}"
    info = f"reffuse-{wheel.name.split('-')[1]}.dist-info"
    assert {name.split("/")[0] for name in names} == {"reffuse", info}, "the wheel holds more than the package"
    assert f"{info}/licenses/LICENSE" in names
    assert zipfile.ZipFile(wheel).read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Apache License" in (ROOT / "LICENSE").read_text()
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line] \
        == ["Requires-Dist: numpy>=1.24"]


def test_the_installed_package_is_the_wheel_and_knows_it_has_no_checkout(installed):
    done = run([installed["python"], "-c", "import json, reffuse; "
                "print(json.dumps([reffuse.__file__, str(reffuse.checkout_root())]))"],
               installed["folder"], installed["env"])
    module, root = json.loads(done.stdout)
    assert Path(module).is_relative_to(installed["site"])
    assert Path(root) == installed["folder"]  # no checkout: committed results are looked for in the working folder


def test_help_and_the_offline_demo_run_outside_the_checkout(installed):
    assert "demo" in reffuse(installed, "--help").stdout
    done = reffuse(installed, "demo", "--model", "tiny", "--json", "--held-out-tokens", "256",
                   "--calibration-tokens", "256", "--scoring-tokens", "128", "--dependency-tokens", "64",
                   "--training-tokens", "256", "--repeats", "1", "--decode-tokens", "2", "--sample-tokens", "2")
    report = json.loads(done.stdout)
    assert report["synthetic"] is True and report["fused_vs_parallel_relative_error"]["float64"] <= 1e-12
    # numpy alone draws no figures, and says what brings them: the extra from the package registry, not a checkout
    assert report["figures"] == [] and "pip install 'reffuse[real]'" in done.stderr
    assert not (installed["folder"] / "out").exists()
    assert reffuse(installed, "costmodel", "--json").stdout.lstrip().startswith("{")


REFUSED = [  # a command that needs more than numpy and the package: (its arguments, what its one line names)
    (["generate", "--model", "tiny", "--tokenizer", "smollm2", "Hello"],
     ["'tokenizers'", "pip install 'reffuse[real]'"]),
    (["demo"], ["'gguf'", "pip install 'reffuse[real]'"]),
    (["verify", "--model", "tiny", "--against", "transformers", "--ids", "1,2,3"],
     ["'torch'", "pip install 'reffuse[reference]'"]),
    (["tp", "--model", "tiny"], ["mpi4py", "pip install 'reffuse[mpi]'"]),
    (["figures", "--out", "figures"], ["'matplotlib'", "pip install 'reffuse[real]'"]),
    (["healing-study", "--out", "study"], ["reports/experiments/smollm2/experiments.json", "a checkout of reffuse"]),
]


@pytest.mark.parametrize("args, words", REFUSED, ids=[args[0] for args, _ in REFUSED])
def test_what_needs_an_extra_or_the_checkout_says_so_in_one_line(installed, args, words, tmp_path):
    check_one_line_error(reffuse(installed, *args, cwd=tmp_path, check=False), *words)
    assert not any(tmp_path.iterdir()), "a refused command left something behind"
