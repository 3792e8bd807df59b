"""All-or-nothing writes by one output rule: files and folders published by one rename, with the umask's
permissions, never over what was not asked for, and never twice to one path by two processes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors import safe_open

import reffuse
from reffuse.errors import ReffuseError
from reffuse.files import check_regular_file, check_writable_file, partial_name, read_json, remove_abandoned
from reffuse.outputs import (MARKER, check_output_folder, claim_file, Output, read_marker, running, staged_file,
                             staged_folder, Terminated, text_headed, write_text_atomic)
from reffuse.formats.checkpoint import is_model_folder, load_folder, save_model

NOTE = Output("note", recognise=text_headed("# a note"))


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
    with running("analyze"), staged_folder(target, what="analysis") as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), running("analyze"), \
            staged_folder(target, overwrite=True, what="analysis") as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "old.txt"]


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
    stale = partial_name(tmp_path / "a.json", pid=2 ** 30)
    stale.write_text("half a file of a process that was killed")
    write_text_atomic(tmp_path / "a.json", "[]\n")                     # every publish removes those beside it
    assert not stale.exists() and mine.exists()


def test_a_command_marks_its_folders_and_replaces_only_its_own(tmp_path):
    target = tmp_path / "report"
    with running("experiments"):
        with staged_folder(target, what="report") as staging:
            (staging / "README.md").write_text("the report\n")
        assert read_marker(target) == {"written_by": "reffuse", "command": "experiments", "kind": "report",
                                       "files": ["README.md"]}
        with pytest.raises(ReffuseError, match="already holds a report: give a new folder, or --overwrite"):
            check_output_folder(target, False, what="report")
        check_output_folder(target, True, what="report")                            # its own, with --overwrite
    with running("analyze"), pytest.raises(ReffuseError, match="holds a report that `reffuse experiments` wrote, "
                                                               "not a analysis of `reffuse analyze`"):
        check_output_folder(target, True, what="analysis")
    (target / "notes.txt").write_text("mine")                                       # the user's file beside it
    with running("experiments"), pytest.raises(ReffuseError, match=r"holds files that reffuse did not write there "
                                                                   r"\(notes.txt\): move them out"):
        check_output_folder(target, True, what="report")
    assert (target / "notes.txt").read_text() == "mine"
    checkout = tmp_path / "checkout"                                                # a folder reffuse did not make
    checkout.mkdir()
    (checkout / "README.md").write_text("the project's README\n")
    with running("experiments"), pytest.raises(ReffuseError, match="holds files that are not a report reffuse wrote"):
        check_output_folder(checkout, True, what="report")


def test_a_file_is_replaced_only_if_reffuse_wrote_it_and_overwrite_is_given(tmp_path):
    with running("bench"):
        note = claim_file(tmp_path / "a.md", NOTE, overwrite=False)
        write_text_atomic(note, "# a note\n")
        with pytest.raises(ReffuseError, match="a.md exists: give another file, or --overwrite to replace it"):
            claim_file(note, NOTE, overwrite=False)
        write_text_atomic(claim_file(note, NOTE, overwrite=True), "# a note, again\n")
        assert note.read_text() == "# a note, again\n"
        (tmp_path / "theirs.md").write_text("the user's text\n")
        with pytest.raises(ReffuseError, match="theirs.md exists and is not a note reffuse wrote"):
            claim_file(tmp_path / "theirs.md", NOTE, overwrite=True)
        os.mkfifo(tmp_path / "fifo.md")
        with pytest.raises(ReffuseError, match="fifo.md is not a regular file"):
            claim_file(tmp_path / "fifo.md", NOTE, overwrite=True)
    assert (tmp_path / "theirs.md").read_text() == "the user's text\n"


def test_what_changed_after_the_claim_is_not_replaced(tmp_path):
    """The check at publishing: a result another process published after this one's claim stays, and this one
    is refused (the race of two writers, step by step)."""
    file, folder = tmp_path / "result.md", tmp_path / "result"
    with running("bench"):
        claim_file(file, NOTE, overwrite=False)
        file.write_text("# a note from another process\n")                         # published meanwhile
        with pytest.raises(ReffuseError, match="result.md changed while this command ran"):
            write_text_atomic(file, "# a note\n")
        claim_file(file, NOTE, overwrite=True)
        os.replace(write_text_atomic(tmp_path / "other.md", "# theirs, newer\n"), file)  # replaced meanwhile
        with pytest.raises(ReffuseError, match="changed while this command ran"):
            with staged_file(file) as staging:
                staging.write_text("# mine\n")
    assert file.read_text() == "# theirs, newer\n"
    with running("analyze"):
        check_output_folder(folder, False, what="analysis")
        folder.mkdir()
        (folder / "theirs.json").write_text("{}")
        with pytest.raises(ReffuseError, match="changed while this command ran"):
            with staged_folder(folder, what="analysis") as staging:
                (staging / "mine.json").write_text("{}")
    assert os.listdir(folder) == ["theirs.json"]
    assert sorted(os.listdir(tmp_path)) == ["result", "result.md"]                 # and no temporary left


def test_files_are_read_only_if_regular(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ReffuseError, match="config.json is not a regular file .*: write it again"):
        read_json(tmp_path / "config.json", "write it again")
    with pytest.raises(ReffuseError, match="is a folder, not a file: give a file"):
        check_regular_file(tmp_path, "give a file")


def test_a_folder_the_python_api_saved_is_replaced_by_a_command(tmp_path, tiny32):
    save_model(tiny32, tmp_path / "model")                                          # no marker: known by content
    assert read_marker(tmp_path / "model") is None and is_model_folder(tmp_path / "model")
    with running("fuse"):
        save_model(tiny32, tmp_path / "model", overwrite=True)
    assert read_marker(tmp_path / "model")["files"] == ["config.json", "model.safetensors"]


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


@pytest.mark.slow
def test_a_save_killed_at_any_moment_leaves_the_old_model_or_the_new_one(tmp_path, tiny32):
    folder = tmp_path / "model"
    save_model(tiny32, folder)
    rng = np.random.default_rng(0)
    seen, saves = set(), 0
    for _ in range(12):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE, text=True)
        assert saver.stdout.readline().strip() == "ready"
        # killed after 1 to 3 finished saves, then a moment later: within a save or between two, however fast the
        # machine is (the count of saves comes from the saver, not from a clock)
        for _ in range(int(rng.integers(1, 4))):
            assert saver.stdout.readline().strip() == "saved"
        time.sleep(float(rng.uniform(0.0, 0.05)))
        saver.kill()
        saver.wait()
        saves += saver.stdout.read().count("saved")
        load_folder(folder)                                                  # loadable
        config = json.loads((folder / "config.json").read_text())
        with safe_open(str(folder / "model.safetensors"), framework="numpy") as weights:
            stored = str(weights.get_tensor("model.norm.weight").dtype)
        assert config["torch_dtype"] == stored                               # config and weights of one save
        seen.add(stored)
    assert seen == {"float32", "float64"}  # kills found both models


@pytest.mark.parametrize("signum, ends_by", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_that_library_code_turns_into_another_error_still_ends_the_command(tmp_path, signum, ends_by):
    """numpy's `tofile`, interrupted by the signal's exception, raises a TypeError of its own instead: the command
    still ends as the signal asked, and its temporary files are removed."""
    temporary = partial_name(tmp_path / "x.gguf")
    with pytest.raises(ends_by):
        with running("export"):
            temporary.write_bytes(b"half a GGUF")
            try:
                signal.getsignal(signum)(signum, None)    # the handler, as the signal would run it
            except BaseException:
                raise TypeError("expected str, bytes or os.PathLike object, not BufferedWriter") from None
    assert not temporary.exists()
