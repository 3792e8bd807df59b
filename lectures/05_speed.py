# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lecture 05 — Speed: why fewer, wider FFNs run faster
#
# Fusion does not change the arithmetic: the fused FFN multiplies by exactly the same weights as the $k$ FFNs it
# replaces, so the FLOPs and the bytes of weights read are identical. What changes is *how* the work is issued —
# one wide GEMM per projection instead of $k$ narrow ones — and, under tensor parallelism, one all-reduce instead
# of $k$ (lecture 06). This lecture asks where that matters:
#
# 1. the **roofline** of this machine, measured in a few seconds: when is an FFN limited by memory bandwidth and
#    when by arithmetic?
# 2. the **fused-FFN microbenchmark**: a run of 8 SmolLM2-sized FFNs, sequential vs fused, at 1 to 512 tokens;
# 3. **model decode speed** of reffuse on SmolLM2, with transformers and llama.cpp beside it and the machine's bound;
# 4. **reffuse's fast kernels**: why they are faster than the plain forward pass of lecture 01, and why they
#    compute the same;
# 5. the **latency model at the paper's scale**: Llama-405B → 253B PreFusion → fused on 8 H100s, beside the
#    paper's Table 2;
# 6. **GPU numbers**, where they have been recorded.
#
# Timing is slow and noisy on a shared 2-core machine, so apart from the short machine calibration this lecture
# reads the committed benchmark results (`benchmarks/results/`, written by `reffuse bench` and
# `reffuse costmodel`, with their commands) instead of measuring again. The exercises show how to re-measure.
# Runs in a few seconds.

# %%
import json

import numpy as np

import reffuse
from reffuse.core.model import plain
from reffuse.speed import costmodel
from reffuse.plots import pyplot, show
from reffuse.plots.costmodel import tp_projection_figure
from reffuse.speed.bench_result import BenchResult
from reffuse.speed.costmodel.report import CostmodelReport
from reffuse.speed.environment import describe_blas
from reffuse.speed.timing import ratio_text

RESULTS = reffuse.checkout_root() / "benchmarks" / "results"
plt = pyplot()




# %% [markdown]
# ## 1. The roofline of this machine
#
# A kernel that performs $F$ floating-point operations and moves $B$ bytes takes at least
# $\max(F / P, B / W)$ seconds on a machine with peak arithmetic rate $P$ and memory bandwidth $W$. Its
# **arithmetic intensity** $F/B$ decides which bound binds: below the *ridge point* $P/W$ it is memory-bound,
# above it compute-bound. `reffuse.speed.costmodel.calibrate_cpu` measures $P$ (a 1024² GEMM), $W$ (a decode-shaped
# GEMV over 128 MB of weights, beyond the caches) and the fixed cost of one NumPy call:

# %%
cpu = costmodel.calibrate_cpu(mpi=False)               # about 3 seconds
cal = cpu.calibration
P, W = cal.gemm_flops_all_threads, cal.gemv_bandwidth_all_threads
print(f"{cal.cores} cores, load average {cal.load_average:.1f} while measuring")
print(f"peak float32 GEMM   P = {P / 1e9:6.1f} GFLOP/s (1 thread: {cal.gemm_flops_1_thread / 1e9:.1f})")
print(f"memory bandwidth    W = {W / 1e9:6.1f} GB/s")
print(f"ridge point       P/W = {P / W:6.1f} FLOP/byte")
print(f"one NumPy call        = {1e6 * cal.numpy_call_seconds:6.2f} µs")

# %% [markdown]
# For one SwiGLU FFN of width $d_h$ on $T$ tokens in float32: $F = 2 \cdot 3\, d\, d_h\, T$ (three projections,
# a multiply and an add per weight per token) and $B \approx 4 \cdot 3\, d\, d_h$ (every weight read once) plus
# the activations. So the intensity is about $T/2$ FLOP/byte: **at decode ($T = 1$) an FFN is deeply
# memory-bound**, and it only becomes compute-bound past $T \approx 2P/W$ tokens. A run of $k$ FFNs, fused or
# not, has $k$ times the FLOPs and $k$ times the bytes — *the same point on the roofline*. Fusion cannot move it;
# what it removes is the per-kernel overhead (here: NumPy calls; on a GPU: kernel launches and partly-filled
# waves) and, under tensor parallelism, synchronisation.

# %%
d, dh, k = 576, 1536, 8                                  # SmolLM2's FFN, a run of 8 as in the microbenchmark
tokens = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
flops = 2 * 3 * d * dh * tokens * k
weight_bytes = 4 * 3 * d * dh * k
activation_bytes = 4 * tokens * (2 * d + 3 * dh) * k
intensity = flops / (weight_bytes + activation_bytes)
roofline_seconds = np.maximum(flops / P, (weight_bytes + activation_bytes) / W)

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
x = np.logspace(-1, 3, 200)
left.loglog(x, np.minimum(P, W * x) / 1e9, color="black", label="roofline min(P, W·I)")
left.loglog(intensity, flops / roofline_seconds / 1e9, "o", color="tab:orange", label="8 SmolLM2 FFNs, T tokens")
for t, i, f in zip(tokens, intensity, flops / roofline_seconds / 1e9):
    if t in (1, 16, 128, 512):
        left.annotate(f"T={t}", (i, f), textcoords="offset points", xytext=(4, -10), fontsize=7)
left.axvline(P / W, linestyle=":", color="gray", label=f"ridge point {P / W:.1f} FLOP/byte")
left.set_xlabel("arithmetic intensity (FLOP/byte)")
left.set_ylabel("attainable GFLOP/s")
left.set_title("Roofline of this machine (measured now)")
left.legend(fontsize=7)
right.loglog(tokens, 1e3 * roofline_seconds, "o-", color="tab:orange", label="roofline bound")
right.set_xlabel("tokens T")
right.set_ylabel("time of the 8-FFN run (ms)")
right.set_title("Roofline time: the same for sequential and fused")
right.legend(fontsize=7)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 2. The fused-FFN microbenchmark
#
# `reffuse bench` times a run of 8 SmolLM2 FFNs as attention-free blocks, sequential (eq. 4, block by block: norm,
# three projections, residual add, eight times) against one fused wide SwiGLU, at 1, 16, 128 and 512 tokens,
# timed in alternation, medians after warm-up. We read the committed result (the command is in the Markdown file
# beside it) and put it on the roofline:

# %%
bench = BenchResult.from_json(json.loads((RESULTS / "bench_smollm2.json").read_text()))
run = bench.ffn_run
print(f"{run.blocks} FFNs of width {sorted(set(run.widths))} -> one of width {run.fused_width}; "
      f"{bench.environment.threads} threads, numpy {bench.environment.numpy}")
print(f"{'tokens':>6s} {'sequential ms':>13s} {'fused ms':>9s} {'seq/fused (95% interval)':>25s} "
      f"{'roofline ms (now)':>17s}")
for row in sorted(run.rows, key=lambda r: r.tokens):
    bound = np.interp(row.tokens, tokens, roofline_seconds)
    speedup = ratio_text(row.speedup, row.speedup_interval_95)
    print(f"{row.tokens:6d} {1e3 * row.sequential:13.3f} {1e3 * row.fused:9.3f} {speedup:>25s} "
          f"{1e3 * bound:17.3f}")

# %% [markdown]
# Read the ratio column: the median of the repeats' paired ratios, with the 95% interval of that median. At 1
# token the run is memory-bound and tiny: the weights are read once either way, and
# what fusion saves is the fixed work per block — 8 RMSNorms, 8 residual adds and 24 small matrix products
# become 1, 1 and 3 — which is a large part of a sub-millisecond run. At many tokens both are compute-bound
# and do the same FLOPs, so the ratio tends to 1; a naive fused GEMM even loses there, because its wide
# intermediate `[T, 8·1536]` falls out of cache, which is why reffuse's fast kernels compute wide SwiGLUs in
# cache-sized column blocks (section 4). The measured times sit above the roofline bound: the bound ignores every
# fixed cost, and the roofline here was measured *now*, the benchmark on another day.
#
# ## 3. Model decode speed, against two other engines and the machine's bound
#
# The same benchmark decodes 32 tokens greedily with the KV cache, in reffuse, in transformers and in llama.cpp
# (the model exported as an F32 GGUF: the same weights, the same precision), taking turns in every repeat. It
# also measures the bound: a decode step at batch 1 must read every weight once, about 540 MB in float32, so it
# cannot be faster than those bytes over the streaming rate NumPy reaches on this machine. Every ratio is the
# median of the repeats' paired ratios, with the 95% bootstrap interval of that median; a target is met when the
# intervals lie on its side, not met when one lies wholly on the other, and unresolved in between. The first line
# printed says which BLAS kernels ran: OpenBLAS picks them for the CPU unless the environment pins them
# (`OPENBLAS_CORETYPE`), as some machines do to work around older OpenBLAS builds; a run under an AVX2 pin is
# committed beside this one (`benchmarks/results/bench_smollm2_haswell.md`), and there prefill at 512 tokens
# comes out at 0.79x transformers' time with an interval that holds the 0.8x target.

# %%
print(f"BLAS: {describe_blas(bench.environment)}")
decode, prefill, bound = bench.decode, bench.prefill, bench.bound
print(f"the bound: {bound.weight_bytes / 1e6:.0f} MB at {bound.bytes_per_second / 1e9:.1f} GB/s, "
      f"at most {bound.tokens_per_second:.1f} tokens/s")
for engine, fraction in bound.fractions.items():
    print(f"  {engine:12s} {fraction * bound.tokens_per_second:6.1f} tokens/s = {fraction:4.0%} of the bound")
print(f"reffuse / transformers {ratio_text(decode.speedup, decode.speedup_interval_95)}, reffuse / llama.cpp "
      f"{ratio_text(decode.fraction_of_llamacpp, decode.fraction_of_llamacpp_interval_95)}"
      f"; same greedy tokens as transformers: {decode.same_greedy_tokens}")
for row in prefill:
    print(f"prefill {row.tokens:3d} tokens: reffuse {1e3 * row.reffuse_seconds:6.1f} ms = "
          f"{ratio_text(row.time_ratio, row.time_ratio_interval_95)} transformers' time, "
          f"{ratio_text(row.llamacpp_time_ratio, row.llamacpp_time_ratio_interval_95)} llama.cpp's")
width = max(len(check.target) for check in bench.targets)
for check in bench.targets:
    print(f"target: {check.target:{width}s}  measured {check.measured:.2f}  {check.verdict}")

engines = list(bound.fractions)
fig, ax = plt.subplots(figsize=(5.5, 2.8))
ax.barh(engines, [bound.fractions[e] * bound.tokens_per_second for e in engines], color="tab:blue")
ax.axvline(bound.tokens_per_second, color="black", linestyle=":", label="the bound: every weight read once")
ax.set_xlabel("decode tokens/s (SmolLM2, float32, 2 threads)")
ax.invert_yaxis()
ax.legend(fontsize=7, loc="lower right")
fig.tight_layout()
show(fig)

# %% [markdown]
# reffuse is NumPy calling BLAS, yet it decodes faster than transformers: both stream the same weights, and what
# separates them is the fixed cost around each product. llama.cpp, compiled kernels with no interpreter between
# them, comes closest to the bound. That is the regime the paper is in at batch 1 on a GPU, 1000 times larger and
# 1000 times faster.

# %% [markdown]
# ## 4. reffuse's fast kernels: faster, and equal
#
# Lecture 01 stepped through the plain forward pass: `reffuse.core.model`'s `attention` and `swiglu` and
# `reffuse.core.rope`'s `rope_tables`, the equations as written, on which `reffuse.core.model.plain(model)` puts
# a model. The models `reffuse.load_model` returns compute on `reffuse.core.fast.FAST` instead: the same
# arithmetic arranged for speed, one replacement for each plain function.
#
# | plain | fast | what is arranged |
# |---|---|---|
# | `attention` | `attention_stacked` | q, k and v read the same input, so they are held as one array (`StackedAttention`, whose `q`, `k`, `v` are views of it) and computed in one product: Theorem 3.1's concatenation (lecture 02) applied to the input projections of one attention. Prefill queries go in blocks that skip the masked half of the scores, and the softmax is divided after its product with v. |
# | `swiglu` | `swiglu_in_cache` | past the cache's size, the hidden units in column blocks, so that a wide FFN's `[T, dh]` intermediate stays in cache: each block of units is an FFN of its own, as in Theorem 3.1's proof |
# | `rope_tables` | `rope_rows` | rows cut from tables made once, instead of cos and sin computed at every step |
# | | `gathered` | every weight in one allocation, on huge pages |
#
# **Why equal.** No multiplication changes. What changes is which products are issued together, the order in
# which sums are added, and products skipped because a zero softmax weight multiplies them. So each fast kernel
# equals its plain function bit for bit where the operations are the same, and to float32 rounding where a sum
# runs in another order (`tests/core/test_fast_paths.py` checks each). The whole model, fast against plain:

# %%
model = reffuse.load_model("smollm2")                     # on FAST
ids = np.arange(1000, 1064)                                # 64 token ids; any will do
fast_logits = reffuse.forward(model, ids)
plain_logits = reffuse.forward(plain(model), ids)
print(f"{model.kernels.name} against {plain(model).kernels.name}: max |difference| of the logits "
      f"{np.abs(fast_logits - plain_logits).max():.1e}, largest logit {np.abs(plain_logits).max():.1f}")

# %% [markdown]
# **Why faster.** A decode step is memory-bound (section 1): every arrangement reads the same weights, so what the
# fast kernels can save is the fixed cost around the products, and at long prefills the masked half of the
# scores. `benchmarks/profile/profile_smollm2.py` times every part of the forward pass both ways; its committed
# result, ratios of times with their 95% intervals:

# %%
profile = json.loads((RESULTS / "profile_smollm2" / "profile.json").read_text())
print(f"BLAS: {profile['blas']}")
for regime, label in (("decode", "decode step"), ("prefill_64", "prefill, 64"), ("prefill_512", "prefill, 512")):
    ratio_of_times = profile["fast_over_plain_time"][regime]   # whole forward passes, plain and fast alternated
    print(f"{label:12s} fast / plain {ratio_text(ratio_of_times['median'], ratio_of_times['interval_95'])}")
for row in profile["stacking"]["rows"]:
    print(f"{row['products']:18s} {row['tokens']:3d} tokens: stacked / separate "
          f"{ratio_text(row['stacked_over_separate_time'], row['stacked_over_separate_interval_95'])}")
arena = profile["arena"]["arena_over_separate_time"]
print(f"weights in one allocation against separate arrays: decode step {ratio_text(arena['median'], arena['interval_95'])}")

# %% [markdown]
# Stacking pays where a product is small: k and v have 192 rows each, and every product has a fixed cost, so q, k
# and v in one product take less time at one token than three. Gate and up are two products of 1536 rows that
# already stream at the machine's rate; stacked, they take no less time, so the fast FFN keeps two. The whole
# forward pass gains a little at most: the weights are read once either way, which is the bound of section 3.
# `benchmarks/results/profile_smollm2/profile.md` has every part's time.
#
# ## 5. The latency model at the paper's scale
#
# The paper measures single-user decode of Llama-3.1-405B, its 253B PreFusion descendant (half the attention
# removed by Puzzle) and the fused Ultra-253B on one node of 8 H100s at TP8 (Table 2). `reffuse.speed.costmodel` puts
# the same three layouts through a per-layer roofline with a fixed cost per kernel and an alpha-beta ring
# all-reduce after every row-parallel layer — every number sourced or named in `reffuse/speed/costmodel/`:

# %%
comparison = costmodel.paper_comparison()
print(f"TP{comparison.tp}, {comparison.hardware} ({comparison.precision}), context {comparison.context}")
print(f"{'model':22s} {'projected tok/s':>15s} {'paper tok/s':>11s} {'projected x':>11s} {'paper x':>8s}")
for row in comparison.rows:
    print(f"{row.model:22s} {row.projected.tokens_per_second:15.1f} {row.paper_tokens_per_second:11.2f} "
          f"{row.projected_speedup:11.3f} {row.paper_speedup:8.3f}")
print(f"fusion alone (fused / PreFusion): projected {comparison.fusion_alone.projected:.3f}, "
      f"paper {comparison.fusion_alone.paper:.3f}")

# %% [markdown]
# The ratios are close to the paper's; the absolute tokens/s are optimistic, as a roofline must be (the model
# says what it leaves out: `comparison.left_out`). But three of its constants are chosen, not measured: the
# fixed cost of a kernel, the latency of one all-reduce ring step, and how much of the HBM bandwidth a real kernel
# reaches. `paper_grid` tries every combination over wide ranges and keeps those where the model stays what it
# claims to be, an upper bound (at least the paper's tokens/s for all three models). How much of the paper's
# fusion gain can fewer all-reduces and kernels explain, at most?

# %%
grid = costmodel.paper_grid().summary
low, high = grid.fusion_alone_range
print(f"{grid.admissible} of {grid.points} points keep the model an upper bound; over them fusion alone is "
      f"{low:.3f}x to {high:.3f}x, the paper's {grid.paper_fusion_alone:.3f}x: "
      f"at most {grid.explains_at_most:.0%} of its gain")

# %% [markdown]
# Where does a token's time go, and why does fusion gain
# more as TP grows? Each GPU's share of the weights shrinks as 1/N, while the number of all-reduces and kernels
# per token does not — so the fixed costs fusion removes become a larger part of the token:

# %%
prefusion = costmodel.get_layout("ultra-253b-prefusion")
projection = costmodel.decode_projection(prefusion, costmodel.get_hardware("h100-sxm"))
for row in projection.rows:
    seq, fus = row.sequential, row.fused
    print(f"TP{row.tp}: roofline {1e3 * seq.roofline_seconds:5.2f} ms, kernels "
          f"{1e3 * seq.kernel_overhead_seconds:5.2f} ms, all-reduce {1e3 * seq.allreduce_seconds:5.2f} ms "
          f"-> fused saves {1e3 * (seq.seconds - fus.seconds):4.2f} ms ({row.fusion_speedup:.3f}x)")

show(tp_projection_figure(CostmodelReport.from_json(json.loads((RESULTS / "costmodel.json").read_text()))))

# %% [markdown]
# ## 6. GPU numbers
#
# reffuse runs on a GPU with CuPy (`reffuse.to_device(model, "gpu")`), and `reffuse tp --device gpu` puts one rank
# per GPU. Results measured on a GPU are committed beside the CPU ones, with `"device"` naming the GPU. Those
# present in this checkout:

# %%
recorded = []
for path in sorted(RESULTS.glob("**/*.json")):
    result = json.loads(path.read_text())
    device = result.get("device") or result.get("environment", {}).get("device") if isinstance(result, dict) else None
    if isinstance(device, str) and device.startswith("gpu"):
        recorded.append((path, device))
for path, device in recorded:
    print(f"{path}: {device}")
if not recorded:
    print("none recorded in benchmarks/results/ yet: run `reffuse bench` or `mpiexec -n N reffuse tp --device gpu "
          "--json` on a machine with a GPU and commit the result")

# %% [markdown]
# ## Exercises
#
# 1. **Your own roofline point.** Time `x @ W.T` for `W` of shape [1536, 576] (float32) at T = 1 and T = 512
#    with `reffuse.speed.timing.median_seconds`, compute the attained GFLOP/s and GB/s, and place both on the roofline.
# 2. **The crossover.** From the calibration above, at how many tokens does one SmolLM2 FFN become
#    compute-bound on this machine? And an FFN of Llama-405B (d = 16384, d_h = 53248) on an H100 in FP8
#    (P = 1979 TFLOP/s, W = 3.35 TB/s)?
# 3. **Re-measure the microbenchmark.** Run `reffuse.speed.timing.time_ffn_run` on SmolLM2 with attention removed in
#    14–21 (`reffuse.method.removal.drop_attention`) for the group (14, 21) at 1 and 128 tokens. Compare your ratios with
#    the committed ones and explain any difference.
# 4. **Sensitivity.** `costmodel.paper_sensitivity()` moves one chosen number at a time. Which choice moves the
#    projected "fusion alone" ratio the most, and why that one? Which of its rows would `paper_grid` refuse?
# 5. **Bigger groups, higher TP.** With `costmodel.decode_projection`, project the fused/pre-fusion speedup of
#    Ultra-253B at TP8 for a context of 1024 and of 32768 tokens. Why does a long context shrink fusion's gain?
#
# Solutions: `lectures/solutions/05_solutions.py` (run it: `python lectures/solutions/05_solutions.py`).
