"""A tensor-parallel job (what `reffuse tp` runs on every rank): the sequential and the fused model sharded the
Megatron way, a prefill and decode steps under tensor parallelism, timed, with the all-reduces counted and the
logits checked against one process on rank 0.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from reffuse.core.backend import synchronize, to_numpy
from reffuse.core.fusion import fuse
from reffuse.core.layout import attention_free_runs
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import Model, forward, to_device, weights_of
from reffuse.errors import ReffuseError
from reffuse.options import FromArguments
from reffuse.formats.registry import load_model
from reffuse.method.removal import default_attention_removal, default_groups, drop_attention
from reffuse.speed.timing import blas_threads
from reffuse.speed.tp_result import Errors, ForwardRecord, TpResult, VariantResult
from reffuse.stats import PairedRatio, paired_ratio
from reffuse.tp.allreduce import AllReduce, AllReduceStats
from reffuse.tp.runtime import ParallelState, parallel_state, rank_zero_first
from reffuse.tp.watchdog import DEFAULT_TIMEOUT_SECONDS, Watchdog, check_same_job
from reffuse.tp.sharding import allreduces_per_forward, check_shardable, shard_model

# Parity bounds, relative to max |logit|. Sharding is exact in exact arithmetic; what remains is rounding from
# summing the partial outputs in another order, the size of the model's own float32 rounding (SmolLM2 with
# attention removed: ~6e-6 under TP, ~6e-6 float32 vs float64 in one process; in float64, TP agrees to ~1e-14).
RELATIVE_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
CUDA_AWARE = {"auto": None, "yes": True, "no": False}


@dataclass
class JobOptions(FromArguments):
    """What `reffuse tp` takes (its --help says what each means)."""
    model: str = "smollm2"
    groups: list | None = None
    drop_attention: list | None = None
    norm: str = "fold"
    allreduce: str = "mpi"
    dtype: str = "float32"
    prefill_tokens: int = 64
    decode_tokens: int = 8
    repeats: int = 3
    device: str = "cpu"
    cuda_aware: str = "auto"
    threads: int = 1
    seed: int = 0
    fail_on_rank: int | None = None
    timeout: float = DEFAULT_TIMEOUT_SECONDS


class FailingAllReduce(AllReduce):
    """--fail-on-rank: raises at its third call, while the other ranks wait inside their all-reduce."""

    def __call__(self, partial):
        if self.stats.count == 2:
            raise RuntimeError(f"simulated failure at the third all-reduce (--fail-on-rank {self.comm.Get_rank()})")
        return super().__call__(partial)


def weights_digest(model: Model) -> str:
    """sha256 of a model's weights, in block order: ranks that loaded different files tell apart by it."""
    digest = hashlib.sha256()
    for array in [model.embed, model.norm_gain] + [a for block in model.blocks for part in (block.attention, block.ffn)
                                                   if part is not None for a in weights_of(part).values()]:
        digest.update(np.ascontiguousarray(to_numpy(array)).tobytes())
    return digest.hexdigest()


@dataclass
class PreparedJob:
    """Everything one rank needs before communicating (what prepare returns)."""
    state: ParallelState
    removed: list[int]             # the blocks whose attention was removed
    groups: list                   # the fused runs, (first, last)
    ids: Any                       # the token ids: prefill, then decode
    identity: dict                 # what identifies the model loaded, for check_same_job once every rank has it
    models: dict[str, Model]       # "sequential", "fused": whole, on this rank's device on rank 0 only
    shards: dict[str, Model]       # the same names: this rank's shard, on its device


def prepare(options: JobOptions, comm, watchdog: Watchdog) -> PreparedJob:
    """Everything each rank needs before communicating: its device, the models, its shards, the token ids, and
    what identifies the model it loaded. First of all, before anything can fail on one rank only, every rank
    checks that all were started with the same arguments."""
    check_same_job(comm, asdict(options), watchdog, "arguments")
    state = parallel_state(comm, options.device)
    for name in ("prefill_tokens", "repeats", "threads"):
        if getattr(options, name) < 1:
            raise ReffuseError(f"--{name.replace('_', '-')} must be at least 1")
    if options.decode_tokens < 0:
        raise ReffuseError("--decode-tokens must be 0 or more")
    if options.fail_on_rank is not None and not 0 <= options.fail_on_rank < state.size:
        raise ReffuseError(f"--fail-on-rank {options.fail_on_rank} is not a rank: ranks are 0..{state.size - 1}")
    # one rank per machine loads first: a model fetched and converted on first use is then cached for the others
    model = rank_zero_first(state.node, lambda: load_model(options.model, dtype=options.dtype),
                            f"loading {options.model}")
    if options.drop_attention is not None:
        removed = list(options.drop_attention)
    else:
        removed = [] if attention_free_runs(model) else default_attention_removal(model)
    if removed:
        model = drop_attention(model, removed)
    identity = {"model": options.model, "config": asdict(model.config), "weights": weights_digest(model)}
    groups = options.groups or default_groups(model)
    models = {"sequential": model, "fused": fuse(model, groups, norm=options.norm)}
    for m in models.values():
        check_shardable(m, state.size)
    ids = np.random.default_rng(options.seed).integers(0, model.config.vocab_size,
                                                       options.prefill_tokens + options.decode_tokens)
    # the full model is needed on rank 0 only, for the single-process reference
    return PreparedJob(state, removed, groups, ids, identity,
                       {name: to_device(m, state.device) if state.rank == 0 else m for name, m in models.items()},
                       {name: to_device(shard_model(m, state.rank, state.size), state.device)
                        for name, m in models.items()})


def run_forwards(models: dict, ids, tokens: int, allreduce: AllReduce | None = None, watchdog=None):
    """Prefill ids[:tokens], then decode the rest one token at a time through a KV cache, in every model of
    `models` (name -> Model), the models taking turns at every forward: forward i of one model and forward i of
    another ran under the same load, a pair.

    Returns, per model, the logits of every forward (as NumPy) and its ForwardRecord (all-reduce stats zero
    without `allreduce`).
    With a watchdog, every rank enters each forward together (a barrier, outside the timing).
    """
    caches = {name: KVCache(model, len(ids)) for name, model in models.items()}
    steps = [ids[:tokens]] + [ids[t:t + 1] for t in range(tokens, len(ids))]
    logits, records = {name: [] for name in models}, {name: [] for name in models}
    for step_ids in steps:
        for name, model in models.items():
            if watchdog is not None:
                watchdog.barrier("the barrier before a forward")
            if allreduce is not None:
                allreduce.stats.reset()
            start = time.perf_counter()
            out = forward(model, step_ids, cache=caches[name], allreduce=allreduce or (lambda x: x))
            synchronize(out)
            seconds = time.perf_counter() - start
            logits[name].append(to_numpy(out))
            stats = allreduce.stats if allreduce is not None else AllReduceStats()
            records[name].append(ForwardRecord(stats.count, stats.bytes, stats.seconds, seconds))
    return logits, records


def errors(outputs: list, references: list) -> Errors:
    """max |tp - single process| over the given forwards, and that over max |single process|."""
    max_abs = max(float(np.max(np.abs(o - r))) for o, r in zip(outputs, references))
    scale = max(float(np.max(np.abs(r))) for r in references)
    return Errors(max_abs, max_abs / scale)


def median_record(records: list[ForwardRecord]) -> ForwardRecord:
    """Median seconds over forwards of one kind; counts and bytes are the same in each of them."""
    return ForwardRecord(records[0].allreduce_count, records[0].allreduce_bytes,
                         statistics.median(r.allreduce_seconds for r in records),
                         statistics.median(r.seconds for r in records))


def measure(options: JobOptions, models: dict, shards: dict, state: ParallelState, allreduce: AllReduce,
            ids) -> tuple[dict[str, VariantResult], dict[str, PairedRatio]] | None:
    """Tensor-parallel prefill and decode of every model (name -> Model, and its shard on this rank), the models
    alternated forward by forward and timed over repeats. On rank 0: each model's record with its errors against
    one process, and fused / sequential time per phase, the ratio of the medians of the paired forwards' seconds
    with its 95% interval (reffuse.stats.paired_ratio); None on the other ranks."""
    prefills, decodes = {name: [] for name in models}, {name: [] for name in models}
    for _ in range(options.repeats):
        logits, records = run_forwards(shards, ids, options.prefill_tokens, allreduce, allreduce.watchdog)
        for name in models:
            prefills[name].append(records[name][0])
            decodes[name].extend(records[name][1:])
    if state.rank != 0:
        return None
    reference = run_forwards(models, ids, options.prefill_tokens)[0]  # one process
    variants = {name: VariantResult(len(model.blocks), sum(b.attention is not None for b in model.blocks),
                                    sum(b.ffn is not None for b in model.blocks), allreduces_per_forward(model),
                                    median_record(prefills[name]),
                                    median_record(decodes[name]) if decodes[name] else None,
                                    errors(logits[name], reference[name]),
                                    errors(logits[name][:1], reference[name][:1]),
                                    errors(logits[name][1:], reference[name][1:]) if decodes[name] else None)
                for name, model in models.items()}
    ratios = {phase: paired_ratio([r.seconds for r in forwards["fused"]], [r.seconds for r in forwards["sequential"]])
              for phase, forwards in (("prefill", prefills), ("decode", decodes)) if forwards["fused"]}
    return variants, ratios


def report(options: JobOptions, prepared: PreparedJob, variants: dict[str, VariantResult],
           ratios: dict[str, PairedRatio], allreduce: AllReduce) -> TpResult:
    gpu = options.device == "gpu"
    tolerance = RELATIVE_TOLERANCE[options.dtype]
    worst = Errors(max(v.errors.max_abs_error for v in variants.values()),
                   max(v.errors.max_rel_error for v in variants.values()))
    path = (("device buffers handed to MPI (CUDA-aware)" if allreduce.cuda_aware else "staged through host memory")
            if gpu else None)
    return TpResult(prepared.models["sequential"].config.name, prepared.state.size, options.device, options.allreduce,
                    allreduce.cuda_aware if gpu else None, path, allreduce.cuda_aware_source if gpu else None,
                    options.dtype, options.prefill_tokens, options.decode_tokens, options.repeats, options.threads,
                    os.getloadavg()[0], prepared.removed, [list(g) for g in prepared.groups], options.norm, worst,
                    tolerance, worst.max_rel_error <= tolerance, variants["sequential"], variants["fused"], ratios)


def run_job(options: JobOptions, prepared: PreparedJob, watchdog: Watchdog) -> TpResult | None:
    """Both models measured on every rank; rank 0's report (report), None on the other ranks."""
    state = prepared.state
    kind = FailingAllReduce if options.fail_on_rank == state.rank else AllReduce
    allreduce = kind(state.comm, options.allreduce, CUDA_AWARE[options.cuda_aware], watchdog)
    with blas_threads(options.threads):
        measured = measure(options, prepared.models, prepared.shards, state, allreduce, prepared.ids)
    if measured is None:
        return None
    return report(options, prepared, *measured, allreduce)
