"""Shared fixtures. Expensive ones (real models, reference implementations) are session-scoped: load once."""

import numpy as np
import pytest

import reffuse
from reffuse.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny64():
    """The synthetic tiny model in float64 (reference precision)."""
    return reffuse.cast(build_tiny(), "float64")


@pytest.fixture(scope="session")
def tiny32():
    return build_tiny()


@pytest.fixture
def tiny_ids():
    return np.random.default_rng(1).integers(0, 256, 24)
