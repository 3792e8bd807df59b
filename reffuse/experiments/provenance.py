"""Which commit a result's code came from: for a set of files, the last commit that changed them and whether the
checkout holds changes to them since (then the run used code that no commit records); and, for a result made
earlier, which of the files changed after its recorded commit."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass

from reffuse.files import checkout_root
from reffuse.records import FlatRecord


@dataclass(frozen=True)
class Provenance:
    """The last commit that changed `files` (paths relative to the checkout) and whether the checkout changed them
    since; outside a git checkout the last three are None."""
    files: tuple[str, ...]
    commit: str | None
    committed_at: str | None           # ISO 8601, the commit's date
    uncommitted_changes: bool | None

    def to_json(self) -> dict:
        return asdict(self) | {"files": list(self.files)}

    @classmethod
    def from_json(cls, raw: dict) -> Provenance:
        return cls(tuple(raw["files"]), raw["commit"], raw["committed_at"], raw["uncommitted_changes"])


@dataclass(frozen=True)
class FileChange(FlatRecord):
    """One file changed after a commit: by how many commits, the dates of the first and the last (None when only
    the checkout changed it), and whether the checkout changes it now."""
    file: str
    commits: int
    first: str | None
    last: str | None
    uncommitted: bool


@dataclass(frozen=True)
class SetupChanges:
    """The files changed after commit `since`, up to `head`; head and files None outside a git checkout, or for a
    commit it does not hold."""
    since: str
    head: str | None
    files: tuple[FileChange, ...] | None

    def to_json(self) -> dict:
        return {"since": self.since, "head": self.head,
                "files": None if self.files is None else [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, raw: dict) -> SetupChanges:
        files = raw["files"]
        return cls(raw["since"], raw["head"], None if files is None else tuple(FileChange.from_json(f) for f in files))


@dataclass(frozen=True)
class Revision:
    """A result judged again by later rules: when, by which command, under which rules, and which setup files
    changed after the commit the result recorded (None where it recorded none)."""
    date: str
    command: str
    rules: Provenance
    setup_changes: SetupChanges | None

    def to_json(self) -> dict:
        return {"date": self.date, "command": self.command, "rules": self.rules.to_json(),
                "setup_changes": None if self.setup_changes is None else self.setup_changes.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> Revision:
        changes = raw["setup_changes"]
        return cls(raw["date"], raw["command"], Provenance.from_json(raw["rules"]),
                   None if changes is None else SetupChanges.from_json(changes))


def provenance(files) -> Provenance:
    """The Provenance of the paths `files` (relative to the checkout)."""
    root, files = checkout_root(), tuple(files)
    try:
        commit = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%H %cI", "--", *files],
                                capture_output=True, text=True, timeout=30, check=True).stdout.split()
        changed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", *files],
                                 capture_output=True, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return Provenance(files, None, None, None)
    return Provenance(files, commit[0] if commit else None, commit[1] if len(commit) > 1 else None, changed)


def changes_since(commit: str, files) -> SetupChanges:
    """Each of the paths `files` that a commit after `commit` up to HEAD changed, or that the checkout changes
    now."""
    root, files = checkout_root(), list(files)

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        changed = []
        for file in files:
            dates = git("log", "--format=%cI", f"{commit}..HEAD", "--", file).split()
            uncommitted = bool(git("diff", "--name-only", "HEAD", "--", file).strip())
            if dates or uncommitted:
                changed.append(FileChange(file, len(dates), dates[-1] if dates else None, dates[0] if dates else None,
                                          uncommitted))
    except (OSError, subprocess.SubprocessError):
        return SetupChanges(commit, None, None)
    return SetupChanges(commit, head, tuple(changed))


def describe_changes(changed) -> str:
    """FileChanges in words: "`file` (2 commits, 2026-12-01 to 2026-12-05, and uncommitted changes); ..."."""
    def when(f: FileChange) -> str:
        if not f.commits:
            return "uncommitted changes"
        first, last = f.first[:10], f.last[:10]
        return (f"{f.commits} commit{'s' if f.commits != 1 else ''}, "
                + (first if first == last else f"{first} to {last}")
                + (", and uncommitted changes" if f.uncommitted else ""))
    return "; ".join(f"`{f.file}` ({when(f)})" for f in changed)
