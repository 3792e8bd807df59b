"""Reading and writing the files reffuse keeps: all or nothing, with the permissions the umask gives.

- `read_json`: one message for each way a JSON file can fail to read.
- `write_text_atomic` / `write_json_atomic`: a file written under a temporary name beside its target and
  renamed onto it, so a reader (or a crash) sees the old file or the new one, never half of one.
- `staged_folder`: a folder (a saved model, an analysis, a figure set) built under a temporary name and
  published by one rename, or, over an existing folder that may be replaced, by an atomic exchange of the
  two, so that a SIGKILL at any moment leaves either the old folder or the new one at the target.
- `remove_abandoned`: the temporary names that interrupted processes of this machine left behind.

Temporary names are `.<target>.partial-<host>-<pid>-<random>`: another process never touches them while
their process runs, and they say which process they belong to.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from reffuse.errors import ReffuseError

PARTIAL = re.compile(r"^\.(?P<target>.+)\.partial-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")


def read_json(path, remedy: str):
    """The JSON value in `path`; a missing, unreadable or malformed file is a ReffuseError that ends in `remedy`
    (what the user should do, e.g. "rerun `reffuse analyze` to write it")."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ReffuseError(f"{path} {problem}: {remedy}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReffuseError(f"{path} is not valid JSON ({e}): {remedy}") from None
    except OSError as e:
        raise ReffuseError(f"{path} cannot be read ({e.strerror}): {remedy}") from None


def checkout_root() -> Path:
    """The checkout whose benchmarks/ and reports/ hold the committed results: the one this package lives in,
    else the working folder (an installed package has no results of its own)."""
    package_checkout = Path(__file__).resolve().parents[1]
    if (package_checkout / "benchmarks").is_dir():
        return package_checkout
    return Path.cwd()


# ---------------------------------------------------------------------------------------------------------------
# Permissions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(path) -> None:
    """Give `path` the permissions a plain open() or mkdir() would (0666 or 0777 less the umask): temporary
    files and folders are created private, and some writers (safetensors) make their files 0600."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def share_tree(folder) -> None:
    """`share` for a folder and everything in it."""
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            share(path)


# ---------------------------------------------------------------------------------------------------------------
# Temporary names


def host_name() -> str:
    """This machine's name as temporary names carry it (no "-", which separates their parts)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def partial_name(target: Path, pid: int | None = None) -> Path:
    """A temporary name beside `target`, on the same file system (so that a rename publishes it)."""
    pid = os.getpid() if pid is None else pid
    return target.parent / f".{target.name}.partial-{host_name()}-{pid}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_abandoned(folder) -> list[Path]:
    """Remove the temporary files and folders in `folder` left by processes of this machine that have ended;
    returns what was removed. Those of running processes, and of other machines, are left alone."""
    folder = Path(folder)
    host = host_name()
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = PARTIAL.match(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Files


def _check_writable(path: Path, remedy: str) -> None:
    """Refuse a path whose nearest existing folder (itself or a parent) this process cannot write into."""
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ReffuseError(f"{existing} is not writable, {remedy}")


def check_writable_file(path) -> Path:
    """Refuse, before any long work, an output file that cannot be written: a folder in its place, or a parent
    that is not a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise ReffuseError(f"{path} is a folder: give the path of a file to write")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ReffuseError(f"{parent} is a file, so {path} cannot be written: give a path in a folder")
    _check_writable(parent, f"so {path} cannot be written: give a path you can write")
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write `data` to `path` all or nothing (a temporary file beside it, renamed onto it)."""
    path = check_writable_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        share(temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, value, inline_lists: bool = False) -> Path:
    """JSON indented by one space; with inline_lists, every list of numbers (or of lists of numbers) on one line,
    which keeps per-prediction values to a line a window instead of a line a value."""
    return write_text_atomic(path, json_text(value, inline_lists))


def json_text(value, inline_lists: bool = False) -> str:
    if not inline_lists:
        return json.dumps(value, indent=1) + "\n"
    inline = []

    def numeric(v) -> bool:
        return isinstance(v, (int, float, bool)) or v is None

    def placeholders(v):
        if isinstance(v, dict):
            return {k: placeholders(x) for k, x in v.items()}
        if isinstance(v, list):
            if v and all(numeric(x) or isinstance(x, list) and all(map(numeric, x)) for x in v):
                inline.append(json.dumps(v, separators=(", ", ": ")))
                return f"\0{len(inline) - 1}\0"
            return [placeholders(x) for x in v]
        return v

    text = json.dumps(placeholders(value), indent=1)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: inline[int(m.group(1))], text) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Folders


def check_output_folder(target, overwrite: bool, replaceable=None, what: str = "folder") -> Path:
    """Refuse, before any long work, an output folder that `staged_folder` would not publish: a file in its
    place, a non-empty folder without `overwrite`, or one that `replaceable(folder)` says is not one of ours."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ReffuseError(f"{target} is a file: give a folder (new or empty) to write the {what} into")
    if target.is_dir() and any(target.iterdir()):
        if replaceable is not None and not replaceable(target):
            raise ReffuseError(f"{target} holds files that are not a {what} reffuse wrote: give a new or empty "
                               "folder (nothing in it is touched)")
        if not overwrite:
            raise ReffuseError(f"{target} already holds a {what}: give a new folder, or --overwrite to replace it")
    _check_writable(target, f"give a folder you can write the {what} into")
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def _publish(staging: Path, target: Path) -> None:
    try:
        os.rename(staging, target)      # a new target, or an empty folder in its place: one atomic step
        return
    except OSError:
        if not (target.is_dir() and any(target.iterdir())):
            raise
    if _exchange(staging, target):      # the new folder at target, the old one at the staging name
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = partial_name(target)          # no atomic exchange: two renames, the old folder kept until the second
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target, overwrite: bool = False, replaceable=None, what: str = "folder"):
    """Yield an empty temporary folder beside `target`; when the block ends without an exception, publish it
    as `target` (replacing an existing folder only when `overwrite`, after `check_output_folder`'s checks);
    otherwise remove it. Its files get the umask's permissions."""
    target = check_output_folder(target, overwrite, replaceable, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent)
    staging = partial_name(target)
    staging.mkdir()
    try:
        yield staging
        share_tree(staging)
        _publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish_once(staging: Path, target: Path) -> bool:
    """Publish `staging` as `target` unless another process has published `target` first (then `staging` is
    removed and False returned): rename only, so nothing another process may be reading is ever removed."""
    try:
        os.rename(staging, target)
        return True
    except OSError:
        if target.is_dir() and any(target.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
            return False
        raise


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on the file `path` (created if needed) for the block: processes of one machine
    that take it run the block one at a time. Where the system has no such lock, the block runs unlocked
    (what it publishes must then be safe by itself, as `publish_once` is)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        handle = open(path, "a")
    except OSError:      # a read-only cache: nothing to publish there either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
