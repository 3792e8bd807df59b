"""Reading and writing the files reffuse keeps: all or nothing, and never over what it was not asked to replace.

- `read_json`: one message for each way a JSON file can fail to read; `check_regular_file` before opening any file
  a user names (a FIFO or a device in its place would block the read, or never end).
- The output rule, one for every command that writes a result (`claim_file`, `check_output_folder`):
  * a path that exists is refused without `overwrite`;
  * with `overwrite`, only a result of the same kind that the same command wrote is replaced: a folder names what
    made it in its marker file (MARKER, which also lists the files it wrote there), a file says so by its content
    (`Output.recognise`); anything else is refused, and nothing in it is touched;
  * what a command claims before its work is checked again when the result is published: it is renamed into
    place only if the path still holds what it held at the claim (an atomic rename that replaces nothing, or an
    atomic exchange checked before the old result is removed), so that of two processes writing to one path,
    one publishes and the other is refused.
  `write_bytes_atomic` / `write_text_atomic` / `write_json_atomic`, `staged_file` and `staged_folder` publish
  by that rule where the path was claimed, and by a plain rename (a reader or a crash sees the old file or the
  new one, never half of one) where it was not (files inside a folder being built, caches, checkpoints).
- Temporary names are `.<target>.partial-<host>-<pid>-<random>`: another process never touches them while their
  process runs; every publish removes those of ended processes beside its target (`remove_abandoned`), and a
  command ended by SIGINT or SIGTERM removes its own (`running`).
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
import signal
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reffuse.errors import ReffuseError

PARTIAL = re.compile(r"^\.(?P<target>.+)\.partial-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")
MARKER = ".reffuse-output.json"  # in every folder a command publishes: what made it, and the files it wrote


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
# Temporary names, and the command that writes them


_command: str | None = None     # the reffuse command this process runs; None when reffuse is used from Python
_partials: set[Path] = set()    # the temporary names this process made: removed when SIGINT or SIGTERM ends it


class Terminated(BaseException):
    """SIGTERM, raised where the process was, so that every `finally` on the way out removes what it made."""


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


def _remove(path: Path) -> None:
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
            _remove(path)
            removed.append(path)
    return removed


def _remove_own_partials() -> None:
    for path in list(_partials):
        if os.path.lexists(path):
            _remove(path)
        _partials.discard(path)


@contextlib.contextmanager
def running(command: str, stop_on_sigterm: bool = True):
    """The block runs `reffuse <command>`: the outputs it publishes are marked as that command's, SIGTERM ends it
    as SIGINT does (by an exception, so that every temporary file and folder on the way out is removed), and what
    is left of its temporary names when it ends by a signal is removed."""
    global _command
    previous_command, _command = _command, command
    handlers = {}
    if stop_on_sigterm and _in_main_thread():
        def terminate(signum, frame):
            raise Terminated(signum)
        handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except (KeyboardInterrupt, Terminated):
        _remove_own_partials()
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        _command = previous_command
        _claims.clear()


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done: a publish is not cut between its steps."""
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---------------------------------------------------------------------------------------------------------------
# The output rule


@dataclass(frozen=True)
class Output:
    """One kind of result a command writes: its name in messages, and how to tell one that reffuse wrote from
    anything else (for files; for folders written before marker files existed)."""
    kind: str
    recognise: Callable[[Path], bool] | None = None


RECOGNISED_BYTES = 64 << 20  # a recogniser reads no more of a file than this: results of ours are smaller


def json_naming(command: str) -> Callable[[Path], bool]:
    """A recogniser: a JSON object whose "command" is a command line of `command` (e.g. "reffuse bench"); for a
    folder, one of its *.json files."""
    def recognise(path: Path) -> bool:
        for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            if file.is_file() and file.stat().st_size < RECOGNISED_BYTES:
                value = json.loads(file.read_text(encoding="utf-8"))
                if isinstance(value, dict) and command in str(value.get("command", "")):
                    return True
        return False
    return recognise


def text_headed(heading: str) -> Callable[[Path], bool]:
    """A recogniser: a text file whose first line starts with `heading` (e.g. "# reffuse bench")."""
    def recognise(path: Path) -> bool:
        with open(path, encoding="utf-8") as f:
            return f.readline(len(heading) + 1).startswith(heading)
    return recognise


@dataclass(frozen=True)
class Claim:
    """What an output path held when a command claimed it (before its work)."""
    target: Path
    output: Output
    folder: bool
    held: tuple[int, int] | None   # (device, inode) of what was there; None for nothing
    empty: bool = False            # an empty folder was there


_claims: dict[Path, Claim] = {}  # while a command runs: its outputs, claimed before the work, until published


def _remember(claim: Claim) -> None:
    if _command is not None:
        _claims[claim.target.absolute()] = claim


def _writer(command: str | None) -> str:
    return f"`reffuse {command}`" if command else "reffuse"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _recognised(output: Output, path: Path) -> bool:
    if output.recognise is None:
        return False
    try:
        return bool(output.recognise(path))
    except Exception:  # a file that cannot be read as one of ours is not one of ours
        return False


def read_marker(folder) -> dict | None:
    """The marker of a folder a command published (command, kind, files), or None."""
    path = Path(folder) / MARKER
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


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


def claim_file(path, output: Output, overwrite: bool) -> Path:
    """Check, before any long work, that a command may write its result `output` to the file `path` (the rule
    above), and remember what the path holds, for the check at publishing."""
    path = check_writable_file(path)
    if path.is_symlink():
        raise ReffuseError(f"{path} is a symbolic link: give the path of the file itself, or a new one")
    held = _identity(path)
    if held is not None:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise ReffuseError(f"{path} is not a regular file (a pipe, socket or device): give the path of a new file")
        if not _recognised(output, path):
            raise ReffuseError(f"{path} exists and is not a {output.kind} reffuse wrote: give another path (this one "
                               "is left as it is)")
        if not overwrite:
            raise ReffuseError(f"{path} exists: give another file, or --overwrite to replace it")
    _remember(Claim(path, output, folder=False, held=held))
    return path


def check_output_folder(target, overwrite: bool, replaceable=None, what: str = "folder") -> Path:
    """Check, before any long work, that a command may publish a folder of `what` at `target` (the rule above:
    a marker of the same command and kind, or for a folder without one `replaceable(target)`), and remember
    what it holds, for the check at publishing."""
    _remember(_claim_folder(Path(target), overwrite, replaceable, what))
    return Path(target)


def _claim_folder(target: Path, overwrite: bool, replaceable, what: str) -> Claim:
    output = Output(what, replaceable)
    if target.is_symlink():
        raise ReffuseError(f"{target} is a symbolic link: give the path of the folder itself, or a new one")
    if target.exists() and not target.is_dir():
        raise ReffuseError(f"{target} is a file: give a folder (new or empty) to write the {what} into")
    _check_writable(target, f"give a folder you can write the {what} into")
    held, empty = _identity(target), target.is_dir() and not any(target.iterdir())
    if held is not None and not empty:
        _check_replaceable(target, output, overwrite)
    return Claim(target, output, folder=True, held=held, empty=empty)


def _check_replaceable(target: Path, output: Output, overwrite: bool) -> None:
    marker = read_marker(target)
    if marker is None and not _recognised(output, target):
        raise ReffuseError(f"{target} holds files that are not a {output.kind} reffuse wrote: give a new or empty "
                           "folder (nothing in it is touched)")
    if marker is not None and (marker.get("kind") != output.kind or _command and marker.get("command") != _command):
        ours = f" of {_writer(_command)}" if _command else ""
        raise ReffuseError(f"{target} holds a {marker.get('kind')} that {_writer(marker.get('command'))} wrote, not a "
                           f"{output.kind}{ours}: give a new or empty folder (nothing in it is touched)")
    if not overwrite:
        raise ReffuseError(f"{target} already holds a {output.kind}: give a new folder, or --overwrite to replace it")
    if marker is not None:
        stray = sorted(set(os.listdir(target)) - set(marker["files"]) - {MARKER})
        if stray:
            raise ReffuseError(f"{target} holds files that reffuse did not write there ({', '.join(stray[:3])}"
                               f"{' ...' if len(stray) > 3 else ''}): move them out, or give a new folder (nothing "
                               "in it is touched)")


def _changed(claim: Claim) -> ReffuseError:
    return ReffuseError(f"{claim.target} changed while this command ran (another process wrote there): it was left "
                        f"as it is, and this {claim.output.kind} was not published; give another path, or run again")


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


def _unsupported(code: int) -> bool:
    return code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def _rename_if_absent(source: Path, target: Path) -> bool:
    """Rename `source` to `target` if nothing is there; False if something is."""
    code = _rename2(source, target, _NOREPLACE)
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if code and not _unsupported(code):
        raise OSError(code, os.strerror(code), str(target))
    if code:
        if os.path.lexists(target):
            return False
        os.rename(source, target)
    return True


def _exchange(a: Path, b: Path) -> int:
    """Swap two paths in one step: 0, or the errno (ENOSYS etc. where the system cannot)."""
    return _rename2(a, b, _EXCHANGE)


def _publish(staging: Path, target: Path, claim: Claim | None) -> None:
    """Put `staging` at `target`: by the claim's rule where there is one, else replacing what is there."""
    remove_abandoned(target.parent)
    with _signals_held():
        if claim is None:
            if staging.is_dir():
                replace_folder(staging, target)
            else:
                os.replace(staging, target)
            return
        if claim.held is None or claim.empty:
            if claim.empty:
                try:
                    os.rmdir(target)
                except FileNotFoundError:
                    pass
                except OSError:
                    raise _changed(claim) from None
            if not _rename_if_absent(staging, target):
                raise _changed(claim)
        else:
            code = _exchange(staging, target)
            if code == errno.ENOENT:                  # the old result was removed meanwhile: nothing to replace
                if not _rename_if_absent(staging, target):
                    raise _changed(claim)
            elif code == 0:
                if _identity(staging) != claim.held:  # what came out is not what was claimed: put it back
                    _exchange(staging, target)
                    raise _changed(claim)
                _remove(staging)
            elif _unsupported(code):
                if _identity(target) != claim.held:
                    raise _changed(claim)
                old = partial_name(target)
                os.rename(target, old)
                os.rename(staging, target)
                _remove(old)
            else:
                raise OSError(code, os.strerror(code), str(target))


def replace_folder(staging: Path, target: Path) -> None:
    """Put the folder `staging` at `target`, replacing what is there in one atomic exchange where the system has
    one (a reader sees the old folder or the new one, never none)."""
    try:
        os.rename(staging, target)      # a new target, or an empty folder in its place: one atomic step
        return
    except OSError:
        if not (target.is_dir() and any(target.iterdir())):
            raise
    if _exchange(staging, target) == 0:  # the new folder at target, the old one at the staging name
        _remove(staging)
        return
    old = partial_name(target)           # no atomic exchange: two renames, the old folder kept until the second
    os.rename(target, old)
    os.rename(staging, target)
    _remove(old)


# ---------------------------------------------------------------------------------------------------------------
# Files


_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


@contextlib.contextmanager
def _write_failures_named(target: Path, temporary: Path, what: str | None = None):
    """A write the system refuses (a full disk) while a result is made under `temporary`: one line naming
    `target`, where nothing was published (the messages of the system name the temporary name, or nothing)."""
    try:
        yield
    except OSError as e:
        if not (e.errno in _WRITE_FAILURES or str(e.filename or "").startswith(str(temporary))):
            raise
        claim = _claims.get(target.absolute())
        what = what or (claim.output.kind if claim else "file")
        raise ReffuseError(f"the {what} for {target} could not be written ({e.strerror or e}): nothing was "
                           f"published at {target}; check the free space and the permissions") from None


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write `data` to `path` all or nothing (a temporary file beside it, renamed onto it), by the output rule
    where the path was claimed."""
    path = check_writable_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        with _write_failures_named(path, temporary):
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            share(temporary)
        _publish(temporary, path, _claims.pop(path.absolute(), None))
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


@contextlib.contextmanager
def staged_file(target):
    """Yield a temporary path beside `target` for a writer that makes its own file (a GGUF writer); when the
    block ends without an exception, publish it as `target` by the output rule (`claim_file` first); always
    remove what is left of it."""
    target = check_writable_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(target)
    try:
        with _write_failures_named(target, temporary):
            yield temporary
            share(temporary)
        _publish(temporary, target, _claims.pop(target.absolute(), None))
    finally:
        if os.path.lexists(temporary):
            _remove(temporary)
    return target


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


@contextlib.contextmanager
def staged_folder(target, overwrite: bool = False, replaceable=None, what: str = "folder"):
    """Yield an empty temporary folder beside `target`; when the block ends without an exception, publish it
    whole as `target`, with its marker, by the output rule (checked here unless `check_output_folder` claimed
    the target before the work); otherwise remove it. Its files get the umask's permissions. A write the system
    refuses (a full disk) is reported naming the target, and nothing is published."""
    target = Path(target)
    claim = _claims.pop(target.absolute(), None) or _claim_folder(target, overwrite, replaceable, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent)
    staging = partial_name(target)
    staging.mkdir()
    try:
        with _write_failures_named(target, staging, what):
            yield staging
            if _command is not None:  # a command's result; the Python API's folders are recognised by content
                marker = {"written_by": "reffuse", "command": _command, "kind": what, "files": os.listdir(staging)}
                (staging / MARKER).write_text(json.dumps(marker | {"files": sorted(marker["files"])}, indent=1) + "\n")
            share_tree(staging)
        _publish(staging, target, claim)
    finally:
        if os.path.lexists(staging):
            _remove(staging)


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
