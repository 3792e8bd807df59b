"""Argument parsing and printing shared by the commands."""

from __future__ import annotations

import argparse
import json
import sys

from reffuse.errors import ReffuseError
from reffuse.core.layout import parse_layers


def parse_groups(text: str) -> list[tuple[int, int]]:
    """"14-17,18-20" -> [(14, 17), (18, 20)]: 0-based, inclusive block ranges."""
    groups = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, sep, last = part.partition("-")
        try:
            groups.append((int(first), int(last)))
        except ValueError:
            raise ReffuseError(f"group {part!r} is not a range FIRST-LAST of block indices (e.g. 4-8)") from None
        if not sep:
            raise ReffuseError(f"group {part!r} is not a range FIRST-LAST of block indices (e.g. 4-8)")
    return groups


def groups_argument(text: str) -> list[tuple[int, int]]:
    """parse_groups for argparse `type=`, so that a bad value is reported with its reason."""
    try:
        return parse_groups(text)
    except ReffuseError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def layers_argument(text: str) -> list[int]:
    """parse_layers for argparse `type=`: "14-21" or "3,5,14-21" -> block indices."""
    try:
        return parse_layers(text)
    except ReffuseError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float)
                                           else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")
