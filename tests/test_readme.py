"""The README and the pages of docs/: what they quote, what they link, and the commands they give.

Quoted numbers. A number written with a decimal point, a thousands separator or a percent sign (44.89, 1.06x,
6.0e-5, 16,384, 86%) is a measurement. The paragraph, list or table that quotes one links the committed result it
comes from (a file under reports/ or benchmarks/results/, or docs/paper.md for the paper's own numbers), or follows
a paragraph ending in a colon that does; each such number is found in one of those files, to the digits quoted (a
percentage may stand there as a fraction). Code (fenced or inline), link targets, the paper's numbering (§5.5,
Theorem 3.1, Table 2) and an interval's confidence level (95% interval) are not quotes; whole numbers written
without a separator (8 blocks, 64 tokens) are settings and are not checked. docs/paper.md is itself the source of
the paper's numbers, so its own are not checked. A quote of few digits can be found in a long result by chance: the
check ties every quote to a named result and catches a number that is not there (another run's, a typo), but it
does not say which line of the result a number came from.

Commands. Every command of a page's bash blocks runs from a clean checkout and leaves it clean: results go to the
ignored out/. Where one would take minutes, the flags in SMALLER are appended (later flags win), so that the same
command runs on less text or on the synthetic model; commands that need other machines or a fresh environment are
left out (SKIP).
"""

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reffuse.evaluation.conformance import is_kit

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 12 * 1024  # bytes: a front door, with the depth in docs/

SOURCE_FOLDERS = ("reports", "benchmarks/results")
PAPER_DIGEST = ROOT / "docs" / "paper.md"

FENCED = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")
NOT_QUOTES = re.compile(r"(?:§|Theorem |Tables? |Fig\. |Figures? |App\. |eq\. |arXiv )[\d.]+"  # the paper's numbering
                        r"|\d+% (?:bootstrap )?intervals?")  # a confidence level
QUOTED = re.compile(r"(?<![\w.,])(?<![A-Za-z]-)"  # not inside a word, a version or a name like Apache-2.0
                    r"(\d+(?:\.\d+)?%"  # a percentage
                    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # thousands separated
                    r"|\d+\.\d+(?:e[-+]?\d+)?)"  # a decimal point, perhaps an exponent
                    r"(?![\d.]\d|,\d)")
SOURCE_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
GROUPED_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def blocks(text: str) -> list[str]:
    """Paragraphs, lists and tables: the text between blank lines, code blocks (fenced or indented) left out."""
    found = [block for block in re.split(r"\n[ \t]*\n", FENCED.sub("", text)) if block.strip()]
    return [block for block in found if not all(line.startswith(("    ", "\t")) for line in block.splitlines())]


def local_links(page: Path, text: str) -> list[Path]:
    """The files a text links, resolved from its page (web addresses and anchors left out)."""
    targets = [target.split("#")[0] for _, target in LINK.findall(INLINE_CODE.sub("", text))]
    return [(page.parent / target).resolve() for target in targets if target and "://" not in target
            and not target.startswith("mailto:")]


def is_source(path: Path) -> bool:
    """A committed result, or the paper digest for the paper's own numbers."""
    if path == PAPER_DIGEST:
        return True
    relative = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else ""
    return path.is_file() and relative.startswith(tuple(f"{folder}/" for folder in SOURCE_FOLDERS))


def quotes(block: str) -> list[str]:
    prose = NOT_QUOTES.sub("", LINK.sub(r"\1", INLINE_CODE.sub("", block)))
    return QUOTED.findall(prose)


@functools.cache
def numbers_in(path: Path) -> tuple[float, ...]:
    text = path.read_text(errors="replace")
    found = [float(number) for number in SOURCE_NUMBER.findall(text)]
    if path.suffix != ".json":  # in JSON a comma separates list items, never thousands
        found += [float(number.replace(",", "")) for number in GROUPED_NUMBER.findall(text)]
    return tuple(found)


def matches(quote: str, value: float) -> bool:
    """Whether a source's value, written to the digits of the quote, reads as the quote."""
    written = quote.rstrip("%").replace(",", "")
    candidates = (value, 100 * value) if quote.endswith("%") else (value,)
    if "e" in written:
        mantissa, _ = written.split("e")
        places = len(mantissa.split(".")[1])
        return any(float(f"{c:.{places}e}") == float(written) for c in candidates)
    places = len(written.split(".")[1]) if "." in written else 0
    half_unit = 0.5 * 10.0 ** -places * (1 + 1e-9)  # rounding to the quoted digits, ties either way
    return any(abs(c - float(written)) <= half_unit for c in candidates)


def unsourced_quotes(page: Path) -> list[str]:
    problems, introduced = [], []
    for block in blocks(page.read_text()):
        sources = [path for path in local_links(page, block) if is_source(path)] + introduced
        introduced = sources if block.rstrip().endswith(":") else []  # a colon hands its sources to what follows
        found = quotes(block)
        if not found:
            continue
        opening = " ".join(block.split())[:70]
        if not sources:
            problems.append(f"'{opening}...' quotes {', '.join(found)} but links no result file "
                            f"({', '.join(SOURCE_FOLDERS)}, or docs/paper.md for the paper's numbers)")
            continue
        for quote in found:
            if not any(matches(quote, value) for source in sources for value in numbers_in(source)):
                names = ", ".join(source.relative_to(ROOT).as_posix() for source in sources)
                problems.append(f"'{opening}...' quotes {quote}, which is not in {names}")
    return problems


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", [page for page in PAGES if page != PAPER_DIGEST], ids=page_id)
def test_every_quoted_number_is_in_the_result_it_links(page):
    problems = unsourced_quotes(page)
    assert not problems, f"{page_id(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_resolves(page):
    missing = [path for path in local_links(page, "\n\n".join(blocks(page.read_text()))) if not path.exists()]
    assert not missing, f"{page_id(page)} links files that do not exist: {[str(p) for p in missing]}"


def test_the_number_check_catches_what_it_should(tmp_path):
    """The rule itself, on a page written for it."""
    source = ROOT / "benchmarks" / "results" / "bench_smollm2.md"  # quotes 86.6 tokens/s, 3.40x (2.75-3.49)
    link = f"[bench]({os.path.relpath(source, tmp_path)})"
    page = tmp_path / "page.md"
    page.write_text(f"Decode at 86.6 tokens/s, 3.40x (2.75-3.49) {link}.\n\n"
                    f"Decode at 86.7 tokens/s {link}.\n\n"
                    "Decode at 86.6 tokens/s, nothing linked.\n\n"
                    "Eight blocks, 64 tokens, §5.5, Theorem 3.1, `atol=1.5`: no quotes here.\n")
    problems = unsourced_quotes(page)
    assert len(problems) == 2
    assert "86.7" in problems[0] and "links no result file" in problems[1]
    assert matches("86%", 0.8613) and matches("1.9e-06", 1.9e-06) and matches("16,384", 16384)
    assert not matches("1.06", 1.07) and not matches("2.0e-12", 2.1e-12)


def test_the_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; at most {README_LIMIT}: move the depth to docs/"
    text = README.read_text()
    assert text.find("## What reffuse is not") < text.find("## Quick start"), "the non-goals come before the start"


def test_the_readme_api_runs(tmp_path, monkeypatch):
    """The API block, as written: it runs on the synthetic model and saves under out/."""
    monkeypatch.chdir(tmp_path)
    code = re.search(r"## The API\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "out").is_dir()


def test_the_quick_start_has_the_two_commands_ci_reads():
    """.ci/run runs the one line after <!-- test-command -->; the main command installs and runs the demo."""
    text = README.read_text()
    for marker, must_hold in (("main-command", "reffuse demo"), ("test-command", "pytest")):
        found = re.search(rf"<!-- {marker} -->\n```bash\n([^\n]+)\n```", text)
        assert found, f"README.md: no one-line bash block after <!-- {marker} -->"
        assert "pip install" in found.group(1) and must_hold in found.group(1), found.group(1)


# Commands


SKIP = ("python3 -m venv", "mpiexec -f", "mpiexec --hostfile", "mkdir -p out && printf",  # fresh envs, other machines
        "jupyter lab", ".venv/bin/jupyter lab")  # interactive: a server that runs until stopped
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


def page_commands(page: Path) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#") and not line.startswith(SKIP) and line not in NEEDS_A_GPU:
                commands.append(line)
    return commands


def brings_its_own_ids(words: list[str], folder: Path) -> bool:
    """`verify --against X.npz` reads its token ids from the dump, and `verify` over a conformance kit (which an
    earlier command of the page wrote into `folder`) from the kit's references: both refuse flags that would
    choose others."""
    if "verify" not in words or "--against" not in words:
        return False
    model = words[words.index("--model") + 1] if "--model" in words else ""
    return words[words.index("--against") + 1].endswith(".npz") or (bool(model) and is_kit(folder / model))


def runnable(command: str, folder: Path) -> str:
    """The command with this environment's executables and the smaller sizes, to run in `folder`."""
    command = command.replace(".venv/bin/", f"{BIN}/")
    command = re.sub(r"(^|&& |\| )reffuse ", lambda m: f"{m.group(1)}{BIN}/reffuse ", command)
    command = re.sub(r"(^|&& )mpiexec ", lambda m: f"{m.group(1)}{BIN}/mpiexec ", command)
    command = re.sub(r"(^|&& )python ", lambda m: f"{m.group(1)}{sys.executable} ", command)
    words = shlex.split(command.split(" > ")[0].split("&& ")[-1])
    name = next((w for w in words if w in SMALLER), None)
    if name is None or brings_its_own_ids(words, folder):
        return command
    extra = " ".join(shlex.quote(w) for w in SMALLER[name])
    if " > " in command:
        head, tail = command.split(" > ", 1)
        return f"{head} {extra} > {tail}"
    return f"{command} {extra}"


def test_the_pages_give_commands():
    assert len(page_commands(README)) >= 2
    assert sum(len(page_commands(page)) for page in PAGES) > 20


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if page_commands(page)], ids=page_id)
def test_the_commands_run_and_leave_the_checkout_clean(page, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True)
    env = os.environ | {"MPLBACKEND": "Agg", "PYTHON": sys.executable}
    for command in page_commands(page):
        run = runnable(command, checkout)
        result = subprocess.run(run, shell=True, cwd=checkout, env=env, capture_output=True, text=True,
                                timeout=3600)  # a hang guard
        # 1: a check that is reported (verify, a graded exercise), never a traceback
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, f"{command}\n{result.stderr[-2000:]}"
        status = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True)
        assert status.stdout == "", f"`{command}` left the checkout changed:\n{status.stdout}"
