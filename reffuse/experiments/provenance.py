"""Which commit a result's code came from: for a set of files, the last commit that changed them and whether the
checkout holds changes to them since (then the run used code that no commit records)."""

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
