"""Tensor parallelism under MPI: the sequential and the fused model sharded the Megatron way, syncs counted.

Start one process per rank with MPI's own launcher (plain `reffuse tp` is one rank):

    mpiexec -n 2 reffuse tp --model tiny

Each rank holds 1/N of every attention (its query heads and the key/value heads they read) and 1/N of every
FFN's hidden units; embeddings, norms and the LM head are replicated. Each row-parallel output (o_proj,
down_proj) is summed over the ranks by one all-reduce, so a forward pass makes (blocks with attention) +
(FFN blocks) all-reduces. A fused run of k FFNs is one wide FFN, sharded the same way: one all-reduce where
the sequential blocks made k.

For the sequential model and the fused one, it runs a prefill of --tokens random token ids and then
--decode-tokens decode steps of one token each (KV cache), under tensor parallelism, and checks every forward's
logits against the single-process forward of the same model on rank 0: parity means max |error| <= 1e-5 of
max |logit| in float32 (1e-12 in float64, where float32 rounding no longer hides that sharding is exact).
It prints per forward: all-reduces, bytes summed, all-reduce time and total time, sequential vs fused.
Times are rank 0's, medians of --repeats; ranks start each forward together (a barrier, not counted).

The fused plan: --groups, or else the longest attention-free run without its last block (the paper finds a
run's last FFN the most sensitive); for tiny that is 4-8. A model without an attention-free run (SmolLM2)
first loses the attention of --remove-attention blocks (default: from n/2-1 to 3n/4-1, for SmolLM2 14-21),
and both the sequential and the fused model are that model; the output says which blocks lost attention.

With --json, rank 0 prints one object: {"ranks", "max_abs_error", "max_rel_error", "parity", "sequential": {...},
"fused": {...}, ...}. In "sequential" and "fused", allreduce_count / allreduce_bytes / allreduce_seconds / seconds
are those of the prefill forward; "decode" holds the same per decode step (medians); "expected_allreduce_count"
is (blocks with attention) + (FFN blocks). Exit status 1 if parity fails.

Several machines: MPI's own host file, e.g. `mpiexec -f hosts -n 8 reffuse tp ...` (MPICH) or
`mpiexec --hostfile hosts -n 8 reffuse tp ...` (Open MPI), with reffuse installed on every machine.

examples:
  reffuse tp --model tiny
  mpiexec -n 2 reffuse tp --model tiny --groups 4-8 --json
  mpiexec -n 4 reffuse tp --model tiny --allreduce ring
  mpiexec -n 3 reffuse tp --model smollm2 --remove-attention 14-21 --groups 14-20
  mpiexec -n 2 reffuse tp --model tiny --device gpu          (rank r on GPU r % GPUs)
  mpiexec -n 2 reffuse tp --model tiny --fail-on-rank 1      (see the job end when one rank fails)
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from reffuse.core.backend import synchronize, to_numpy
from reffuse.errors import ReffuseError
from reffuse.core.fusion import NORM_MODES, fuse
from reffuse.formats.registry import load_model
from reffuse.core.model import KVCache, Model, forward, to_device
from reffuse.core.layout import attention_free_runs, format_layers, parse_layers
from reffuse.method.removal import drop_attention
from reffuse.speed.timing import blas_threads
from reffuse.tp import (ALLREDUCE_KINDS, AllReduce, ParallelState, allreduces_per_forward, check_shardable,
                  parallel_state, rank_zero_first, run_or_abort, setup_on_every_rank, shard_model)
from reffuse.tp.runtime import mpi
from reffuse.commands.common import format_table, groups_argument, print_json

HELP = "run the sequential and fused model tensor-parallel under mpiexec; count and time the all-reduces"
PROGRAM = "reffuse tp"
# Parity bounds, relative to max |logit|. Sharding is exact in exact arithmetic; what remains is rounding from
# summing the partial outputs in another order, the size of the model's own float32 rounding (SmolLM2 with
# attention removed: ~6e-6 under TP, ~6e-6 float32 vs float64 in one process; in float64, TP agrees to ~1e-14).
RELATIVE_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
CUDA_AWARE = {"auto": None, "yes": True, "no": False}


def add_arguments(parser):
    parser.add_argument("--model", default="tiny", help="tiny (synthetic), smollm2, or a model folder (default tiny)")
    parser.add_argument("--groups", type=groups_argument, default=None,
                        help="runs to fuse, FIRST-LAST[,FIRST-LAST...], 0-based inclusive (default: the longest "
                             "attention-free run without its last block; tiny: 4-8)")
    parser.add_argument("--remove-attention", metavar="LAYERS", default=None,
                        help="remove the attention of these blocks first, e.g. 14-21 (default: none if the model "
                             "has an attention-free run, else blocks n/2-1 to 3n/4-1)")
    parser.add_argument("--norm", choices=NORM_MODES, default="fold",
                        help="fused norm: fold (each block's gain folded in, exact) or last (the paper's)")
    parser.add_argument("--allreduce", choices=ALLREDUCE_KINDS, default="mpi",
                        help="mpi: MPI's own Allreduce; ring: the hand-written ring (reffuse/tp/ring.py)")
    parser.add_argument("--dtype", choices=tuple(RELATIVE_TOLERANCE), default="float32",
                        help="float32 (parity: <= 1e-5 relative) or float64 (<= 1e-12: sharding is exact)")
    parser.add_argument("--tokens", type=int, default=64, help="prefill length T (default 64)")
    parser.add_argument("--decode-tokens", type=int, default=8, help="decode steps K after the prefill (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of prefill and decode; medians reported")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: each rank on GPU (its rank on its machine) mod (GPUs there), with CuPy")
    parser.add_argument("--cuda-aware", choices=tuple(CUDA_AWARE), default="auto",
                        help="GPU buffers straight to MPI (yes) or staged through host memory (no); "
                             "auto asks MPI (its mpi_memory_alloc_kinds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads per rank (default 1: N ranks use N cores, as N devices would)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--fail-on-rank", type=int, default=None, metavar="R",
                        help="testing aid: rank R raises at its third all-reduce, to show the job ending")
    parser.add_argument("--json", action="store_true", help="rank 0 prints one JSON object instead of tables")


def default_attention_removal(model: Model) -> list[int]:
    """Blocks n/2-1 .. 3n/4-1, a contiguous region just past the middle, where the paper's fusion regions lie too
    (Ultra: blocks 66-114 of 126); for SmolLM2's 30 blocks, 14-21."""
    n = len(model.blocks)
    return list(range(n // 2 - 1, 3 * n // 4))


def default_groups(model: Model) -> list[tuple[int, int]]:
    """The longest attention-free run, without its last block when it has three or more."""
    runs = attention_free_runs(model)
    if not runs:
        raise ReffuseError(f"{model.config.name} has no run of attention-free blocks to fuse: "
                           "pass --remove-attention FIRST-LAST")
    first, last = max(runs, key=lambda run: run[1] - run[0])
    return [(first, last - 1 if last - first >= 2 else last)]


class FailingAllReduce(AllReduce):
    """--fail-on-rank: raises at its third call, while the other ranks wait inside their all-reduce."""

    def __call__(self, partial):
        if self.stats.count == 2:
            raise RuntimeError(f"simulated failure at the third all-reduce (--fail-on-rank {self.comm.Get_rank()})")
        return super().__call__(partial)


def prepare(args, comm) -> dict:
    """Everything each rank needs before communicating: its device, the models, its shards, the token ids."""
    state = parallel_state(comm, args.device)
    for name in ("tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ReffuseError(f"--{name} must be at least 1")
    if args.decode_tokens < 0:
        raise ReffuseError("--decode-tokens must be 0 or more")
    if args.fail_on_rank is not None and not 0 <= args.fail_on_rank < state.size:
        raise ReffuseError(f"--fail-on-rank {args.fail_on_rank} is not a rank: ranks are 0..{state.size - 1}")
    # one rank per machine loads first: a model fetched and converted on first use is then cached for the others
    model = rank_zero_first(state.node, lambda: load_model(args.model, dtype=args.dtype), f"loading {args.model}")
    if args.remove_attention is not None:
        removed = parse_layers(args.remove_attention)
    else:
        removed = [] if attention_free_runs(model) else default_attention_removal(model)
    if removed:
        model = drop_attention(model, removed)
    groups = args.groups or default_groups(model)
    models = {"sequential": model, "fused": fuse(model, groups, norm=args.norm)}
    for m in models.values():
        check_shardable(m, state.size)
    ids = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, args.tokens + args.decode_tokens)
    # the full model is needed on rank 0 only, for the single-process reference
    return {"state": state, "removed": removed, "groups": groups, "ids": ids,
            "models": {name: to_device(m, state.device) if state.rank == 0 else m for name, m in models.items()},
            "shards": {name: to_device(shard_model(m, state.rank, state.size), state.device)
                       for name, m in models.items()}}


def run_forwards(model: Model, ids, tokens: int, allreduce: AllReduce | None = None, comm=None):
    """Prefill ids[:tokens], then decode the rest one token at a time through a KV cache.

    Returns the logits of every forward (as NumPy) and, per forward, its seconds and all-reduce stats.
    With a communicator, every rank enters each forward together (a barrier, outside the timing).
    """
    cache = KVCache(model, len(ids))
    steps = [ids[:tokens]] + [ids[t:t + 1] for t in range(tokens, len(ids))]
    logits, records = [], []
    for step_ids in steps:
        if comm is not None:
            comm.Barrier()
        if allreduce is not None:
            allreduce.stats.reset()
        start = time.perf_counter()
        out = forward(model, step_ids, cache=cache, allreduce=allreduce or (lambda x: x))
        synchronize(out)
        seconds = time.perf_counter() - start
        logits.append(to_numpy(out))
        stats = allreduce.stats.as_dict() if allreduce is not None else {}
        records.append({f"allreduce_{k}": v for k, v in stats.items()} | {"seconds": seconds})
    return logits, records


def errors(outputs: list, references: list) -> dict:
    """max |tp - single process| over the given forwards, and that over max |single process|."""
    max_abs = max(float(np.max(np.abs(o - r))) for o, r in zip(outputs, references))
    scale = max(float(np.max(np.abs(r))) for r in references)
    return {"max_abs_error": max_abs, "max_rel_error": max_abs / scale}


def median_record(records: list[dict]) -> dict:
    """Median seconds over forwards of one kind; counts and bytes are the same in each of them."""
    return {key: statistics.median(r[key] for r in records) if isinstance(value, float) else value
            for key, value in records[0].items()}


def measure(args, model: Model, shard: Model, state: ParallelState, allreduce: AllReduce, ids) -> dict:
    """Tensor-parallel prefill and decode of one model, timed over repeats; on rank 0, errors against one process."""
    prefills, decodes = [], []
    for _ in range(args.repeats):
        logits, records = run_forwards(shard, ids, args.tokens, allreduce, state.comm)
        prefills.append(records[0])
        decodes.extend(records[1:])
    result = {"blocks": len(model.blocks),
              "blocks_with_attention": sum(b.attention is not None for b in model.blocks),
              "ffn_blocks": sum(b.ffn is not None for b in model.blocks),
              "expected_allreduce_count": allreduces_per_forward(model),
              **median_record(prefills)}
    if decodes:
        result["decode"] = median_record(decodes)
    if state.rank == 0:
        reference, _ = run_forwards(model, ids, args.tokens)  # one process, no all-reduce
        result |= errors(logits, reference)
        result["prefill_errors"] = errors(logits[:1], reference[:1])
        if decodes:
            result["decode_errors"] = errors(logits[1:], reference[1:])
    return result


def report(args, prepared: dict, results: dict, threads: int, cuda_aware) -> dict:
    state = prepared["state"]
    max_abs = max(r["max_abs_error"] for r in results.values())
    max_rel = max(r["max_rel_error"] for r in results.values())
    return {"model": prepared["models"]["sequential"].config.name, "ranks": state.size, "device": args.device,
            "allreduce": args.allreduce, "cuda_aware": cuda_aware if args.device == "gpu" else None,
            "dtype": args.dtype, "tokens": args.tokens, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
            "blas_threads_per_rank": threads, "load_average_1min": os.getloadavg()[0],
            "attention_removed": prepared["removed"], "groups": [list(g) for g in prepared["groups"]], "norm": args.norm,
            "max_abs_error": max_abs, "max_rel_error": max_rel, "tolerance_rel": RELATIVE_TOLERANCE[args.dtype],
            "parity": max_rel <= RELATIVE_TOLERANCE[args.dtype], **results}


def print_tables(result: dict) -> None:
    groups = ", ".join(f"{a}-{b} ({b - a + 1} FFNs -> 1)" for a, b in result["groups"])
    print(f"tensor parallelism: {result['model']} over {result['ranks']} rank(s) on {result['device']}, "
          f"{result['blas_threads_per_rank']} BLAS thread(s) each; all-reduce: {result['allreduce']}")
    if result["attention_removed"]:
        print(f"attention removed in blocks {format_layers(result['attention_removed'])} to make an attention-free "
              "run; the sequential and the fused model both lack it")
    print(f"fused: {groups}, norm {result['norm']}")
    print(f"input: {result['tokens']} random token ids (prefill), then {result['decode_tokens']} decode steps; "
          f"times: rank 0's, medians of {result['repeats']} (machine load {result['load_average_1min']:.1f})\n")
    rows = []
    for name in ("sequential", "fused"):
        r = result[name]
        for phase, record, errs in (("prefill", r, r["prefill_errors"]),
                                    ("decode", r.get("decode"), r.get("decode_errors"))):
            if record is None:
                continue
            rows.append([f"{name} {phase}", r["blocks_with_attention"], r["ffn_blocks"],
                         record["allreduce_count"], f"{record['allreduce_bytes'] / 1024:.1f}",
                         f"{1e3 * record['allreduce_seconds']:.3f}", f"{1e3 * record['seconds']:.3f}",
                         f"{errs['max_abs_error']:.2e}", f"{errs['max_rel_error']:.2e}"])
    print("per forward")
    print(format_table(["", "attention", "FFN blocks", "all-reduces", "KiB summed", "all-reduce ms", "total ms",
                        "max |error|", "relative"], rows) + "\n")
    seq, fused = result["sequential"], result["fused"]
    print(f"all-reduces per forward: sequential {seq['allreduce_count']} (expected {seq['expected_allreduce_count']}"
          f"), fused {fused['allreduce_count']} (expected {fused['expected_allreduce_count']}): fusion saves "
          f"{seq['allreduce_count'] - fused['allreduce_count']}")
    verdict = "ok" if result["parity"] else "FAILED"
    print(f"parity with the single-process forward on rank 0: max relative error {result['max_rel_error']:.2e} "
          f"(<= {result['tolerance_rel']:.0e}): {verdict}")


def run(args) -> int:
    comm = mpi().COMM_WORLD
    prepared = setup_on_every_rank(comm, lambda: prepare(args, comm), PROGRAM)
    return run_or_abort(comm, lambda: run_prepared(args, prepared), PROGRAM)


def run_prepared(args, prepared: dict) -> int:
    state = prepared["state"]
    threads = args.threads
    kind = FailingAllReduce if args.fail_on_rank == state.rank else AllReduce
    allreduce = kind(state.comm, args.allreduce, CUDA_AWARE[args.cuda_aware])
    with blas_threads(threads):
        results = {name: measure(args, prepared["models"][name], prepared["shards"][name], state, allreduce,
                                 prepared["ids"])
                   for name in ("sequential", "fused")}
    if state.rank != 0:
        return 0
    result = report(args, prepared, results, threads, allreduce.cuda_aware)
    if args.json:
        print_json(result)
    else:
        print_tables(result)
    return 0 if result["parity"] else 1
