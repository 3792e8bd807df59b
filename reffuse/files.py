"""Reading the JSON files reffuse and others write, with one message for each way it can fail."""

from __future__ import annotations

import json
from pathlib import Path

from reffuse.errors import ReffuseError


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
