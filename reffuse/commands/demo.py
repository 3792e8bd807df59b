"""Fuse a run of attention-free blocks and show what changes.

Prints the block layout before and after fusion; how exact fusion is (fused vs the parallel form, in float32
and float64, Theorem 3.1 says equal); how far the parallel form is from the sequential model (the
approximation FFN Fusion makes, eq. 5 vs eq. 4); and the time of the fused run, sequential vs fused.

The `tiny` model is synthetic (random weights): it shows the mechanics, not the quality of a real model.

examples:
  reffuse demo --model tiny
  reffuse demo --model tiny --groups 4-9 --norm last --json
"""

from __future__ import annotations

import numpy as np

from ..fusion import NORM_MODES, fuse, with_last_norm
from ..loading import load_model
from ..model import forward, layout
from ..timing import blas_threads, time_ffn_run
from ..tiny import TINY_ATTENTION_FREE_RUN
from .common import format_table, groups_argument, print_json

HELP = "fuse a run of FFNs and report exactness, the sequential-vs-parallel gap and speed"


def add_arguments(parser):
    parser.add_argument("--model", default="tiny", help="model name or folder (default: tiny, synthetic)")
    parser.add_argument("--groups", type=groups_argument, default=None,
                        help="runs to fuse, FIRST-LAST[,FIRST-LAST...], 0-based inclusive "
                             "(default for tiny: its attention-free run without its last block, 4-8)")
    parser.add_argument("--norm", choices=NORM_MODES, default="fold",
                        help="fold: each block's norm gain folded into its weights (exact); "
                             "last: the paper's choice, the last block's norm for all")
    parser.add_argument("--tokens", type=int, default=64, help="tokens in the test input (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random test input")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def relative_error(a, b) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(args) -> int:
    groups = args.groups or [(TINY_ATTENTION_FREE_RUN[0], TINY_ATTENTION_FREE_RUN[1] - 1)]
    model64 = load_model(args.model, dtype="float64")
    ids = np.random.default_rng(args.seed).integers(0, model64.config.vocab_size, args.tokens)

    exactness = {}
    for dtype in ("float32", "float64"):
        model = model64 if dtype == "float64" else load_model(args.model, dtype=dtype)
        fused = fuse(model, groups, norm=args.norm)
        reference = model if args.norm == "fold" else with_last_norm(model, groups)
        parallel = forward(reference, ids, parallel_groups=groups)
        exactness[dtype] = relative_error(forward(fused, ids), parallel)

    sequential = forward(model64, ids)
    parallel = forward(model64, ids, parallel_groups=groups)
    gap = {"max_abs_logit_difference": float(np.max(np.abs(parallel - sequential))),
           "relative_logit_difference": relative_error(parallel, sequential),
           "top1_agreement": float(np.mean(parallel.argmax(-1) == sequential.argmax(-1)))}

    model32 = load_model(args.model, dtype="float32")
    with blas_threads(None):
        timings = [time_ffn_run(model32, group, args.tokens, args.norm, args.repeats) for group in groups]

    result = {"model": model64.config.name, "groups": groups, "norm": args.norm, "tokens": args.tokens,
              "layout_before": layout(model64), "layout_after": layout(fuse(model64, groups, norm=args.norm)),
              "fused_vs_parallel_relative_error": exactness, "sequential_vs_parallel": gap,
              "ffn_run_timing": timings}
    if args.json:
        print_json(result)
        return 0

    def layout_table(rows):
        return format_table(["block", "attention", "FFN width", "fused from"],
                            [[r["block"], "yes" if r["attention"] else "-", r["ffn_width"],
                              ",".join(map(str, r["fused_from"])) or "-"] for r in rows])

    print(f"model: {result['model']}    groups: {groups}    norm: {args.norm}    tokens: {args.tokens}\n")
    print("layout before fusion\n" + layout_table(result["layout_before"]) + "\n")
    print("layout after fusion\n" + layout_table(result["layout_after"]) + "\n")
    print("fusion exactness, max |fused - parallel| / max |parallel| over the logits (Theorem 3.1: zero)")
    print(format_table(["dtype", "relative error"], [[k, f"{v:.2e}"] for k, v in exactness.items()]) + "\n")
    print("the approximation, parallel form vs sequential model (float64 logits)")
    print(format_table(["max |diff|", "relative", "top-1 agreement"],
                       [[gap["max_abs_logit_difference"], f"{gap['relative_logit_difference']:.3e}",
                         f"{gap['top1_agreement']:.1%}"]]) + "\n")
    print(f"time of the fused run, float32, median of {args.repeats}")
    print(format_table(["group", "tokens", "sequential ms", "fused ms", "sequential/fused"],
                       [[f"{g[0]}-{g[1]}", t["tokens"], f"{1e3 * t['sequential']:.3f}", f"{1e3 * t['fused']:.3f}",
                         f"{t['speedup']:.2f}x"] for g, t in zip(groups, timings)]))
    return 0
