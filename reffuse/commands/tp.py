"""Tensor parallelism under MPI: the sequential and the fused model sharded the Megatron way, syncs counted.

Start one process per rank with MPI's own launcher (plain `reffuse tp` is one rank):

    mpiexec -n 2 reffuse tp --model tiny

Each rank holds 1/N of every attention (its query heads and the key/value heads they read) and 1/N of every
FFN's hidden units; embeddings, norms and the LM head are replicated. Each row-parallel output (o_proj,
down_proj) is summed over the ranks by one all-reduce, so a forward pass makes (blocks with attention) +
(FFN blocks) all-reduces. A fused run of k FFNs is one wide FFN, sharded the same way: one all-reduce where
the sequential blocks made k.

For the sequential model and the fused one, it runs a prefill of --prefill-tokens random token ids and then
--decode-tokens decode steps of one token each (KV cache), under tensor parallelism, and checks every forward's
logits against the single-process forward of the same model on rank 0: parity means max |error| <= 1e-5 of
max |logit| in float32 (1e-12 in float64, where float32 rounding no longer hides that sharding is exact).
It prints per forward: all-reduces, bytes summed, all-reduce time and total time, sequential vs fused.
Times are rank 0's, medians of --repeats; ranks start each forward together (a barrier, not counted). The two
models take turns forward by forward, so that forward i of each ran under the same load, a pair: fused /
sequential time is the ratio of the two medians, with the bootstrap 95% interval of the pairs (prefill: --repeats
pairs; decode: --repeats x --decode-tokens).

The fused plan: --groups, or else the longest attention-free run without its last block (the paper finds a
run's last FFN the most sensitive); for tiny that is 4-8. A model without an attention-free run (SmolLM2)
first loses the attention of --drop-attention blocks (default: from n/2-1 to 3n/4-1, for SmolLM2 14-21),
and both the sequential and the fused model are that model; the output says which blocks lost attention.

With --json, rank 0 prints one object: {"ranks", "max_abs_error", "max_rel_error", "parity", "sequential": {...},
"fused": {...}, ...}. In "sequential" and "fused", allreduce_count / allreduce_bytes / allreduce_seconds / seconds
are those of the prefill forward; "decode" holds the same per decode step (medians); "expected_allreduce_count"
is (blocks with attention) + (FFN blocks); "fused_over_sequential_time" holds, for "prefill" and "decode", the
paired ratio ("median", "interval_95", "repeats": the pairs, "resolved": the interval excludes 1). Exit status 1
if parity fails.

Several machines: MPI's own host file, e.g. `mpiexec -f hosts -n 8 reffuse tp ...` (MPICH) or
`mpiexec --hostfile hosts -n 8 reffuse tp ...` (Open MPI), with reffuse installed on every machine.

examples:
  reffuse tp --model tiny
  mpiexec -n 2 reffuse tp --model tiny --groups 4-8 --json
  mpiexec -n 4 reffuse tp --model tiny --allreduce ring
  mpiexec -n 3 reffuse tp --model smollm2 --drop-attention 14-21 --groups 14-20
  mpiexec -n 2 reffuse tp --model tiny --device gpu          (rank r on GPU r % GPUs)
  mpiexec -n 2 reffuse tp --model tiny --fail-on-rank 1      (see the job end when one rank fails)
"""

from __future__ import annotations

from reffuse.commands.common import (DROP_ATTENTION_HELP, add_json_argument, check_positions, format_table,
                                     groups_argument, layers_argument, non_negative_int, positive_int,
                                     positive_seconds, print_json)
from reffuse.core.fusion import NORM_MODES
from reffuse.core.layout import format_layers
from reffuse.formats.registry import model_config
from reffuse.tp import ALLREDUCE_KINDS, run_or_abort, setup_on_every_rank
from reffuse.speed.tp_result import TpResult
from reffuse.tp.job import CUDA_AWARE, RELATIVE_TOLERANCE, JobOptions, PreparedJob, prepare, run_job
from reffuse.stats import MIN_PAIRS
from reffuse.tp.runtime import mpi
from reffuse.tp.watchdog import DEFAULT_TIMEOUT_SECONDS, Watchdog, check_same_job

HELP = "run the sequential and fused model tensor-parallel under mpiexec; count and time the all-reduces"
PROGRAM = "reffuse tp"
def add_arguments(parser):
    parser.add_argument("--model", default="smollm2",
                        help="model name, folder or .gguf file (default: smollm2; tiny and synthetic-smollm2 are "
                             "synthetic)")
    parser.add_argument("--groups", type=groups_argument, default=None,
                        help="runs to fuse, FIRST-LAST[,FIRST-LAST...], 0-based inclusive (default: the longest "
                             "attention-free run without its last block; tiny: 4-8)")
    parser.add_argument("--drop-attention", metavar="BLOCKS", default=None, type=layers_argument,
                        help=f"{DROP_ATTENTION_HELP} (default: none if the model has an attention-free run, else "
                             "blocks n/2-1 to 3n/4-1)")
    parser.add_argument("--norm", choices=NORM_MODES, default="fold",
                        help="fused norm: fold (each block's gain folded in, exact) or last (the paper's)")
    parser.add_argument("--allreduce", choices=ALLREDUCE_KINDS, default="mpi",
                        help="mpi: MPI's own Allreduce; ring: the hand-written ring (reffuse/tp/ring.py)")
    parser.add_argument("--dtype", choices=tuple(RELATIVE_TOLERANCE), default="float32",
                        help="precision of the weights and the arithmetic (default float32; parity: <= 1e-5 "
                             "relative in float32, <= 1e-12 in float64, where sharding is exact)")
    parser.add_argument("--prefill-tokens", type=positive_int, default=64,
                        help="random token ids in the prefill, T (default 64)")
    parser.add_argument("--decode-tokens", type=non_negative_int, default=8,
                        help="decode steps K after the prefill (default 8)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="repeats of prefill and decode; medians reported (default 3)")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
                        help=f"how long a rank waits for the others at one collective before it names the ranks "
                             f"that did not arrive and ends the job (default {DEFAULT_TIMEOUT_SECONDS:g})")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: each rank on GPU (its rank on its machine) mod (GPUs there), with CuPy")
    parser.add_argument("--cuda-aware", choices=tuple(CUDA_AWARE), default="auto",
                        help="GPU buffers straight to MPI (yes) or staged through host memory (no); "
                             "auto asks MPI (MPIX_GPU_query_support, MPIX_Query_cuda_support, mpi_memory_alloc_kinds)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="BLAS threads per rank (default 1: N ranks use N cores, as N devices would)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random token ids")
    parser.add_argument("--fail-on-rank", type=non_negative_int, default=None, metavar="R",
                        help="testing aid: rank R raises at its third all-reduce, to show the job ending")
    add_json_argument(parser)


def print_tables(result: TpResult) -> None:
    groups = ", ".join(f"{a}-{b} ({b - a + 1} FFNs -> 1)" for a, b in result.groups)
    print(f"tensor parallelism: {result.model} over {result.ranks} rank(s) on {result.device}, "
          f"{result.blas_threads_per_rank} BLAS thread(s) each; all-reduce: {result.allreduce}")
    if result.allreduce_path:
        print(f"GPU buffers {result.allreduce_path} (CUDA-aware MPI: {result.cuda_aware}, by "
              f"{result.cuda_aware_source})")
    if result.attention_removed:
        print(f"attention removed in blocks {format_layers(result.attention_removed)} to make an attention-free "
              "run; the sequential and the fused model both lack it")
    print(f"fused: {groups}, norm {result.norm}")
    print(f"input: {result.tokens} random token ids (prefill), then {result.decode_tokens} decode steps; "
          f"times: rank 0's, medians of {result.repeats} (machine load {result.load_average_1min:.1f})\n")
    rows = []
    for name, r in result.variants().items():
        for phase, record, errs in (("prefill", r.prefill, r.prefill_errors), ("decode", r.decode, r.decode_errors)):
            if record is None:
                continue
            rows.append([f"{name} {phase}", r.blocks_with_attention, r.ffn_blocks, record.allreduce_count,
                         f"{record.allreduce_bytes / 1024:.1f}", f"{1e3 * record.allreduce_seconds:.3f}",
                         f"{1e3 * record.seconds:.3f}", f"{errs.max_abs_error:.2e}", f"{errs.max_rel_error:.2e}"])
    print("per forward")
    print(format_table(["", "attention", "FFN blocks", "all-reduces", "KiB summed", "all-reduce ms", "total ms",
                        "max |error|", "relative"], rows) + "\n")
    seq, fused = result.sequential, result.fused
    saved = seq.prefill.allreduce_count - fused.prefill.allreduce_count
    print(f"all-reduces per forward: sequential {seq.prefill.allreduce_count} (expected "
          f"{seq.expected_allreduce_count}), fused {fused.prefill.allreduce_count} (expected "
          f"{fused.expected_allreduce_count}): fusion saves {saved}")
    for phase, ratio in result.fused_over_sequential_time.items():
        if ratio.interval_95 is None:
            print(f"fused / sequential time, {phase}: {ratio.median:.2f}x over {ratio.repeats} paired "
                  f"forwards, too few for a 95% interval (--repeats so that there are {MIN_PAIRS} or more)")
            continue
        low, high = ratio.interval_95
        print(f"fused / sequential time, {phase}: {ratio.median:.2f}x, 95% interval {low:.2f}-{high:.2f} over "
              f"{ratio.repeats} paired forwards: " + ("resolved" if ratio.resolved else
                                                     "unresolved (the interval holds 1)"))
    verdict = "ok" if result.parity else "FAILED"
    print(f"parity with the single-process forward on rank 0: max relative error {result.errors.max_rel_error:.2e} "
          f"(<= {result.tolerance_rel:.0e}): {verdict}")


def run(args) -> int:
    check_positions(model_config(args.model), args.model, args.prefill_tokens + args.decode_tokens,
                    "--prefill-tokens and --decode-tokens")
    comm = mpi().COMM_WORLD
    options = JobOptions.from_namespace(args)
    watchdog = Watchdog(comm, options.timeout, PROGRAM)
    prepared = setup_on_every_rank(comm, lambda: prepare(options, comm, watchdog), PROGRAM, watchdog)
    setup_on_every_rank(comm, lambda: check_same_job(comm, prepared.identity, watchdog, "model"), PROGRAM, watchdog)
    return run_or_abort(comm, lambda: run_prepared(args, options, prepared, watchdog), PROGRAM)


def run_prepared(args, options: JobOptions, prepared: PreparedJob, watchdog: Watchdog) -> int:
    result = run_job(options, prepared, watchdog)
    if result is None:  # ranks other than 0 report nothing
        return 0
    if args.json:
        print_json(result.to_json())
    else:
        print_tables(result)
    return 0 if result.parity else 1
