"""NumPy/CuPy switch. GPU tests run only where CuPy sees a usable CUDA device."""

import numpy as np
import pytest

import reffuse
from reffuse.core.backend import array_module, device_of, gpu_available, to_numpy
from reffuse.errors import ReffuseError
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import forward

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no usable GPU (CuPy missing or no CUDA device)")


def test_cpu_arrays_stay_numpy():
    x = np.ones(3)
    assert array_module(x) is np and device_of(x) == "cpu" and to_numpy(x) is x


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error(tiny32):
    with pytest.raises(ReffuseError, match="no GPU is usable"):
        reffuse.to_device(tiny32, "gpu")


def test_unknown_device(tiny32):
    with pytest.raises(ReffuseError, match="unknown device 'tpu'"):
        reffuse.to_device(tiny32, "tpu")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_forward_and_fusion_match_cpu(dtype, tiny_ids):
    cpu = reffuse.load_model("tiny", dtype=dtype)
    gpu = reffuse.to_device(cpu, "gpu")
    assert device_of(gpu.embed).startswith("gpu")
    # GPU GEMMs sum in another order than OpenBLAS; 1e-5 (float32) / 1e-12 (float64) of the logit scale
    # covers that reordering, as in the CPU fused-vs-parallel tests.
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    for model_cpu, model_gpu in [(cpu, gpu), (reffuse.fuse(cpu, [(4, 8)]), reffuse.fuse(gpu, [(4, 8)]))]:
        expected = forward(model_cpu, tiny_ids)
        got = to_numpy(forward(model_gpu, tiny_ids))
        assert np.max(np.abs(got - expected)) <= tolerance * np.max(np.abs(expected))


@needs_gpu
def test_gpu_kv_cache_equals_full_recomputation(tiny_ids):
    gpu = reffuse.to_device(reffuse.load_model("tiny"), "gpu")
    full = to_numpy(forward(gpu, tiny_ids))
    cache = KVCache(gpu, len(tiny_ids))
    steps = [to_numpy(forward(gpu, tiny_ids[:8], cache=cache))]
    steps += [to_numpy(forward(gpu, tiny_ids[t:t + 1], cache=cache)) for t in range(8, len(tiny_ids))]
    assert np.max(np.abs(np.concatenate(steps) - full)) <= 1e-5 * np.max(np.abs(full))
