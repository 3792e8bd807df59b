"""A decode-latency model: why fewer, wider FFN layers decode faster under tensor parallelism (the paper's §3,
"Efficiency motivation", and App. E).

A teaching model, not a simulator. Every term is a line of arithmetic and every number has a stated source.

For one forward pass of `tokens` new tokens per sequence (decode: tokens = 1) over a KV cache of `context`
positions, at tensor-parallel degree N, each GPU (or CPU rank) spends, per sub-block (attention or FFN):

    time = max(FLOPs / peak_flops, bytes / memory_bandwidth)      the roofline of the sub-block's work
         + kernels × kernel_overhead                               launch gaps, ramp-up and tail of each kernel

and, after every row-parallel layer (o_proj, down_proj), one ring all-reduce of the [tokens, d] activations:

    allreduce = 2 (N - 1) · alpha + 2 (N - 1) / N · bytes / link_bandwidth        (alpha-beta model of a ring)

    FLOPs   2 · weights per GPU · tokens (one multiply-add per weight per token), plus attention's
            2 · 2 · heads per GPU · head_dim · keys read per query (q·k and p·v)
    bytes   the weights per GPU (each read once per forward), plus the KV cache read by attention:
            2 (K and V) · kv heads per GPU · head_dim · context · bytes per element

Under Megatron tensor parallelism the weights and FLOPs of every attention and FFN divide by N, so the time a
GPU spends on them shrinks as 1/N, while the number of all-reduces stays: 2 per block with attention and an FFN,
1 per FFN-only block, 1 per fused FFN group. FFN Fusion turns a run of k attention-free blocks into one wide
FFN: the same weights and FLOPs, k - 1 fewer all-reduces and k - 1 fewer FFNs' kernels. At batch 1 decode is
memory-bound (about 1 FLOP per weight byte read, far below any machine's FLOP/byte ratio), so what fusion saves
is the per-layer fixed cost, and that saving grows with N because the weight time it sits beside shrinks as 1/N.

Assumptions, named because each one is wrong somewhere:
- Weights are read from memory once per forward; caches hold nothing between layers (true at 100s of GB).
- Activations, norms, residual adds and the embedding lookup move negligible bytes at decode and are left out
  of the roofline; their kernels are counted in the overhead.
- The roofline is applied per sub-block, as if each were one kernel at full bandwidth or full FLOP rate.
- Every kernel, all-reduces included, costs the same fixed `kernel_overhead` on top of its roofline time.
- The all-reduce is a ring: 2 (N - 1) steps of alpha each. Nothing overlaps communication with compute.
- Tensor-parallel degree N divides the query heads and every FFN width; key/value heads are split when N
  divides them and replicated when they divide N (as reffuse.tp and vLLM do).

Hardware presets: "h100-sxm" and "h100-sxm-bf16" (public specifications, cited below) and "cpu", this machine,
calibrated by a short measurement (`calibrate_cpu`). Model layouts: "tiny", "smollm2", "llama-3.1-405b",
"ultra-253b-prefusion", "ultra-253b-fused", or any reffuse Model (`layout_from_model`).

The package reads in that order: `latency` (the equations above), `hardware` (the presets and their sources),
`calibration` (this machine), `presets` (model layouts), `paper` (Table 2), `tp_runs` (this machine's runs),
`report` (what `reffuse costmodel` prints).
"""

from reffuse.speed.costmodel.calibration import (HARDWARE_PRESETS, calibrate_cpu, get_hardware, measure_mpi_allreduce,
                                                 mpiexec_path)
from reffuse.speed.costmodel.hardware import (H100_SOURCES, NUMPY_CALLS, PRECISION_BYTES, Calibration, Hardware,
                                              HardwareRecord, MpiAllreduce, cpu_hardware, h100_sxm)
from reffuse.speed.costmodel.latency import (Cost, CostSummary, Projection, allgather_seconds, allreduce_count,
                                             allreduce_seconds, check_tensor_parallel, cost_summary, decode_projection,
                                             forward_cost, parameter_count, tensor_parallel_degrees)
from reffuse.speed.costmodel.paper import (LEFT_OUT, PAPER_TABLE2, PAPER_TP, PaperComparison, PaperGrid, SensitivityRow,
                                           paper_comparison, paper_grid, paper_sensitivity)
from reffuse.speed.costmodel.presets import (MODEL_PRESETS, ULTRA_FUSED_MULTS, ULTRA_FUSION_GROUPS, ULTRA_GROUP_MULTS,
                                             deci_ffn_width, default_fusion_groups, get_layout, layout_from_model,
                                             llama_405b_layout, smollm2_layout, tiny_layout, ultra_fused_layout,
                                             ultra_prefusion_layout)
from reffuse.speed.costmodel.tp_runs import TpRunPrediction, predict_tp_run, tp_run_layout
from reffuse.core.layout import BlockLayout, Layout, fuse_layout

__all__ = ["HARDWARE_PRESETS", "calibrate_cpu", "get_hardware", "measure_mpi_allreduce", "mpiexec_path",
           "H100_SOURCES", "NUMPY_CALLS", "PRECISION_BYTES", "Calibration", "Hardware", "HardwareRecord",
           "MpiAllreduce", "cpu_hardware", "h100_sxm",
           "Cost", "CostSummary", "Projection", "allgather_seconds", "allreduce_count", "allreduce_seconds",
           "check_tensor_parallel", "cost_summary", "decode_projection", "forward_cost", "parameter_count",
           "tensor_parallel_degrees",
           "LEFT_OUT", "PAPER_TABLE2", "PAPER_TP", "PaperComparison", "PaperGrid", "SensitivityRow", "paper_comparison",
           "paper_grid", "paper_sensitivity",
           "MODEL_PRESETS", "ULTRA_FUSED_MULTS", "ULTRA_FUSION_GROUPS", "ULTRA_GROUP_MULTS", "deci_ffn_width",
           "default_fusion_groups", "get_layout", "layout_from_model", "llama_405b_layout", "smollm2_layout",
           "tiny_layout", "ultra_fused_layout", "ultra_prefusion_layout",
           "TpRunPrediction", "predict_tp_run", "tp_run_layout",
           "BlockLayout", "Layout", "fuse_layout"]
