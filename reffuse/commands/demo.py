"""The whole FFN Fusion pipeline on a real model: remove attention, measure, plan, fuse, calibrate, heal, compare.

1. attention removal (standing in for Puzzle): every block's attention scored by the KL damage of removing it
   alone on calibration text; the --drop-attention-count consecutive blocks of least summed score removed;
2. dependencies: the FFN-level dependency matrix M inside the attention-free run (reffuse.method.metrics);
3. a fusion plan: each adjacent pair of FFNs in the run fused alone and its KL damage scored on calibration text;
   the run without its last block cut into groups of at most --max-group-size blocks where the least of that
   damage is left inside the groups (reffuse.method.planning), or --groups as given;
4. fusion (Theorem 3.1), exact: fused vs parallel form, float32 and float64, on held-out text; the block
   layout before and after;
5. calibration: each fused down-projection refitted by ridge least squares on calibration text;
6. healing: the fused blocks distilled from the original on --training-tokens of training text, one short window
   per step (`reffuse heal` runs it at a larger budget);
7. quality on held-out text: perplexity, KL to the original and top-1 agreement, for the original,
   attention-removed, fused, calibrated and healed models; the approximation fusion makes (its parallel form
   against the sequential blocks it replaces);
8. speed: decode tokens/s and the time of the run's blocks, all models measured in one run, each ratio with its
   95% interval; a greedy continuation from each; a closing summary of the four steps in plain words.
Figures go to --out (default out/demo/MODEL/, which the next demo of the same model replaces; a folder given
with --out is replaced only with --overwrite). Calibration and held-out text are different plays.

The default model is SmolLM2-135M-Instruct (fetched on first use). `--model tiny` is the offline path: a
synthetic model with random weights and random token ids instead of text; it shows the mechanics, not quality.

examples:
  reffuse demo
  reffuse demo --json
  reffuse demo --model tiny
  reffuse demo --drop-attention-count 6 --max-group-size 3 --out out/demo-6
  reffuse demo --model tiny --groups 4-9 --norm last --json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reffuse.core.layout import format_groups, format_layers
from reffuse.commands.common import (add_attention_removal_arguments, add_device_argument, add_json_argument,
                                     add_overwrite_argument, add_token_arguments, format_table, groups_argument,
                                     positive_int, positive_number, print_json)
from reffuse.experiments.demo import PROMPT, DemoOptions, run_demo
from reffuse.experiments.demo_result import (CALIBRATED, FUSED, GIVEN_PLAN, HEALED, ORIGINAL, REMOVED, DecodeSpeed,
                                             DemoResult, RegionTime)
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS
from reffuse.core.fusion import NORM_MODES
from reffuse.optional import available, install_hint
from reffuse.outputs import check_output_folder, staged_folder
from reffuse.progress import note
from reffuse.speed.timing import ratio_text
from reffuse.stats import MIN_PAIRS, verdict

HELP = "the whole pipeline: remove attention, plan, fuse, calibrate, heal; quality, speed and samples"
FIGURE_SET = "demo figure set"


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2",
                        help="model name or folder (default: smollm2; tiny: synthetic, offline)")
    add_attention_removal_arguments(parser, "8 for smollm2, 2 for tiny; none when --groups is given")
    parser.add_argument("--groups", type=groups_argument, default=None,
                        help="runs to fuse, FIRST-LAST[,...] (default: planned from the damage of fusing each "
                             "adjacent pair)")
    parser.add_argument("--max-group-size", type=positive_int, default=4,
                        help="most blocks per planned group (default 4)")
    parser.add_argument("--norm", choices=NORM_MODES, default="fold",
                        help="fold: each block's norm gain folded into its weights (exact); last: the paper's")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=DEFAULT_WEIGHTING,
                        help=f"calibration: weigh each token's error relative to its stream norm, or not "
                             f"(default {DEFAULT_WEIGHTING}; see reffuse.method.calibrate)")
    parser.add_argument("--ridge", type=positive_number, default=DEFAULT_RIDGE,
                        help=f"calibration ridge, relative to the trace (default {DEFAULT_RIDGE:g})")
    add_token_arguments(parser, held_out=2048, calibration=2048, scoring=256, dependency=128, training=4096)
    parser.add_argument("--decode-tokens", type=positive_int, default=16, help="tokens per decode timing (default 16)")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timing repeats, alternated; medians, and speedups with the 95%% interval of their "
                             f"paired repeats (from {MIN_PAIRS} repeats on; default 7)")
    parser.add_argument("--sample-tokens", type=positive_int, default=12,
                        help="tokens of each greedy sample (default 12)")
    parser.add_argument("--prompt", default=PROMPT, help=f"prompt of the greedy samples (default {PROMPT!r})")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the figures (default out/demo/MODEL, replaced by the next demo of MODEL)")
    add_overwrite_argument(parser, "the demo's figures reffuse drew in --out")
    add_device_argument(parser)
    add_json_argument(parser)


def run(args) -> int:
    # the default folder is the demo's scratch space for the model: each demo of it replaces the last one's figures
    out = args.out or Path("out") / "demo" / (Path(args.model).name or "model")
    overwrite = args.overwrite or args.out is None
    check_output_folder(out, overwrite, None, FIGURE_SET)  # before the long work
    result = run_demo(DemoOptions.from_namespace(args))
    if not available("matplotlib"):  # the core install has no plotting; the rest still runs
        note(f"figures skipped: drawing them needs matplotlib ({install_hint('real')})")
        result = replace(result, figures=())
    else:
        from reffuse.plots.pipeline import write_demo_figures

        with staged_folder(out, overwrite, None, FIGURE_SET) as staging:
            names = [p.name for p in write_demo_figures(result, staging)]
        result = replace(result, figures=tuple(str(out / name) for name in names))
    note(f"done in {result.seconds:.0f} s; figures in {out}/")
    if args.json:
        print_json(result.to_json())
    else:
        print_report(result)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Printing


def layout_changes_table(changes) -> str:
    """The blocks that differ from the layers they stand for: the layers, the attention, the FFN widths."""
    rows = []
    for c in changes:
        had = [layer for layer, before in zip(c.layers, c.attention_before) if before]
        attention = "kept" if c.attention else f"removed from {format_layers(had)}" if had else "-"
        widths = c.ffn_widths_before
        width = f"{'+'.join(map(str, widths))} = {c.ffn_width}" if len(widths) > 1 else str(c.ffn_width)
        rows.append([c.block, format_layers(c.layers), attention, width])
    return format_table(["block", "layers as loaded", "attention", "FFN width"], rows)


def first_and_last_losses(losses: list) -> tuple[float, float, int]:
    """The mean loss of the first and of the last quarter of the steps (one step's windows are too few to
    compare alone), and the steps in a quarter."""
    quarter = max(1, len(losses) // 4)
    return sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter, quarter


def print_report(r: DemoResult) -> None:
    synthetic = "  [SYNTHETIC: random weights and random token ids, shows the mechanics only]"
    print(f"model: {r.model} ({r.model_name})" + (synthetic if r.synthetic else ""))
    for part, t in (("calibration", r.texts.calibration), ("held-out", r.texts.held_out)):
        spans = "; ".join(f"{s.title} chars {s.start}-{s.end}" for s in t.spans) or t.split
        print(f"{part} text: {t.tokens} tokens ({spans})")
    removal = r.attention_removal
    if removal:
        summed = f", summed single scores {removal.summed_score:.3g}" if removal.summed_score else ""
        print(f"\nattention removed: blocks {removal.blocks_text} ({removal.rule}{summed}; KL when removed together "
              f"{removal.joint_kl:.3g} nats)")
    rule = GIVEN_PLAN if r.plan is None else r.plan.rule
    by = f"; predictor: {r.plan.predictor}" if r.plan is not None and r.plan.predictor is not None else ""
    print(f"fusion plan: {format_groups(r.groups)} ({rule}{by}), norm {r.norm}\n")
    print(f"layout: {len(r.layout_before)} blocks as loaded, {len(r.layout_after)} after fusion; the blocks "
          "that changed (every other block is as loaded)\n" + layout_changes_table(r.layout_changes) + "\n")
    e = r.exactness
    print(f"fusion exactness on {e.tokens} held-out tokens, max |fused - parallel| / max |parallel| "
          "over the logits (Theorem 3.1: zero but for rounding)")
    print(format_table(["dtype", "relative error"], [["float32", f"{e.float32:.2e}"], ["float64", f"{e.float64:.2e}"]])
          + "\n")
    print("calibration (ridge least squares on calibration text), relative fit error of the run's update")
    print(format_table(["group", "tokens", "plain", "calibrated", "solved by"],
                       [[f"{f.group[0]}-{f.group[1]}", f.tokens, f"{f.fit_error_plain:.3e}",
                         f"{f.fit_error_calibrated:.3e}", f.form] for f in r.calibration]) + "\n")
    h = r.healing
    first, last, quarter = first_and_last_losses(h.losses)
    print(f"healing: the fused blocks ({h.weights:,} weights) distilled from the original on {h.tokens:,} "
          f"training tokens ({h.steps} steps, {h.seconds:.1f} s); the loss, KL(original || healed) on each "
          f"step's window, {first:.4g} over the first {quarter} steps, {last:.4g} over the last {quarter}. "
          "`reffuse heal` runs it at a larger budget\n")
    if r.quality is not None:
        print_quality(r)
    else:
        print("quality on held-out text: left out, and not computed. A synthetic model has random weights and reads "
              "random ids, so its perplexities and KLs measure nothing; run the demo on smollm2 for them.\n")
    print_speed_and_samples(r)
    print("\nin short\n" + "\n".join(f"  {line}" for line in summary_lines(r)))


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def print_quality(r: DemoResult) -> None:
    q, gap = r.quality, r.sequential_vs_parallel
    print(f"the approximation, on {gap.predictions} held-out predictions: the fused model (exactly the parallel "
          f"form) against the attention-removed model it was fused from (the same blocks run in sequence): KL "
          f"{gap.kl:.3g} nats, and the same most likely next token at {gap.top1_agreement:.1%} of positions. "
          "This is the price of running the run's FFNs in parallel; fusing them costs nothing more.\n")
    print(f"quality on held-out text ({q.predictions} predictions)")
    rows = []
    for name, s in q.models.items():
        if name == ORIGINAL:
            rows.append([name, f"{s.perplexity:.4g}", "0", "100%", "-"])
        else:
            rows.append([name, f"{s.perplexity:.4g}", f"{s.kl_vs_original:.4g}", f"{s.top1_vs_original:.1%}",
                         f"{s.kl_vs_attention_removed:.4g}"])
    print(format_table(["model", "perplexity", "KL vs original", "top-1 vs original", "KL vs attention removed"], rows))
    for name, closes in (("calibration", q.calibration_closes), ("healing", q.healing_closes)):
        print(f"{name} closes {percent(closes.kl_vs_attention_removed)} of the fusion gap in KL (to the attention-"
              f"removed model) and {percent(closes.perplexity)} of it in perplexity")
    print(f"calibrated KL to the original is {'lower' if q.calibrated_beats_plain_kl_vs_original else 'NOT lower'} "
          "than plain fusion's\n")


def speedup_text(row: DecodeSpeed | RegionTime) -> str:
    return ratio_text(row.speedup, row.speedup_interval_95)


def print_speed_and_samples(r: DemoResult) -> None:
    s = r.speed
    load = "" if s.load_average_1min is None else f", load average {s.load_average_1min:.1f}"
    intervals = ("its 95% interval over the paired repeats in brackets" if s.repeats >= MIN_PAIRS else
                 f"no 95% interval from fewer than {MIN_PAIRS} repeats")
    print(f"speed, float32, medians of {s.repeats} repeats timed in alternation in one run{load}; a speedup is "
          f"the original's median time over the model's, {intervals}")
    rows = [[name, f"{d.tokens_per_second:.1f}", speedup_text(d)] for name, d in s.decode.items()]
    print(format_table(["model", f"decode tokens/s ({s.decode_tokens} after {s.prompt_tokens})",
                        "vs original"], rows) + "\n")
    a, b = s.region
    names = list(s.decode)
    header = ["tokens"] + [f"{n} ms" for n in names] + [f"{n} vs original" for n in names[1:]]
    rows = [[row.tokens] + [f"{row.times[n].ms:.3f}" for n in names] + [speedup_text(row.times[n]) for n in names[1:]]
            for row in s.region_rows]
    print(f"time of blocks {a}-{b} (the attention-free run): with attention, FFNs one by one, fused")
    print(format_table(header, rows) + "\n")
    print(f"greedy samples, prompt {r.samples.prompt!r}")
    for name, text in r.samples.continuations.items():
        print(f"  {name:>18}: {text!r}")
    if r.figures:
        print(f"\nfigures: {', '.join(r.figures)}")


# ---------------------------------------------------------------------------------------------------------------
# The closing summary


def faster_or_slower(row: DecodeSpeed | RegionTime) -> str:
    """What a speedup's interval says, in words."""
    side = verdict(row.speedup_interval_95, 1.0, ">")
    return {"met": "faster", "not met": "slower"}.get(side, "not resolved either way" if row.speedup_interval_95
                                                      else "too few repeats to tell")


def won_back(share: float | None) -> str:
    if share is None:
        return "had no gap to close"
    return f"won back {share:.0%} of it" if share >= 0 else f"widened it by {-share:.0%}"


def summary_lines(r: DemoResult) -> list[str]:
    """The four steps in plain words: what attention removal and fusion cost, what calibration and healing won
    back, what fusion bought in speed on this machine."""
    removal, groups = r.attention_removal, format_groups(r.groups, ", ")
    exact, h = r.exactness, r.healing
    lines = []
    if r.quality is not None:
        q = r.quality.models
        removed, fused = q[REMOVED], q[FUSED]
        if removal:
            lines.append(f"1. Removing the attention of blocks {removal.blocks_text} cost "
                         f"{removed.kl_vs_original:.3g} nats of KL to the original on held-out text: perplexity "
                         f"{q[ORIGINAL].perplexity:.4g} -> {removed.perplexity:.4g}.")
        lines.append(f"2. Running the FFNs of {groups} in parallel cost {fused.kl_vs_attention_removed:.3g} nats "
                     f"more (perplexity {fused.perplexity:.4g}); fusing them into one FFN each added nothing "
                     f"(Theorem 3.1: {exact.float32:.0e} in float32).")
        calibration = won_back(r.quality.calibration_closes.kl_vs_attention_removed)
        healing = won_back(r.quality.healing_closes.kl_vs_attention_removed)
        lines.append(f"3. Of that cost in KL, calibration {calibration} (perplexity "
                     f"{q[CALIBRATED].perplexity:.4g}); healing, {h.steps} steps of distillation on "
                     f"{h.tokens:,} tokens, {healing} (perplexity {q[HEALED].perplexity:.4g}).")
    else:
        if removal:
            lines.append(f"1. The attention of blocks {removal.blocks_text} was removed; on a synthetic model its "
                         "cost in quality measures nothing and is left out.")
        lines.append(f"2. Fusing {groups} is exact: the fused model is the parallel form to {exact.float32:.1e} "
                     f"in float32 and {exact.float64:.1e} in float64 (Theorem 3.1).")
        fits = ", ".join(f"{f.group[0]}-{f.group[1]} {f.fit_error_plain:.2g} -> {f.fit_error_calibrated:.2g}"
                         for f in r.calibration)
        first, last, _ = first_and_last_losses(h.losses)
        lines.append(f"3. Calibration cut the relative fit error of each fused run's update ({fits}); healing's "
                     f"distillation loss went from {first:.3g} to {last:.3g} in {h.steps} steps.")
    s = r.speed
    name = list(s.decode)[-1]
    mine, original = s.decode[name], s.decode[ORIGINAL]
    a, b = s.region
    blocks = "; ".join(f"at {row.tokens} token{'s' if row.tokens > 1 else ''} {speedup_text(row.times[name])}, "
                       f"{faster_or_slower(row.times[name])}" for row in s.region_rows)
    lines.append(f"4. On this machine the {name} model decoded {mine.tokens_per_second:.1f} tokens/s against "
                 f"the original's {original.tokens_per_second:.1f}: {speedup_text(mine)}, {faster_or_slower(mine)}. "
                 f"Blocks {a}-{b} alone, against the original's: {blocks}.")
    return lines
