"""Files, below any rule about whose they are: the checks before a file is read or written, the umask's
permissions, temporary names, atomic renames, and a lock.

- `read_json`: one message for each way a JSON file can fail to read; `check_regular_file` before opening any file
  a user names (a FIFO or a device in its place would block the read, or never end).
- Temporary names are `.<target>.partial-<host>-<pid>-<random>`: another process never touches them while their
  process runs; every publish removes those of ended processes beside its target (`remove_abandoned`), and a
  command ended by SIGINT or SIGTERM removes its own (`reffuse.outputs.running`).
- Renames that replace nothing (`rename_if_absent`) or swap two paths in one step (`exchange`), on Linux's
  renameat2; `replace_folder` and `publish_once` put a whole folder in place.

Writing a result, all or nothing and by the output rule, is `reffuse.outputs`' (`write_json_atomic` and the rest).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path

from reffuse.errors import ReffuseError

PARTIAL = re.compile(r"^\.(?P<target>.+)\.partial-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")


def check_regular_file(path, remedy: str) -> Path:
    """`path` if it is a regular file (or a link to one); else a ReffuseError that ends in `remedy`."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ReffuseError(f"{path} does not exist: {remedy}") from None
    except OSError as e:
        raise ReffuseError(f"{path} cannot be read ({e.strerror}): {remedy}") from None
    if stat.S_ISDIR(mode):
        raise ReffuseError(f"{path} is a folder, not a file: {remedy}")
    if not stat.S_ISREG(mode):
        raise ReffuseError(f"{path} is not a regular file (a pipe, socket or device), which reffuse does not read: "
                           f"{remedy}")
    return path


def read_json(path, remedy: str):
    """The JSON value in `path`; a missing, unreadable or malformed file is a ReffuseError that ends in `remedy`
    (what the user should do, e.g. "rerun `reffuse analyze` to write it")."""
    path = check_regular_file(path, remedy)
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


_partials: set[Path] = set()    # the temporary names this process made: removed when SIGINT or SIGTERM ends it


def host_name() -> str:
    """This machine's name as temporary names carry it (no "-", which separates their parts)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def partial_name(target: Path, pid: int | None = None) -> Path:
    """A temporary name beside `target`, on the same file system (so that a rename publishes it)."""
    own = pid is None
    pid = os.getpid() if own else pid
    path = Path(target).parent / f".{Path(target).name}.partial-{host_name()}-{pid}-{secrets.token_hex(4)}"
    if own:
        _partials.add(path.absolute())
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()


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
            remove_path(path)
            removed.append(path)
    return removed


def remove_own_partials() -> None:
    for path in list(_partials):
        if os.path.lexists(path):
            remove_path(path)
        _partials.discard(path)


# ---------------------------------------------------------------------------------------------------------------
# Files


def check_writable(path: Path, remedy: str) -> None:
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
    check_writable(parent, f"so {path} cannot be written: give a path you can write")
    return path


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
# Atomic renames (Linux renameat2; elsewhere a check and a rename, with a short window between them)


_NOREPLACE, _EXCHANGE = 1, 2
_renameat2 = None


def _rename2(source: Path, target: Path, flags: int) -> int:
    """renameat2(source, target, flags): 0, or the errno; ENOSYS where the system has no such call."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return errno.ENOSYS
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno()


def rename_unsupported(code: int) -> bool:
    return code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def rename_if_absent(source: Path, target: Path) -> bool:
    """Rename `source` to `target` if nothing is there; False if something is."""
    code = _rename2(source, target, _NOREPLACE)
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if code and not rename_unsupported(code):
        raise OSError(code, os.strerror(code), str(target))
    if code:
        if os.path.lexists(target):
            return False
        os.rename(source, target)
    return True


def exchange(a: Path, b: Path) -> int:
    """Swap two paths in one step: 0, or the errno (ENOSYS etc. where the system cannot)."""
    return _rename2(a, b, _EXCHANGE)


def replace_folder(staging: Path, target: Path) -> None:
    """Put the folder `staging` at `target`, replacing what is there in one atomic exchange where the system has
    one (a reader sees the old folder or the new one, never none)."""
    try:
        os.rename(staging, target)      # a new target, or an empty folder in its place: one atomic step
        return
    except OSError:
        if not (target.is_dir() and any(target.iterdir())):
            raise
    if exchange(staging, target) == 0:  # the new folder at target, the old one at the staging name
        remove_path(staging)
        return
    old = partial_name(target)           # no atomic exchange: two renames, the old folder kept until the second
    os.rename(target, old)
    os.rename(staging, target)
    remove_path(old)


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


# ---------------------------------------------------------------------------------------------------------------
# Locks


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on the file `path` (created if needed) for the block: processes of one machine
    that take it run the block one at a time. Where the system has no such lock, the block runs unlocked
    (what it publishes must then be safe by itself, as `reffuse.outputs.publish_once` is)."""
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
