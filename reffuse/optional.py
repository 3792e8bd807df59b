"""Imports of optional dependencies, with an error that says which extra to install, and how."""

import importlib
import importlib.util
from pathlib import Path

from reffuse.errors import ReffuseError


def install_hint(extra: str) -> str:
    """The command that installs an extra for this install of reffuse: editable in a checkout, else from the
    package registry."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return f"pip install -e '{checkout}[{extra}]'"
    return f"pip install 'reffuse[{extra}]'"


def require(module: str, extra: str, purpose: str):
    """Import `module`, or raise a ReffuseError saying how to install the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReffuseError(f"{purpose} needs the Python package {module.split('.')[0]!r}: "
                           f"{install_hint(extra)}") from None


def available(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_all(modules, extra: str, purpose: str) -> None:
    """Refuse, before any download or long work, what needs packages that are missing (all named at once)."""
    missing = [m for m in modules if not available(m)]
    if missing:
        raise ReffuseError(f"{purpose} needs the Python package{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(map(repr, missing))}: {install_hint(extra)}")
