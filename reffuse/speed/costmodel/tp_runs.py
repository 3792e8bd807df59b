"""Predictions for `reffuse tp` runs on this machine, beside what they measured."""

from __future__ import annotations

import dataclasses

from reffuse.core.layout import BlockLayout, Layout, check_groups, fuse_layout
from reffuse.errors import ReffuseError
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


def predict_tp_run(result: TpResult, hw: Hardware) -> list[dict]:
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
            rows.append({"model": layout.name, "ranks": ranks, "variant": variant, "phase": phase,
                         "tokens": new_tokens, "context": context, "load_average": result.load_average_1min,
                         "measured_seconds": measured.seconds, "predicted_seconds": cost.seconds,
                         "measured_allreduce_seconds": measured.allreduce_seconds,
                         "predicted_allreduce_seconds": cost.parts["allreduce"],
                         "measured_allreduce_count": measured.allreduce_count,
                         "predicted_allreduce_count": cost.allreduces,
                         "measured_over_predicted": measured.seconds / cost.seconds,
                         # the rest of the forward: computation and per-call overheads
                         "measured_compute_seconds": measured.seconds - measured.allreduce_seconds,
                         "predicted_compute_seconds": cost.seconds - cost.parts["allreduce"]})
    return rows
