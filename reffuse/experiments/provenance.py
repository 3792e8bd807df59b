"""Which commit a result's code came from: for a set of files, the last commit that changed them and whether the
checkout holds changes to them since (then the run used code that no commit records); and, for a result made
earlier, which of the files changed after its recorded commit."""

from __future__ import annotations

import subprocess

from reffuse.files import checkout_root


def provenance(files) -> dict:
    """{"files", "commit", "committed_at", "uncommitted_changes"} for the paths `files` (relative to the
    checkout); outside a git checkout the last three are None."""
    root, files = checkout_root(), list(files)
    try:
        commit = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%H %cI", "--", *files],
                                capture_output=True, text=True, timeout=30, check=True).stdout.split()
        changed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", *files],
                                 capture_output=True, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return {"files": files, "commit": None, "committed_at": None, "uncommitted_changes": None}
    return {"files": files, "commit": commit[0] if commit else None,
            "committed_at": commit[1] if len(commit) > 1 else None, "uncommitted_changes": changed}


def changes_since(commit: str, files) -> dict:
    """{"since", "head", "files"} for the paths `files`: each one that a commit after `commit` up to HEAD changed,
    with the number of those commits and the dates of the first and the last, or that the checkout changes now
    ("uncommitted"); outside a git checkout, or for a commit it does not hold, "head" and "files" are None."""
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
                changed.append({"file": file, "commits": len(dates), "first": dates[-1] if dates else None,
                                "last": dates[0] if dates else None, "uncommitted": uncommitted})
    except (OSError, subprocess.SubprocessError):
        return {"since": commit, "head": None, "files": None}
    return {"since": commit, "head": head, "files": changed}


def describe_changes(changed: list[dict]) -> str:
    """changes_since's files in words: "`file` (2 commits, 2026-12-01 to 2026-12-05, and uncommitted changes); ..."."""
    def when(f: dict) -> str:
        if not f["commits"]:
            return "uncommitted changes"
        first, last = f["first"][:10], f["last"][:10]
        return (f"{f['commits']} commit{'s' if f['commits'] != 1 else ''}, "
                + (first if first == last else f"{first} to {last}")
                + (", and uncommitted changes" if f["uncommitted"] else ""))
    return "; ".join(f"`{f['file']}` ({when(f)})" for f in changed)
