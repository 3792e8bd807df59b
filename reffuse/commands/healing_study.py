"""The healing study: does distillation recover what fusion costs? Held-out KL to the original and perplexity
against tokens of training, for the attention-removed model, the fused models (4 steps and 1 step, from plain
fusion and from the calibrated refit), FFN removal at the same number of sequential steps, and the original
model trained on the same text; then the findings (l)-(o), whose rules are committed before their points run.

Steps:
1. the starting models are rebuilt from SmolLM2 and the choices the committed fusion study recorded
   (reports/experiments/smollm2/experiments.json): which attention was removed, the fusion plans, the refit;
2. the learning rate of each objective is chosen on calibration text at the smallest budget;
3. every point (variant, objective, budget, seed) trains and is scored on held-out text, cheapest first; each is
   saved as it finishes, training checkpoints beside the folder (OUT.checkpoints), so the same command resumes
   an interrupted study where it stopped. A line per training step on stderr;
4. after every point the report is redrawn: OUT/README.md, OUT/recovery.png, OUT/findings.json (verdicts and
   curves); --report-only redraws it without training.
The whole study takes many hours on 2 cores: --up-to runs only the points up to a budget, and later calls go on.

examples:
  reffuse healing-study --out reports/healing/study --up-to 16384
  reffuse healing-study --out reports/healing/study
  reffuse healing-study --out reports/healing/study --report-only
"""

from __future__ import annotations

from pathlib import Path

from reffuse.commands.common import add_json_argument, print_json, positive_int
from reffuse.errors import ReffuseError
from reffuse.experiments.healing.report import FIGURE, HealingSummary, write_report
from reffuse.experiments.healing.study import run_study
from reffuse.optional import available
from reffuse.options import as_recorded

HELP = "the healing study: recovery curves of fused, attention-removed and FFN-removed models, and its findings"


def add_arguments(parser):
    parser.add_argument("--out", required=True,
                        help="the study's folder: new, or one this command made (then it continues the study)")
    parser.add_argument("--up-to", type=positive_int, default=None, metavar="TOKENS",
                        help="run only the points of at most this many training tokens (default: all)")
    parser.add_argument("--report-only", action="store_true",
                        help="redraw the report from the folder's points, training nothing")
    add_json_argument(parser)


def command_line(args) -> str:
    """The command that runs the study (without --up-to, which only stops it early), its folder relative."""
    return f"reffuse healing-study --out {as_recorded(str(args.out))}"


def publish(folder: Path, command: str) -> HealingSummary:
    """The report and, with matplotlib, the recovery figure, from the folder's points."""
    summary = write_report(folder, command)
    if summary.curves and available("matplotlib"):
        from reffuse.plots.healing import write_recovery_figure
        write_recovery_figure(summary.curves, "SmolLM2-135M: held-out KL to the original while healing",
                              folder / FIGURE)
    return summary


def run(args) -> int:
    folder = Path(args.out)
    if args.report_only:
        if not (folder / "study.json").is_file():
            raise ReffuseError(f"{folder} holds no healing study (no study.json): run `reffuse healing-study "
                               f"--out {folder}` first")
    else:
        run_study(folder, up_to=args.up_to, report=lambda f: publish(f, command_line(args)))
    summary = publish(folder, command_line(args))
    if args.json:
        print_json(summary.to_json())
    else:
        for v in summary.verdicts:
            print(f"({v.finding}) {v.title}: {v.verdict}")
        print(f"{summary.points} points, {summary.seconds / 3600:.1f} hours; report in {folder / 'README.md'}")
    return 0
