"""What one `reffuse tp` job measured (rank 0's report, its --json), typed. It sits below reffuse.tp because the
cost model (reffuse.speed.costmodel.tp_runs) reads these results too, to predict the runs beside what they measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from reffuse.records import FlatRecord, as_json, records_of
from reffuse.stats import PairedRatio

# Keys `reffuse tp` started writing after the runs committed in benchmarks/results were measured: a result read
# without them writes none of them back.
LATER_KEYS = ("allreduce_path", "cuda_aware_source", "fused_over_sequential_time")


@dataclass
class Errors(FlatRecord):
    """max |tensor parallel - one process| over some forwards' logits, and that over max |one process|."""
    max_abs_error: float
    max_rel_error: float

    @classmethod
    def from_json(cls, raw: dict) -> Errors:
        """Read from its own keys: a run's JSON holds them beside the run's other fields."""
        return cls(raw["max_abs_error"], raw["max_rel_error"])


@dataclass
class ForwardRecord(FlatRecord):
    """One forward: its all-reduces (count, bytes summed, seconds in them) and its seconds. Reported as the median
    over the forwards of one kind, whose counts and bytes are all the same."""
    allreduce_count: int
    allreduce_bytes: int
    allreduce_seconds: float
    seconds: float

    @classmethod
    def from_json(cls, raw: dict) -> ForwardRecord:
        """Read from its own keys: a forward's JSON holds them beside the run's other fields."""
        return cls(raw["allreduce_count"], raw["allreduce_bytes"], raw["allreduce_seconds"], raw["seconds"])


@dataclass
class VariantResult:
    """The sequential or the fused model under tensor parallelism: its blocks, its prefill forward and decode step
    (None without decode steps), and its errors against one process, over every forward and per phase."""
    blocks: int
    blocks_with_attention: int
    ffn_blocks: int
    expected_allreduce_count: int      # (blocks with attention) + (FFN blocks)
    prefill: ForwardRecord
    decode: ForwardRecord | None
    errors: Errors
    prefill_errors: Errors
    decode_errors: Errors | None

    def to_json(self) -> dict:
        """The prefill record and the overall errors lie flat in the object, as `reffuse tp --json` writes them."""
        raw = {"blocks": self.blocks, "blocks_with_attention": self.blocks_with_attention,
               "ffn_blocks": self.ffn_blocks, "expected_allreduce_count": self.expected_allreduce_count,
               **self.prefill.to_json()}
        if self.decode is not None:
            raw["decode"] = self.decode.to_json()
        raw |= self.errors.to_json()
        raw["prefill_errors"] = self.prefill_errors.to_json()
        if self.decode_errors is not None:
            raw["decode_errors"] = self.decode_errors.to_json()
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> VariantResult:
        return cls(raw["blocks"], raw["blocks_with_attention"], raw["ffn_blocks"], raw["expected_allreduce_count"],
                   ForwardRecord.from_json(raw), ForwardRecord.from_json(raw["decode"]) if "decode" in raw else None,
                   Errors.from_json(raw), Errors.from_json(raw["prefill_errors"]),
                   Errors.from_json(raw["decode_errors"]) if "decode_errors" in raw else None)


@dataclass
class TpResult:
    """Rank 0's report of a `reffuse tp` job: how it ran, both models' records, and parity with one process."""
    model: str                         # the model's config name
    ranks: int
    device: str                        # "cpu" or "gpu"
    allreduce: str                     # "mpi" or "ring"
    cuda_aware: bool | None            # on GPU: whether MPI was handed device buffers; None on CPU
    allreduce_path: str | None         # on GPU: the same in words
    cuda_aware_source: str | None      # on GPU: what said whether MPI is CUDA-aware
    dtype: str
    tokens: int                        # in the prefill
    decode_tokens: int
    repeats: int
    blas_threads_per_rank: int
    load_average_1min: float
    attention_removed: list[int]
    groups: list[list[int]]            # the fused runs, (first, last) inclusive
    norm: str
    errors: Errors                     # the larger of the two models'
    tolerance_rel: float
    parity: bool                       # errors.max_rel_error <= tolerance_rel
    sequential: VariantResult
    fused: VariantResult
    fused_over_sequential_time: dict[str, PairedRatio]  # phase -> the paired forwards' fused / sequential seconds
    unrecorded: tuple[str, ...] = ()   # the LATER_KEYS a committed run predates: not written back

    def variants(self) -> dict[str, VariantResult]:
        return {"sequential": self.sequential, "fused": self.fused}

    def to_json(self) -> dict:
        raw = {"model": self.model, "ranks": self.ranks, "device": self.device, "allreduce": self.allreduce,
               "cuda_aware": self.cuda_aware, "allreduce_path": self.allreduce_path,
               "cuda_aware_source": self.cuda_aware_source, "dtype": self.dtype, "tokens": self.tokens,
               "decode_tokens": self.decode_tokens, "repeats": self.repeats,
               "blas_threads_per_rank": self.blas_threads_per_rank, "load_average_1min": self.load_average_1min,
               "attention_removed": self.attention_removed, "groups": self.groups, "norm": self.norm,
               **self.errors.to_json(), "tolerance_rel": self.tolerance_rel, "parity": self.parity,
               "sequential": self.sequential.to_json(), "fused": self.fused.to_json(),
               "fused_over_sequential_time": as_json(self.fused_over_sequential_time)}
        return {key: value for key, value in raw.items() if key not in self.unrecorded}

    @classmethod
    def from_json(cls, raw: dict) -> TpResult:
        return cls(raw["model"], raw["ranks"], raw["device"], raw["allreduce"], raw["cuda_aware"],
                   raw.get("allreduce_path"), raw.get("cuda_aware_source"), raw["dtype"], raw["tokens"],
                   raw["decode_tokens"], raw["repeats"], raw["blas_threads_per_rank"], raw["load_average_1min"],
                   raw["attention_removed"], raw["groups"], raw["norm"], Errors.from_json(raw), raw["tolerance_rel"],
                   raw["parity"], VariantResult.from_json(raw["sequential"]), VariantResult.from_json(raw["fused"]),
                   records_of(PairedRatio, raw.get("fused_over_sequential_time", {})),
                   tuple(key for key in LATER_KEYS if key not in raw))
