"""The GPU path, run on the strict CuPy stand-in (tests/support/strict_cupy): every result equals the NumPy
path's, nothing is copied to the host that need not be, and the stand-in catches what CuPy would refuse."""

import numpy as np
import pytest

import reffuse
from reffuse.core.backend import array_module, device_of, to_numpy
from reffuse.core.generate import generate
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import forward

# GPU and CPU differ only in the order of additions; here both are NumPy underneath, so they agree to rounding of
# the same order: the targets of the CPU tests (1e-12 float64, 1e-5 float32, of the largest logit)
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


def close(got, expected, dtype):
    expected = to_numpy(expected)
    return np.max(np.abs(to_numpy(got) - expected)) <= TOLERANCE[dtype] * np.max(np.abs(expected))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_fusion_and_the_kv_cache_on_the_device_equal_the_host(device, dtype, tiny_ids):
    cpu = reffuse.load_model("tiny", dtype=dtype)
    gpu = reffuse.to_device(cpu, "gpu")
    assert array_module(gpu.embed) is device and device_of(gpu.embed).startswith("gpu:")
    for norm in ("fold", "last"):
        fused_cpu, fused_gpu = reffuse.fuse(cpu, [(4, 8)], norm=norm), reffuse.fuse(gpu, [(4, 8)], norm=norm)
        assert array_module(fused_gpu.blocks[4].ffn.gate) is device
        assert close(forward(fused_gpu, tiny_ids), forward(fused_cpu, tiny_ids), dtype)
    cache = KVCache(gpu, len(tiny_ids))
    steps = [forward(gpu, tiny_ids[:8], cache=cache)] + [forward(gpu, tiny_ids[t:t + 1], cache=cache)
                                                        for t in range(8, len(tiny_ids))]
    assert close(np.concatenate([to_numpy(s) for s in steps]), forward(cpu, tiny_ids), dtype)


def test_generate_on_the_device_gives_the_hosts_tokens(device):
    cpu = reffuse.load_model("tiny")
    gpu = reffuse.to_device(cpu, "gpu")
    for kwargs in ({}, {"temperature": 0.8, "top_k": 20, "seed": 3}):
        assert generate(gpu, [1, 2, 3], 12, **kwargs) == generate(cpu, [1, 2, 3], 12, **kwargs)


def test_a_decode_step_copies_only_the_sampled_token_to_the_host(strict_device):
    device = strict_device
    gpu = reffuse.to_device(reffuse.load_model("tiny"), "gpu")
    device.reset()
    generate(gpu, [1, 2, 3], 9, temperature=0.8, seed=1)
    assert device.stats["to_host"] == 9                # one sampled token per step
    assert device.stats["to_host_bytes"] <= 9 * 8      # and nothing else: not the logits


def test_the_stand_in_refuses_an_implicit_host_copy_and_mixed_arrays(strict_device):
    device = strict_device
    x = device.asarray(np.ones(3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="mixed with a device array"):
        x + np.ones(3)
    assert (x + 1).get().tolist() == [2, 2, 2]
