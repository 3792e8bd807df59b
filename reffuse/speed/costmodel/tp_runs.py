"""Predictions for `reffuse tp` runs on this machine, beside what they measured."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from reffuse.core.layout import BlockLayout, Layout, check_groups, fuse_layout
from reffuse.errors import ReffuseError
from reffuse.records import present_fields
from reffuse.speed.costmodel.hardware import Hardware
from reffuse.speed.costmodel.latency import forward_cost
from reffuse.speed.costmodel.presets import MODEL_PRESETS
from reffuse.speed.tp_result import TpResult


# ---------------------------------------------------------------------------------------------------------------
# Predictions for `reffuse tp` runs on this machine, beside what they measured


def tp_run_layout(result: TpResult) -> Layout:
    """The layout a `reffuse tp --json` result ran: its model, attention removed where it says, its groups."""
    name = result.model.lower()
    preset = "tiny" if name.startswith("tiny") else "smollm2" if "smollm2" in name else None
    if preset is None:
        raise ReffuseError(f"cannot tell which model the tp result ran ({result.model!r}): the cost model knows "
                           "the tp results of tiny and smollm2")
    layout = MODEL_PRESETS[preset]()
    removed = set(result.attention_removed)
    blocks = tuple(BlockLayout(b.attention and i not in removed, b.ffn_width, b.fused_from)
                   for i, b in enumerate(layout.blocks))
    layout = dataclasses.replace(layout, blocks=blocks, fusion_groups=())
    return dataclasses.replace(layout, fusion_groups=tuple(check_groups(layout, result.groups)))


@dataclass(frozen=True, kw_only=True)
class TpRunPrediction:
    """One kind of forward of a `reffuse tp` run (a variant and a phase): what it measured beside what the model
    predicts, per forward."""
    model: str                          # the cost model's layout: "tiny" or "smollm2"
    ranks: int
    variant: str                        # "sequential" or "fused"
    phase: str                          # "prefill" or "decode"
    tokens: int                         # new tokens per forward
    context: float                      # cached positions before them (decode: the mean over its steps)
    load_average: float | None          # the run's 1-minute load average
    measured_seconds: float
    predicted_seconds: float
    measured_allreduce_seconds: float
    predicted_allreduce_seconds: float
    measured_allreduce_count: int
    predicted_allreduce_count: int
    measured_over_predicted: float
    measured_compute_seconds: float     # the forward less its all-reduces: computation and per-call overheads
    predicted_compute_seconds: float
    file: str | None = None             # the `reffuse tp --json` output it came from, once the report names it

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("load_average",))

    @classmethod
    def from_json(cls, raw: dict) -> TpRunPrediction:
        return cls(**raw)


def predict_tp_run(result: TpResult, hw: Hardware) -> list[TpRunPrediction]:
    """One row per (sequential | fused) × (prefill | decode) of a `reffuse tp --json` result: measured beside
    predicted seconds per forward, all-reduce seconds and count. Decode is predicted at the mean context of
    its steps (the prefill length plus half the decode steps)."""
    layout = tp_run_layout(result)
    ranks, threads = result.ranks, result.blas_threads_per_rank
    tokens, steps = result.tokens, result.decode_tokens
    rows = []
    for variant, record, shapes in (("sequential", result.sequential, layout),
                                    ("fused", result.fused, fuse_layout(layout))):
        phases = [("prefill", record.prefill, tokens, 0)]
        if record.decode is not None:
            phases.append(("decode", record.decode, 1, tokens + (steps - 1) / 2))
        for phase, measured, new_tokens, context in phases:
            cost = forward_cost(shapes, hw, ranks, new_tokens, context, threads=threads)
            rows.append(TpRunPrediction(
                model=layout.name, ranks=ranks, variant=variant, phase=phase, tokens=new_tokens, context=context,
                load_average=result.load_average_1min, measured_seconds=measured.seconds,
                predicted_seconds=cost.seconds, measured_allreduce_seconds=measured.allreduce_seconds,
                predicted_allreduce_seconds=cost.collective_seconds, measured_allreduce_count=measured.allreduce_count,
                predicted_allreduce_count=cost.allreduces, measured_over_predicted=measured.seconds / cost.seconds,
                measured_compute_seconds=measured.seconds - measured.allreduce_seconds,
                predicted_compute_seconds=cost.seconds - cost.collective_seconds))
    return rows
