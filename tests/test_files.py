"""All-or-nothing writes: files and folders published by one rename, with the umask's permissions."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors import safe_open

import reffuse
from reffuse.errors import ReffuseError
from reffuse.files import check_writable_file, partial_name, remove_abandoned, staged_folder, write_text_atomic
from reffuse.formats.checkpoint import load_folder, save_model


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mode(path):
    return os.stat(path).st_mode & 0o777


def test_a_saved_model_has_the_umasks_permissions_and_nothing_stale(tmp_path, tiny32):
    folder = tmp_path / "model"
    save_model(tiny32, folder, files={"fuse.json": "{}\n"})
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "fuse.json"}
    assert all(mode(p) == 0o666 & ~umask() for p in folder.iterdir())   # safetensors alone writes 0600
    assert mode(folder) == 0o777 & ~umask()
    save_model(reffuse.cast(tiny32, "float64"), folder, overwrite=True)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}   # the old fuse.json is gone
    assert load_folder(folder, "float64").embed.dtype == np.float64
    assert [p.name for p in tmp_path.iterdir()] == ["model"]                          # no temporary folder left


def test_saving_over_a_folder_refuses_what_it_must_not_replace(tmp_path, tiny32):
    save_model(tiny32, tmp_path / "model")
    with pytest.raises(ReffuseError, match="already holds a model: give a new folder, or --overwrite to replace it"):
        save_model(tiny32, tmp_path / "model")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"...")
    with pytest.raises(ReffuseError, match="holds files that are not a model reffuse wrote"):
        save_model(tiny32, tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"..."
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ReffuseError, match="a-file is a file: give a folder"):
        save_model(tiny32, tmp_path / "a-file")
    (tmp_path / "empty").mkdir()
    save_model(tiny32, tmp_path / "empty")                                            # an empty folder is fine


def test_a_failed_build_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_unwritable_outputs_are_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReffuseError, match="is a file, so .* cannot be written"):
        check_writable_file(tmp_path / "file" / "out.json")
    with pytest.raises(ReffuseError, match="is a folder: give the path of a file"):
        check_writable_file(tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ReffuseError, match="is not writable"):
            check_writable_file(locked / "out.json")


def test_atomic_text_and_abandoned_temporaries(tmp_path):
    path = write_text_atomic(tmp_path / "a.json", "{}\n")
    assert path.read_text() == "{}\n" and mode(path) == 0o666 & ~umask()
    mine = partial_name(tmp_path / "x")
    mine.mkdir()
    gone = partial_name(tmp_path / "y", pid=2 ** 30)
    gone.mkdir()
    assert remove_abandoned(tmp_path) == [gone]
    assert mine.exists()


SAVER = textwrap.dedent("""
    import sys
    import reffuse
    from reffuse.core.tiny import build_tiny
    from reffuse.formats.checkpoint import save_model
    models = [build_tiny(), reffuse.cast(build_tiny(), "float64")]
    print("ready", flush=True)
    i = 0
    while True:
        save_model(models[i % 2], sys.argv[1], overwrite=True)
        print("saved", flush=True)
        i += 1
""")


def test_a_save_killed_at_any_moment_leaves_the_old_model_or_the_new_one(tmp_path, tiny32):
    folder = tmp_path / "model"
    save_model(tiny32, folder)
    rng = np.random.default_rng(0)
    seen, saves = set(), 0
    for _ in range(12):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE, text=True)
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        saver.kill()
        saver.wait()
        saves += saver.stdout.read().count("saved")
        load_folder(folder)                                                  # loadable
        config = json.loads((folder / "config.json").read_text())
        with safe_open(str(folder / "model.safetensors"), framework="numpy") as weights:
            stored = str(weights.get_tensor("model.norm.weight").dtype)
        assert config["torch_dtype"] == stored                               # config and weights of one save
        seen.add(stored)
    assert saves > 12 and seen == {"float32", "float64"}  # the saver was saving, and kills found both models
