"""Measure how blocks depend on each other (the paper's §3), and propose which FFNs to fuse.

Optionally removes attention first (--drop-attention 14-21, or --drop-attention-count N: the N consecutive
blocks whose attentions, each removed alone, cost the least summed KL on calibration text), so that
attention-free runs exist. Then, on calibration text (never the held-out play), it measures:

- M[i, j], how much block j's contribution turns when block i is skipped, for blocks and for FFN sub-blocks;
- per block: cosdist(X, f(X)), ||h(X)|| / ||X||, cosdist(h(X), X);
- M_max and M_sum of every window of --window-blocks blocks, and the paper's greedy choice of windows (full
  blocks only by default, as in the paper);
- a fusion plan: groups inside the attention-free runs, without each run's last FFN unless --include-last, at
  most --max-group-size FFNs each, cut where the least FFN-level dependency is left inside the groups (the
  most crosses the cuts).

DIR/analysis.json holds all of it with the token ids used (null marks an undefined matrix entry), and DIR/*.png
the figures: dependency heatmaps (log2 colour scale, attention-free blocks boxed), per-block metrics, window
statistics with the greedy choices, and the block layout. The first token of each sequence (the attention sink)
is run but not measured unless --include-sink. The synthetic `tiny` model gets random token ids instead of text.

examples:
  reffuse analyze --model smollm2 --out out/analysis
  reffuse analyze --model smollm2 --drop-attention 14-21 --max-group-size 4 --out out/analysis --json
  reffuse analyze --model smollm2 --drop-attention-count 8 --out out/analysis
  reffuse analyze --model tiny --dependency-tokens 64 --out out/tiny-analysis --no-figures
"""

from __future__ import annotations

from pathlib import Path

from reffuse.core.layout import format_groups
from reffuse.files import read_json
from reffuse.outputs import check_output_folder, staged_folder, write_json_atomic
from reffuse.optional import available, install_hint
from reffuse.progress import note
from reffuse.commands.common import (add_attention_removal_arguments, add_device_argument, add_dtype_argument,
                                     add_json_argument, add_overwrite_argument, add_token_arguments, check_window,
                                     format_table, non_negative_int, positive_int, print_json)
from reffuse.method.analysis import DEFAULT_TOKENS, Analysis, AnalysisOptions, analyze
from reffuse.speed.timing import blas_threads

HELP = "dependency matrix, per-block metrics, greedy windows and a fusion plan, with figures"
ANALYSIS = "analysis"


def is_analysis(folder: Path) -> bool:
    """A folder of analysis.json and figures written before folders were marked."""
    return set(read_json(folder / "analysis.json", "")) >= {"dependency", "per_block", "plan"}


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for analysis.json and the figures (created if needed)")
    add_attention_removal_arguments(parser)
    add_token_arguments(parser, dependency=DEFAULT_TOKENS)
    parser.add_argument("--sequence-length", type=positive_int, default=None,
                        help="tokens per sequence; the tokens are cut into sequences this long (default: one "
                             "sequence of --dependency-tokens)")
    parser.add_argument("--include-sink", action="store_true",
                        help="also measure the first token of each sequence (the attention sink)")
    parser.add_argument("--window-blocks", type=positive_int, default=4,
                        help="blocks per window for M_max / M_sum (default 4)")
    parser.add_argument("--greedy-blocks", choices=["full", "all"], default="full",
                        help="windows the greedy selection may take: full blocks only (the paper) or all")
    parser.add_argument("--max-group-size", type=positive_int, default=4,
                        help="at most this many FFNs per fusion group (default 4)")
    parser.add_argument("--groups-per-run", type=positive_int, default=None,
                        help="cut each run into at least this many groups")
    parser.add_argument("--include-last", action="store_true",
                        help="let a group include its run's last FFN (the paper leaves it out)")
    add_dtype_argument(parser)
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="BLAS threads, 0 for the BLAS library's own choice (default 1: the work is ~900 "
                             "mid-sized products, and on a shared machine BLAS threads that wait for each other "
                             "were measured 4x slower than one)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the random token ids for a synthetic model")
    parser.add_argument("--no-figures", action="store_true", help="write analysis.json only")
    add_overwrite_argument(parser, "the analysis reffuse wrote in --out")
    add_device_argument(parser)
    add_json_argument(parser)


def summary(result: Analysis, paths) -> str:
    tokens, plan, steps = result.tokens, result.plan, result.greedy.steps
    spans = "; ".join(f"{s.title} characters {s.start}-{s.end} ({s.tokens} tokens)" for s in tokens.spans) \
        or tokens.split
    lines = [f"model: {result.model.name} ({result.model.blocks} blocks), attention removed: "
             f"{result.attention_removal.blocks}",
             f"tokens: {tokens.sequences} x {tokens.sequence_length} from {spans}; {tokens.measured} measured"
             + (" (attention sink excluded)" if tokens.attention_sink_excluded else ""),
             f"{result.block_evaluations} block evaluations in {result.seconds:.1f} s "
             f"({result.cpu_seconds:.1f} s of CPU)", ""]
    lines.append(f"greedy windows of {result.windows.length} ({result.greedy.blocks} blocks)")
    lines.append(format_table(["step", "blocks", "M_max", "M_sum", "tied"],
                              [[s.step, f"{s.first}-{s.last}", f"{s.max:.4f}", f"{s.sum:.4f}",
                                ",".join(map(str, s.tied))] for s in steps]) if steps else "  no eligible window")
    lines.append("")
    groups = format_groups(plan.groups, ", ") if plan.groups else "none (no attention-free run long enough)"
    lines.append(f"fusion plan ({'last FFN of each run left out' if plan.leave_out_last else 'last FFN kept'}, "
                 f"max group size {plan.max_group_size or 'none'}): {groups}")
    lines += ["", "written:"] + [f"  {p}" for p in paths]
    return "\n".join(lines)


def run(args) -> int:
    check_output_folder(args.out, args.overwrite, is_analysis, ANALYSIS)  # before the long work
    check_window(args.model, args.sequence_length or args.dependency_tokens,
                 "--sequence-length" if args.sequence_length else "--dependency-tokens (one sequence)")
    figures = not args.no_figures and available("matplotlib")
    if not args.no_figures and not figures:
        note(f"figures will be skipped: drawing them needs matplotlib ({install_hint('real')})")
    with blas_threads(args.threads or None):
        result = analyze(AnalysisOptions.from_namespace(args))
    with staged_folder(args.out, args.overwrite, is_analysis, ANALYSIS) as staging:  # the JSON and its figures, whole
        names = [write_json_atomic(staging / "analysis.json", result.to_json()).name]
        if figures:
            from reffuse.plots.dependency import write_analysis_figures
            names += [p.name for p in write_analysis_figures(result, staging)]
    paths = [args.out / name for name in names]
    if args.json:
        print_json(result.to_json())
    else:
        print(summary(result, paths))
    return 0
