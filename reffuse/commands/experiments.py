"""The paper's experiments at small scale: a Markdown report, its JSON and its figures.

On the model (SmolLM2 by default), attention is removed from the --drop-attention-count consecutive blocks whose
single removals cost least; the attention-free run this makes, without its last block, is the span fused. Then:
(a) fusion intensity, the span fused into fewer and fewer groups; (b) FFN removal vs fusion at equal depth
reduction, with decode latency measured in the same run; (c) including vs leaving out the run's last FFN;
(d) reversed FFN order vs fusion; (e) full-block parallelization by the paper's greedy windows, 1 to 4 steps;
(f) norm fold vs last; (g) calibrated vs plain fusion; (h) which predictor (the paper's cosine dependency and five
others) ranks the damage of every group of the span; (i) FFN removal vs fusion at equal latency (modelled on a
GPU, and on this CPU), removal refitted as calibrated fusion is; (j) calibration on more text (--scale-tokens),
with residuals on held-out text; (k) the planner's predictor against the paper's cosine dependency, on held-out text,
where the two cut the span differently. Quality is KL to the pre-fusion model and perplexity on held-out text (eight
plays from their first scene and the Sonnets, reffuse.formats.corpus); everything fitted or chosen reads
calibration text only. reffuse.experiments.run documents each choice.

The report (README.md) says, finding by finding, whether the paper's observation held here, with the numbers.
A region takes about 50 minutes on 2 cores with the defaults (16384 held-out tokens; progress on stderr). The
synthetic tiny model runs the same code in seconds, to check it, not to learn anything.

With --regions N the whole study is repeated on N attention-removal regions (the N cheapest windows of blocks,
which overlap: not independent replications), each region's report in its own folder and a table of the findings
across them beside.

With --report-only nothing is measured: the run already in --out (or every region of it) is judged again by the
current rules, from its JSON, and its reports and figures are rewritten; the verdicts the run recorded are kept
beside the new ones, and the report says when the rules were revised and which setup files changed after the
commit the run recorded.

examples:
  reffuse experiments --out reports/experiments/smollm2
  reffuse experiments --regions 4 --held-out-tokens 2048 --out reports/experiments/smollm2_regions
  reffuse experiments --held-out-tokens 2048 --scale-tokens 2048,8192 --out out/experiments
  reffuse experiments --model tiny --drop-attention-count 2 --out out/experiments-tiny
  reffuse experiments --report-only --out reports/experiments/smollm2
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from reffuse.experiments.findings import StudyResult
from reffuse.experiments.report import markdown, regions_markdown
from reffuse.errors import ReffuseError
from reffuse.experiments.run import SCALE_TOKENS, RegionSummary, region_summary, rejudge, run_experiments
from reffuse.optional import available, install_hint
from reffuse.plots.experiments import write_experiment_figures
from reffuse.progress import note
from reffuse.files import read_json
from reffuse.outputs import check_output_folder, json_naming, staged_folder, write_json_atomic, write_text_atomic
from reffuse.commands.common import (DROP_ATTENTION_COUNT_HELP, add_json_argument, add_overwrite_argument,
                                     add_token_arguments, check_window, positive_int, print_json)

HELP = "the paper's experiments (a)-(k) at small scale: report, JSON and figures"
REPORT = "report"
is_report = json_naming("reffuse experiments")  # a report folder written before folders were marked


def token_counts(text: str) -> tuple[int, ...]:
    """--scale-tokens: comma-separated token counts, each at least 128, ascending."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token counts: give e.g. 2048,8192,32768")
    if len(counts) < 2 or any(n < 128 for n in counts) or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"{text}: give at least two ascending counts of 128 tokens or more")
    return counts


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--out", required=True, type=Path, help="folder for README.md, experiments.json, figures")
    parser.add_argument("--drop-attention-count", type=positive_int, default=None, metavar="N",
                        help=f"{DROP_ATTENTION_COUNT_HELP} (default: 8 for smollm2, 2 for tiny)")
    add_token_arguments(parser, held_out=16384, calibration=2048, scoring=256, dependency=128)
    parser.add_argument("--window", type=positive_int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--decode-tokens", type=positive_int, default=32, help="tokens per decode timing (default 32)")
    parser.add_argument("--repeats", type=positive_int, default=15,
                        help="decode timing repeats: median and quartiles (default 15)")
    parser.add_argument("--scale-tokens", type=token_counts, default=SCALE_TOKENS, metavar="N,N,...",
                        help="(j): calibration tokens of each fit, ascending (default "
                             f"{','.join(map(str, SCALE_TOKENS))})")
    parser.add_argument("--regions", type=positive_int, default=1, metavar="N",
                        help="replicate over N attention-removal regions, the N cheapest windows of blocks (each a "
                             "full run into --out/region-K/, a summary in --out/README.md); default 1")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: judge the run already in --out (every region of it) again by the "
                             "current rules from its JSON, and rewrite its reports and figures in place, the "
                             "verdicts it recorded kept beside the new ones")
    add_overwrite_argument(parser, "the report reffuse wrote in --out")
    add_json_argument(parser)


def run(args) -> int:
    if args.report_only:
        return rewrite_reports(args.out)
    check_output_folder(args.out, args.overwrite, is_report, REPORT)  # before the long work
    check_window(args.model, args.window)
    figures = available("matplotlib")
    if not figures:
        note(f"figures will be skipped: drawing them needs matplotlib ({install_hint('real')})")
    count = args.drop_attention_count or (2 if args.model == "tiny" else 8)
    command = "reffuse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["experiments"] else \
        f"reffuse experiments --model {args.model} --out {args.out}"
    results = []
    # the whole study is built beside --out and published as one folder: an interrupted run leaves the old one
    with staged_folder(args.out, args.overwrite, is_report, REPORT) as staging:
        for rank in range(1, args.regions + 1):
            if args.regions > 1:
                note(f"region {rank} of {args.regions}")
            result = run_experiments(args.model, drop_count=count, held_out_tokens=args.held_out_tokens,
                                     calibration_tokens=args.calibration_tokens, scoring_tokens=args.scoring_tokens,
                                     dependency_tokens=args.dependency_tokens, window=args.window,
                                     decode_tokens=args.decode_tokens, repeats=args.repeats, region_rank=rank,
                                     scale_tokens=args.scale_tokens)
            folder = Path() if args.regions == 1 else Path(f"region-{rank}")
            result = dataclasses.replace(
                result, command=command if args.regions == 1 else f"{command}  (region {rank} of {args.regions})")
            drawn = write_report(result, staging / folder, figures)
            note(f"region {rank}: {len(drawn)} figures, {result.seconds / 60:.1f} minutes")
            results.append(result)
        if args.regions > 1:
            summary = region_summary(results, command, sum(r.seconds for r in results))
            write_json_atomic(staging / "regions.json", summary.to_json())
            write_text_atomic(staging / "README.md", regions_markdown(summary, command, summary.seconds / 60))
    note(f"wrote {args.out / 'README.md'} ({sum(r.seconds for r in results) / 60:.1f} minutes)")
    if args.json:
        print_json(results[0].to_json() if args.regions == 1 else
                   {"summary": summary.to_json(), "regions": [r.to_json() for r in results]})
    else:
        for result in results:
            if args.regions > 1:
                print(f"region {result.settings.region_rank}: attention removed "
                      f"{result.attention_removal.blocks_text}")
            for v in result.verdicts:
                print(f"({v.finding}) {v.title}: {v.verdict}\n    here: {v.here}")
    return 0


def rewrite_reports(out: Path) -> int:
    """--report-only: the run in `out` judged again (reffuse.experiments.run.rejudge), its JSON, reports and
    figures rewritten in place; a run over regions gets its summary rewritten too."""
    remedy = "give the --out folder of an earlier `reffuse experiments` run"
    regions = out / "regions.json"
    summary = RegionSummary.from_json(read_json(regions, remedy)) if regions.is_file() else None
    folders = [out / f"region-{r.rank}" for r in summary.regions] if summary else [out]
    for folder in folders:
        if not is_report(folder):
            raise ReffuseError(f"{folder} holds no experiments.json that reffuse experiments wrote: {remedy}")
    command = "reffuse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["experiments"] else \
        f"reffuse experiments --report-only --out {out}"
    figures = available("matplotlib")
    if not figures:
        note(f"figures will be kept as they are: drawing them needs matplotlib ({install_hint('real')})")
    results = []
    for folder in folders:
        result = rejudge(StudyResult.from_json(read_json(folder / "experiments.json", remedy)), command)
        write_report(result, folder, figures)
        changed = [f"({v.finding}) {was.verdict} -> {v.verdict}"
                   for v, was in zip(result.verdicts, result.verdicts_as_run) if v.verdict != was.verdict]
        print(f"{folder / 'README.md'}: {'; '.join(changed) or 'no verdict changed'}")
        results.append(result)
    if summary:
        summary = region_summary(results, summary.command, summary.seconds)
        write_json_atomic(regions, summary.to_json())
        write_text_atomic(out / "README.md", regions_markdown(summary, summary.command, summary.seconds / 60))
        print(out / "README.md")
    return 0


def write_report(result: StudyResult, folder: Path, figures: bool) -> list:
    """One region's experiments.json, README.md and figures into `folder`; returns the figures drawn."""
    report = markdown(result, result.command)  # before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "experiments.json", result.to_json(), inline_lists=True)
    write_text_atomic(folder / "README.md", report)
    return write_experiment_figures(result, folder) if figures else []
