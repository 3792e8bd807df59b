"""The options a command takes, as a dataclass the library reads: filled from the command's parsed arguments."""

from __future__ import annotations

from dataclasses import fields


class FromArguments:
    """A dataclass whose fields are named as a command's flags (--max-group-size -> max_group_size)."""

    @classmethod
    def from_namespace(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
