"""Imports of optional dependencies, with an error that says which extra to install."""

import importlib

from reffuse.errors import ReffuseError


def require(module: str, extra: str, purpose: str):
    """Import `module`, or raise a ReffuseError saying `pip install 'reffuse[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReffuseError(f"{purpose} needs the Python package {module.split('.')[0]!r}: "
                           f"pip install 'reffuse[{extra}]'") from None
