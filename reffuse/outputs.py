"""The output rule that every command writing a result follows (`claim_file`, `check_output_folder`), to the publish:

- a path that exists is refused without `overwrite`;
- with `overwrite`, only a result of the same kind that the same command wrote is replaced: a folder names what
  made it in its marker file (MARKER, which also lists the files it wrote there), a file says so by its content
  (`Output.recognise`); anything else is refused, and nothing in it is touched;
- what a command claims before its work is checked again when the result is published: it is renamed into
  place only if the path still holds what it held at the claim (an atomic rename that replaces nothing, or an
  atomic exchange checked before the old result is removed), so that of two processes writing to one path,
  one publishes and the other is refused;
- `write_bytes_atomic` / `write_text_atomic` / `write_json_atomic` and `staged_file` write a file beside its
  target and publish it by that rule, `staged_folder` a folder, so that a reader or a crash sees the old result or
  the new one, never half of one; a path nobody claimed is replaced by a plain rename.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reffuse.errors import ReffuseError
from reffuse.files import (check_writable, check_writable_file, exchange, json_text, partial_name, remove_abandoned,
                           remove_own_partials, remove_path, rename_if_absent, rename_unsupported, replace_folder, share,
                           share_tree)

MARKER = ".reffuse-output.json"  # in every folder a command publishes: what made it, and the files it wrote


# ---------------------------------------------------------------------------------------------------------------
# The command that runs, and the signals that end it


_command: str | None = None     # the reffuse command this process runs; None when reffuse is used from Python


class Terminated(BaseException):
    """SIGTERM, raised where the process was, so that every `finally` on the way out removes what it made."""


@contextlib.contextmanager
def running(command: str, stop_on_sigterm: bool = True):
    """The block runs `reffuse <command>`: the outputs it publishes are marked as that command's, SIGTERM ends it
    as SIGINT does (by an exception, so that every temporary file and folder on the way out is removed), and what
    is left of its temporary names when it ends by a signal is removed."""
    global _command
    previous_command, _command = _command, command
    handlers, received = {}, []
    if stop_on_sigterm and _in_main_thread():
        def terminate(signum, frame):
            received.append(signum)
            raise Terminated(signum)

        def interrupt(signum, frame):
            received.append(signum)
            raise KeyboardInterrupt

        handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, terminate)
        handlers[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    except (KeyboardInterrupt, Terminated):
        remove_own_partials()
        raise
    except BaseException as e:
        if not received:
            raise
        # The signal's exception was raised inside library code that turned it into another error (numpy's
        # `tofile` does): the command still ends as the signal asked.
        remove_own_partials()
        raise (KeyboardInterrupt() if received[0] == signal.SIGINT else Terminated(received[0])) from e
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
    check_writable(target, f"give a folder you can write the {what} into")
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
# Publishing: by the claim where a command made one


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
            if not rename_if_absent(staging, target):
                raise _changed(claim)
        else:
            code = exchange(staging, target)
            if code == errno.ENOENT:                  # the old result was removed meanwhile: nothing to replace
                if not rename_if_absent(staging, target):
                    raise _changed(claim)
            elif code == 0:
                if _identity(staging) != claim.held:  # what came out is not what was claimed: put it back
                    exchange(staging, target)
                    raise _changed(claim)
                remove_path(staging)
            elif rename_unsupported(code):
                if _identity(target) != claim.held:
                    raise _changed(claim)
                old = partial_name(target)
                os.rename(target, old)
                os.rename(staging, target)
                remove_path(old)
            else:
                raise OSError(code, os.strerror(code), str(target))


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


# ---------------------------------------------------------------------------------------------------------------
# Files


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
            remove_path(temporary)
    return target


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
            remove_path(staging)


