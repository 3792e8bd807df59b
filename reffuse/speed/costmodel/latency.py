"""The latency equations of the cost model (the package docstring states them and their assumptions)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from reffuse.core.layout import Layout, fuse_layout, sharding_problems
from reffuse.errors import ReffuseError
from reffuse.records import as_tuple, present_fields
from reffuse.speed.costmodel.hardware import Hardware


def parameter_count(layout: Layout) -> int:
    """Weights in the model: attention and FFN sub-blocks, embedding and LM head (norm gains, ~1e-5 of it, left out)."""
    attention = sum(b.attention for b in layout.blocks) * layout.attention_weights()
    ffn = sum(3 * layout.dim * b.ffn_width for b in layout.blocks)           # gate, up [w, d] and down [d, w]
    embeddings = layout.vocab_size * layout.dim * (1 if layout.tie_embeddings else 2)
    return attention + ffn + embeddings


def allreduce_count(layout: Layout, tp: int) -> int:
    """All-reduces per forward pass at tensor-parallel degree tp: one after each row-parallel layer
    (o_proj of every attention, down_proj of every FFN, fused or not); none at tp = 1."""
    if tp == 1:
        return 0
    return sum(b.attention for b in layout.blocks) + sum(b.ffn_width > 0 for b in layout.blocks)


def tensor_parallel_degrees(layout: Layout, up_to: int = 8) -> list[int]:
    """The degrees 1..up_to over which the layout (and its fused variant) can be split."""
    fused = fuse_layout(layout) if layout.fusion_groups else layout
    return [n for n in range(1, up_to + 1)
            if not sharding_problems(layout, n) and not sharding_problems(fused, n)]


def check_tensor_parallel(layout: Layout, tp: int) -> None:
    problems = sharding_problems(layout, tp)
    if problems:
        raise ReffuseError(f"{layout.name} cannot be split over TP={tp}: {'; '.join(problems)}. Degrees up to 64 "
                           f"that work: {', '.join(map(str, tensor_parallel_degrees(layout, 64)))}")


# ---------------------------------------------------------------------------------------------------------------
# The model itself


def allreduce_seconds(hw: Hardware, tp: int, nbytes: float) -> float:
    """Ring all-reduce of nbytes over tp devices: 2 (N-1) steps, each alpha plus nbytes/N over the link."""
    if tp == 1:
        return 0.0
    if hw.allreduce_alpha is None or hw.link_bandwidth is None:
        raise ReffuseError(f"{hw.name} has no all-reduce calibration (MPI was not measured), so TP={tp} cannot be "
                           "predicted: install the `mpi` extra so that calibration can time `mpiexec -n 2`")
    return 2 * (tp - 1) * hw.allreduce_alpha + 2 * (tp - 1) / tp * nbytes / hw.link_bandwidth


def allgather_seconds(hw: Hardware, tp: int, nbytes: float) -> float:
    """Ring all-gather of nbytes in total (nbytes/N from each device): N-1 steps."""
    if tp == 1:
        return 0.0
    return (tp - 1) * hw.allreduce_alpha + (tp - 1) / tp * nbytes / hw.link_bandwidth


@dataclass
class Cost:
    """Seconds and work of one forward pass on one device, by where the time goes."""
    roofline: float = 0.0       # Σ over sub-blocks of max(FLOPs / peak, bytes / bandwidth)
    overhead: float = 0.0       # kernels × kernel_overhead
    allreduce: float = 0.0      # all-reduces (and the LM head's all-gather), alpha-beta
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    allreduces: int = 0
    memory_bound_seconds: float = 0.0   # the part of `roofline` where bytes, not FLOPs, set the time
    weight_bytes: float = 0.0           # weights one device holds (for the memory-capacity check)
    parts: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.roofline + self.overhead + self.allreduce

    @property
    def collective_seconds(self) -> float:
        """The all-reduces and all-gather with their kernel launches: what a run's timer around them measures."""
        return self.parts["allreduce"]


def _add(cost: Cost, hw: Hardware, part: str, flops: float, nbytes: float, kernels: int) -> None:
    """One sub-block: roofline time plus kernel overhead."""
    compute, memory = flops / hw.peak_flops[hw.precision], nbytes / hw.memory_bandwidth
    seconds = max(compute, memory) + kernels * hw.kernel_overhead
    cost.roofline += max(compute, memory)
    cost.memory_bound_seconds += memory if memory >= compute else 0.0
    cost.overhead += kernels * hw.kernel_overhead
    cost.flops += flops
    cost.bytes += nbytes
    cost.kernels += kernels
    cost.parts[part] = cost.parts.get(part, 0.0) + seconds


def forward_cost(layout: Layout, hw: Hardware, tp: int = 1, tokens: int = 1, context: float = 0,
                 batch: int = 1, threads: int | None = None) -> Cost:
    """Predicted cost on one device of one forward pass of `tokens` new tokens for each of `batch` sequences,
    after `context` cached positions, at tensor-parallel degree tp. Decode is tokens=1.
    threads: BLAS threads per rank, where ranks share a CPU (see Hardware.for_ranks)."""
    check_tensor_parallel(layout, tp)
    if tokens < 1 or batch < 1 or context < 0:
        raise ReffuseError(f"tokens ({tokens}) and batch ({batch}) must be >= 1 and context ({context}) >= 0")
    hw = hw.for_ranks(tp, threads)
    wb, ab = hw.weight_bytes, hw.activation_bytes
    rows = tokens * batch                                           # rows of every activation matrix [rows, d]
    d, hd = layout.dim, layout.head_dim
    q_heads = layout.n_heads // tp
    kv_heads = layout.n_kv_heads // tp if layout.n_kv_heads >= tp else 1   # replicated when N > kv heads
    attention_weights = d * hd * (2 * q_heads + 2 * kv_heads)       # q, o [d, H/N·hd]; k, v [d, Hkv/N·hd]
    keys = context + (tokens + 1) / 2                               # mean keys a causal query reads
    cost = Cost()
    activation_bytes = rows * d * ab                                # one all-reduce sums [rows, d]
    for block in layout.blocks:
        if block.attention:
            kv_read = batch * 2 * kv_heads * hd * (context + tokens) * ab
            flops = 2 * attention_weights * rows + batch * tokens * 2 * 2 * q_heads * hd * keys
            _add(cost, hw, "attention", flops, attention_weights * wb + kv_read, hw.kernels["attention"])
            cost.weight_bytes += attention_weights * wb
        if block.ffn_width:
            ffn_weights = 3 * d * block.ffn_width // tp                # gate, up [w/N, d]; down [d, w/N]
            _add(cost, hw, "ffn", 2 * ffn_weights * rows, ffn_weights * wb, hw.kernels["ffn"])
            cost.weight_bytes += ffn_weights * wb
    head_weights = layout.vocab_size * d // (tp if hw.lm_head_vocab_parallel else 1)
    _add(cost, hw, "lm_head", 2 * head_weights * rows, head_weights * wb + rows * d * ab, hw.kernels["forward"])
    cost.weight_bytes += head_weights * wb * (1 if layout.tie_embeddings else 2)  # + the embedding table
    cost.allreduces = allreduce_count(layout, tp)
    cost.allreduce = cost.allreduces * allreduce_seconds(hw, tp, activation_bytes)
    collectives = cost.allreduces
    if hw.lm_head_vocab_parallel and tp > 1:                        # gather the logits [rows, vocab]
        cost.allreduce += allgather_seconds(hw, tp, rows * layout.vocab_size * ab)
        collectives += 1
    cost.kernels += collectives                                     # each collective is a kernel launch too
    cost.overhead += collectives * hw.kernel_overhead
    cost.parts["allreduce"] = cost.allreduce + collectives * hw.kernel_overhead
    return cost


@dataclass(frozen=True)
class CostSummary:
    """One prediction as the report records it: a forward pass on one device, where its time goes, its work."""
    tp: int
    seconds: float                      # one forward pass
    tokens_per_second: float            # the tokens of every sequence of the batch, over `seconds`
    roofline_seconds: float
    memory_bound_seconds: float         # the part of the roofline where bytes, not FLOPs, set the time
    kernel_overhead_seconds: float
    allreduce_seconds: float            # all-reduces and the LM head's all-gather, alpha-beta
    allreduce_count: int
    kernels: int
    flops_per_device: float
    bytes_per_device: float
    weight_bytes_per_device: float
    fits_in_memory: bool | None         # the weights fit one device's memory; None: its capacity is not known
    seconds_by_part: dict[str, float]   # "attention", "ffn", "lm_head", "allreduce" -> seconds, overheads included

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("fits_in_memory",))

    @classmethod
    def from_json(cls, raw: dict) -> CostSummary:
        """From its JSON, or from a JSON object that holds its keys among others (a row of paper_comparison)."""
        return cls(**{f.name: raw[f.name] for f in fields(cls)} | {"seconds_by_part": dict(raw["seconds_by_part"])})


def cost_summary(cost: Cost, hw: Hardware, tp: int, batch: int = 1, tokens: int = 1) -> CostSummary:
    """The account of one prediction that the report records."""
    fits = None if hw.memory_capacity is None else bool(cost.weight_bytes <= hw.memory_capacity)
    return CostSummary(tp=tp, seconds=cost.seconds, tokens_per_second=batch * tokens / cost.seconds,
                       roofline_seconds=cost.roofline, memory_bound_seconds=cost.memory_bound_seconds,
                       kernel_overhead_seconds=cost.overhead, allreduce_seconds=cost.allreduce,
                       allreduce_count=cost.allreduces, kernels=cost.kernels, flops_per_device=cost.flops,
                       bytes_per_device=cost.bytes, weight_bytes_per_device=cost.weight_bytes,
                       fits_in_memory=fits, seconds_by_part=cost.parts)


@dataclass(frozen=True)
class ProjectionRow:
    """Decode at one TP degree, the layout as it is and fused."""
    tp: int
    sequential: CostSummary
    fused: CostSummary
    fusion_speedup: float               # sequential over fused seconds

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> ProjectionRow:
        return cls(raw["tp"], CostSummary.from_json(raw["sequential"]), CostSummary.from_json(raw["fused"]),
                   raw["fusion_speedup"])


@dataclass(frozen=True)
class Projection:
    """Decode of one layout at every TP degree it can be split over (decode_projection)."""
    model: str
    parameters: int
    blocks: int
    fused_blocks: int                   # blocks after fusing its groups
    fusion_groups: tuple[tuple[int, int], ...]
    context: int                        # cached positions
    batch: int                          # sequences decoded together
    rows: tuple[ProjectionRow, ...]
    skipped_tp: dict[int, str]          # a TP degree the layout cannot be split over -> why

    def to_json(self) -> dict:
        return present_fields(self) | {"skipped_tp": {str(tp): why for tp, why in self.skipped_tp.items()}}

    @classmethod
    def from_json(cls, raw: dict) -> Projection:
        return cls(raw["model"], raw["parameters"], raw["blocks"], raw["fused_blocks"],
                   as_tuple(raw["fusion_groups"]), raw["context"], raw["batch"],
                   tuple(ProjectionRow.from_json(row) for row in raw["rows"]),
                   {int(tp): why for tp, why in raw["skipped_tp"].items()})


def decode_projection(layout: Layout, hw: Hardware, degrees=range(1, 9), context: int = 1024,
                      batch: int = 1) -> Projection:
    """Single-user decode at every workable TP degree in `degrees`, sequential vs fused (when the layout has
    fusion groups; otherwise the two are the same model)."""
    fused = fuse_layout(layout) if layout.fusion_groups else layout
    rows, skipped = [], {}
    for tp in degrees:
        problems = sharding_problems(layout, tp) or sharding_problems(fused, tp)
        if tp > 1 and hw.allreduce_alpha is None:
            problems = [f"{hw.name} has no all-reduce calibration (MPI was not measured)"]
        if problems:
            skipped[tp] = "; ".join(problems)
            continue
        seq = cost_summary(forward_cost(layout, hw, tp, 1, context, batch), hw, tp, batch)
        fus = cost_summary(forward_cost(fused, hw, tp, 1, context, batch), hw, tp, batch)
        rows.append(ProjectionRow(tp, seq, fus, seq.seconds / fus.seconds))
    return Projection(layout.name, parameter_count(layout), len(layout.blocks), len(fused.blocks),
                      tuple(tuple(g) for g in layout.fusion_groups), context, batch, tuple(rows), skipped)
