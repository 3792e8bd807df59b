"""Every command of the README runs from a clean checkout and leaves it clean: results go to the ignored out/.

The commands are taken from the README's bash blocks as written. Where one would take minutes, the flags in SMALLER
are appended (later flags win), so that the same command runs on less text or on the synthetic model; commands that
need other machines or a fresh environment are left out (SKIP).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SKIP = ("python3 -m venv", "mpiexec -f", "mpiexec --hostfile", "mkdir -p out && printf")  # fresh envs, other machines
NEEDS_A_GPU = {"bash benchmarks/gpu/run.sh"}
SMALLER = {
    "demo": ["--model", "tiny"],
    "experiments": ["--model", "tiny", "--held-out-tokens", "256", "--calibration-tokens", "1024", "--scoring-tokens",
                    "64", "--dependency-tokens", "64", "--window", "64", "--decode-tokens", "4", "--repeats", "1",
                    "--scale-tokens", "256,512"],
    "analyze": ["--dependency-tokens", "64"],
    "fuse": ["--calibration-tokens", "512", "--scoring-tokens", "128"],
    "eval": ["--held-out-tokens", "256"],
    "verify": ["--tokens", "16", "--generate", "4"],
    "bench": ["--model", "tiny", "--repeats", "1", "--no-transformers"],
    "tp": ["--prefill-tokens", "16", "--decode-tokens", "2", "--repeats", "1"],
    "generate": ["--max-new-tokens", "4"],
    "heal": ["--training-tokens", "512", "--window", "64", "--held-out-tokens", "128"],
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#") and not line.startswith(SKIP) and line not in NEEDS_A_GPU:
                commands.append(line)
    return commands


def runnable(command: str) -> str:
    """The command with this environment's executables and the smaller sizes."""
    command = command.replace(".venv/bin/", f"{BIN}/")
    command = re.sub(r"(^|&& |\| )reffuse ", lambda m: f"{m.group(1)}{BIN}/reffuse ", command)
    command = re.sub(r"(^|&& )mpiexec ", lambda m: f"{m.group(1)}{BIN}/mpiexec ", command)
    words = shlex.split(command.split(" > ")[0].split("&& ")[-1])
    name = next((w for w in words if w in SMALLER), None)
    if name is None:
        return command
    extra = " ".join(shlex.quote(w) for w in SMALLER[name])
    if " > " in command:
        head, tail = command.split(" > ", 1)
        return f"{head} {extra} > {tail}"
    return f"{command} {extra}"


def test_the_readme_commands_run_and_leave_the_checkout_clean(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True)
    commands = readme_commands()
    assert len(commands) > 20
    env = os.environ | {"MPLBACKEND": "Agg", "PYTHON": sys.executable}
    for command in commands:
        run = runnable(command)
        result = subprocess.run(run, shell=True, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode in (0, 1), f"{command}\n{result.stderr[-2000:]}"  # 1: a check that is reported
        status = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True)
        assert status.stdout == "", f"`{command}` left the checkout changed:\n{status.stdout}"
