"""Solutions to the exercises of lecture 05 (speed). Run: python lectures/solutions/05_solutions.py"""

import numpy as np

import reffuse
from reffuse.speed import costmodel
from reffuse import drop_attention
from reffuse.speed.timing import blas_threads, median_seconds, time_ffn_run

# 1. Attained rates of one projection: at T = 1 the time is the weight read (few GFLOP/s); at T = 512 the same
#    weights serve 512 tokens and the GEMM approaches the peak FLOP rate. Note: one [1536, 576] float32 weight
#    is 3.5 MB and stays in the CPU's cache when timed in a loop, so its GB/s at T = 1 can exceed the DRAM
#    bandwidth of the calibration (which streams 128 MB precisely to avoid that).
rng = np.random.default_rng(0)
weight = rng.standard_normal((1536, 576)).astype(np.float32)           # [dh, d]
for tokens in (1, 512):
    x = rng.standard_normal((tokens, 576)).astype(np.float32)
    seconds = median_seconds(lambda: x @ weight.T, repeats=9, warmup=2)
    flops, nbytes = 2 * tokens * weight.size, 4 * (weight.size + x.size + tokens * 1536)
    print(f"1. T={tokens:3d}: {flops / seconds / 1e9:6.1f} GFLOP/s, {nbytes / seconds / 1e9:6.1f} GB/s, "
          f"intensity {flops / nbytes:.2f} FLOP/byte")
    assert seconds > 0

# 2. Intensity of one FFN ≈ 6 d dh T / (bytes per weight · 3 d dh) = 2T / bytes_per_weight, so it crosses the
#    ridge point P/W at T = ridge · bytes_per_weight / 2.
cpu = costmodel.calibrate_cpu(mpi=False)
ridge_cpu = cpu.calibration.gemm_flops_all_threads / cpu.calibration.gemv_bandwidth_all_threads
h100 = costmodel.get_hardware("h100-sxm")
ridge_h100 = h100.peak_flops["fp8"] / h100.memory_bandwidth
print(f"2. this CPU (float32): compute-bound from T ≈ {ridge_cpu * 4 / 2:.0f} tokens; "
      f"H100 in FP8: from T ≈ {ridge_h100 * 1 / 2:.0f} tokens (ridge {ridge_h100:.0f} FLOP/byte)")
assert 200 < ridge_h100 * 1 / 2 < 400

# 3. Re-measuring the microbenchmark. On a busy shared machine the ratios can differ a lot from the committed
#    ones: other processes take the cores and the caches, so compare only within one run, medians of repeats.
model = drop_attention(reffuse.load_model("smollm2"), range(14, 22))
with blas_threads(None):
    for tokens in (1, 128):
        t = time_ffn_run(model, (14, 21), tokens, repeats=5)
        print(f"3. T={tokens:3d}: sequential {1e3 * t.sequential:.2f} ms, fused {1e3 * t.fused:.2f} ms, "
              f"sequential/fused {t.speedup:.2f}x")
        assert t.sequential > 0 and t.fused > 0

# 4. Fusion removes fixed costs (kernels, all-reduce steps) and leaves the roofline part unchanged, so the ratio
#    moves with the share of those fixed costs in a token: up with a larger kernel overhead or alpha, down with
#    anything that makes the roofline part larger — BF16 weights double the bytes read, which moves it most.
rows = costmodel.paper_sensitivity()
base = rows[0].fusion_alone
moves = {r.variant: r.fusion_alone - base for r in rows[1:]}
largest = max(moves, key=lambda v: abs(moves[v]))
for variant, move in moves.items():
    print(f"4. {variant:28s} fusion alone {base + move:.3f} ({move:+.3f})")
print(f"   largest move: {largest}")
assert moves["BF16 weights"] < 0 < moves["kernel overhead 6 us"]

# 5. A long context makes every attention read a large KV cache, which fusion does not touch: the part of the
#    token time that fusion saves (kernels, all-reduces) becomes a smaller share. Only slightly here: with GQA,
#    one kv head per GPU at TP8 and about 60 attention layers, 32768 positions add ~1 GB of reads per token
#    across the node, small beside the weights.
prefusion = costmodel.get_layout("ultra-253b-prefusion")
speedups = {}
for context in (1024, 32768):
    row = next(r for r in costmodel.decode_projection(prefusion, h100, degrees=[8], context=context).rows)
    speedups[context] = row.fusion_speedup
    print(f"5. TP8, context {context:5d}: fused / pre-fusion = {row.fusion_speedup:.3f}x")
assert speedups[32768] < speedups[1024]
