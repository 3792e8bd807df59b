"""The shared cache: processes that load SmolLM2 at once into a fresh cache convert it once and all get it."""

import json
import os
import subprocess
import sys

import pytest

from reffuse.formats.fetch import cached_path

LOADER = ("import sys, numpy as np, reffuse; m = reffuse.load_model('smollm2'); "
          "print(m.config.name, len(m.blocks), float(np.abs(m.embed).sum()))")


def test_four_first_loads_into_one_fresh_cache_all_succeed_three_times(tmp_path):
    gguf = cached_path("smollm2")
    if not gguf.is_file():
        pytest.skip("the SmolLM2 GGUF is not in the cache (it is fetched by the other real-model tests)")
    for round_ in range(3):
        cache = tmp_path / f"cache{round_}"
        (cache / "smollm2").mkdir(parents=True)
        os.link(gguf, cache / "smollm2" / gguf.name) if os.stat(gguf).st_dev == os.stat(tmp_path).st_dev else \
            (cache / "smollm2" / gguf.name).write_bytes(gguf.read_bytes())
        env = os.environ | {"REFFUSE_CACHE": str(cache)}
        loaders = [subprocess.Popen([sys.executable, "-c", LOADER], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(4)]
        # a hang guard: a conversion takes ~10 s alone; four loaders on a loaded machine, minutes at most
        results = [(p.wait(timeout=1800), *p.communicate()) for p in loaders]
        assert all(code == 0 for code, _, _ in results), [err[-500:] for _, _, err in results]
        assert len({out for _, out, _ in results}) == 1                       # the same model, every process
        converted = [err.count("converting") for _, _, err in results]
        assert sum(converted) == 1                                            # converted once, the rest waited
        folder = cache / "smollm2" / "float32-v3"
        assert json.loads((folder / "source.json").read_text())["conversion"] == 3
        assert sorted(p.name for p in (cache / "smollm2").iterdir() if p.name.startswith(".")) == \
            [".convert.lock"]                                                 # no temporary folder left


def test_a_corrupt_conversion_stamp_is_named_with_what_to_do(tmp_path, monkeypatch):
    gguf = cached_path("smollm2")
    if not gguf.is_file():
        pytest.skip("the SmolLM2 GGUF is not in the cache")
    import reffuse
    from reffuse.errors import ReffuseError
    (tmp_path / "smollm2" / "float32-v3").mkdir(parents=True)
    os.symlink(gguf, tmp_path / "smollm2" / gguf.name)
    (tmp_path / "smollm2" / "float32-v3" / "source.json").write_text("{not json")
    monkeypatch.setenv("REFFUSE_CACHE", str(tmp_path))
    with pytest.raises(ReffuseError, match=r"source.json is not valid JSON .*: remove the folder .*float32-v3; "
                                           "reffuse converts the GGUF again"):
        reffuse.load_model("smollm2")
