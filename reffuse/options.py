"""The options a command takes, as a dataclass the library reads: filled from the command's parsed arguments."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path


class FromArguments:
    """A dataclass whose fields are named as a command's flags (--max-group-size -> max_group_size)."""

    @classmethod
    def from_namespace(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def to_json(self) -> dict:
        """The options as a result records them: an absolute path written relative to the working folder, so that
        a result names no folder of the machine it ran on and reads the same wherever it is reproduced."""
        return {f.name: as_recorded(getattr(self, f.name)) for f in fields(self)}


def as_recorded(value):
    """An absolute path (str or Path) relative to the working folder, in / form; any other value as it is."""
    if not isinstance(value, (str, Path)) or not os.path.isabs(value):
        return value
    try:
        return Path(os.path.relpath(value)).as_posix()
    except ValueError:  # another drive (Windows): no relative form
        return str(value)
