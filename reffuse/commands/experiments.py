"""The paper's experiments at small scale: a Markdown report, its JSON and its figures.

On the model (SmolLM2 by default), attention is removed from the --drop-attention-count consecutive blocks whose
single removals cost least; the attention-free run this makes, without its last block, is the span fused. Then:
(a) fusion intensity, the span fused into fewer and fewer groups; (b) FFN removal vs fusion at equal depth
reduction, with decode latency measured in the same run; (c) including vs leaving out the run's last FFN;
(d) reversed FFN order vs fusion; (e) full-block parallelization by the paper's greedy windows, 1 to 4 steps;
(f) norm fold vs last; (g) calibrated vs plain fusion. Quality is KL to the pre-fusion model and perplexity on
held-out text; everything fitted or chosen reads calibration text only. reffuse.experiments.run documents each choice.

The report (README.md) says, finding by finding, whether the paper's observation held here, with the numbers.
It takes minutes on 2 cores (progress on stderr). The synthetic tiny model runs the same code in seconds, to
check it, not to learn anything.

examples:
  reffuse experiments --out reports/experiments/smollm2
  reffuse experiments --model tiny --drop-attention-count 2 --out /tmp/experiments-tiny
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from reffuse.experiments.report import markdown
from reffuse.experiments.run import run_experiments
from reffuse.optional import available, install_hint
from reffuse.plots.experiments import write_experiment_figures
from reffuse.progress import note
from reffuse.files import check_output_folder, write_json_atomic, write_text_atomic
from reffuse.commands.common import (DROP_ATTENTION_COUNT_HELP, add_json_argument, add_token_arguments, positive_int,
                                     print_json)

HELP = "the paper's experiments (a)-(g) at small scale: report, JSON and figures"


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--out", required=True, type=Path, help="folder for README.md, experiments.json, figures")
    parser.add_argument("--drop-attention-count", type=positive_int, default=None, metavar="N",
                        help=f"{DROP_ATTENTION_COUNT_HELP} (default: 8 for smollm2, 2 for tiny)")
    add_token_arguments(parser, held_out=2048, calibration=2048, scoring=256, dependency=128)
    parser.add_argument("--window", type=positive_int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--decode-tokens", type=positive_int, default=32, help="tokens per decode timing (default 32)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="decode timing repeats, median (default 5)")
    add_json_argument(parser)


def run(args) -> int:
    check_output_folder(args.out, overwrite=True, what="report")  # before the long work
    figures = available("matplotlib")
    if not figures:
        note(f"figures will be skipped: drawing them needs matplotlib ({install_hint('real')})")
    count = args.drop_attention_count or (2 if args.model == "tiny" else 8)
    result = run_experiments(args.model, drop_count=count, held_out_tokens=args.held_out_tokens,
                             calibration_tokens=args.calibration_tokens, scoring_tokens=args.scoring_tokens,
                             dependency_tokens=args.dependency_tokens, window=args.window,
                             decode_tokens=args.decode_tokens, repeats=args.repeats)
    command = "reffuse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["experiments"] else \
        f"reffuse experiments --model {args.model} --out {args.out}"
    result["command"] = command
    write_json_atomic(args.out / "experiments.json", result)
    write_text_atomic(args.out / "README.md", markdown(result, command))
    figures = write_experiment_figures(result, args.out) if figures else []
    note(f"wrote {args.out / 'README.md'}, {args.out / 'experiments.json'} and {len(figures)} figures "
         f"({result['seconds'] / 60:.1f} minutes)")
    if args.json:
        print_json(result)
    else:
        for v in result["verdicts"]:
            print(f"({v['finding']}) {v['title']}: {v['verdict']}\n    here: {v['here']}")
    return 0
