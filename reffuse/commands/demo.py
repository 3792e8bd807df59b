"""The whole FFN Fusion pipeline on a real model: remove attention, measure, plan, fuse, calibrate, compare.

1. attention removal (standing in for Puzzle): every block's attention scored by the KL damage of removing it
   alone on calibration text; the --drop-attention-count consecutive blocks of least summed score removed;
2. dependencies: the FFN-level dependency matrix M inside the attention-free run (reffuse.method.metrics);
3. a fusion plan from M: the run without its last block, cut into groups of at most --max-group-size blocks
   where the least dependency crosses (reffuse.method.planning), or --groups as given;
4. fusion (Theorem 3.1), exact: fused vs parallel form, float32 and float64; the approximation fusion makes,
   sequential vs parallel; the block layout before and after;
5. calibration: each fused down-projection refitted by ridge least squares on calibration text;
6. quality on held-out text: perplexity, KL to the original and top-1 agreement, for the original,
   attention-removed, fused and calibrated models; speed: decode tokens/s and the time of the run's blocks,
   all models measured in one run; a greedy continuation from each.
Figures go to --figures (default ./reffuse-demo/). Calibration and held-out text are different plays.

The default model is SmolLM2-135M-Instruct (fetched on first use). `--model tiny` is the offline path: a
synthetic model with random weights and random token ids instead of text; it shows the mechanics, not quality.

examples:
  reffuse demo
  reffuse demo --json
  reffuse demo --model tiny
  reffuse demo --drop-attention-count 6 --max-group-size 3 --figures /tmp/demo-figures
  reffuse demo --model tiny --groups 4-9 --norm last --json
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from reffuse.speed.bench import reffuse_decode, time_decode
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS, calibrated_fuse, check_calibration_tokens
from reffuse.errors import ReffuseError
from reffuse.core.fusion import NORM_MODES, fuse, with_last_norm
from reffuse.core.generate import generate
from reffuse.formats.registry import load_model
from reffuse.method.metrics import matrix_to_json
from reffuse.core.model import Model, block_forward, cast, forward, layout, original_layers, rope_tables
from reffuse.method.pipeline import choose_attention_removal, is_synthetic, load_texts, plan_fusion
from reffuse.plots import save_figure
from reffuse.evaluation.prefix import cache_prefix, score_variant
from reffuse.progress import Progress, note
from reffuse.method.removal import attention_free_runs, drop_attention
from reffuse.speed.timing import blas_threads, compare_seconds
from reffuse.commands.common import format_table, groups_argument, print_json
from reffuse.commands.fuse import layers_argument

HELP = "the whole pipeline: remove attention, plan, fuse, calibrate; quality, speed and samples"
DEFAULT_DROP = {"smollm2": 8, "tiny": 2}
PROMPT = "The capital of France is"
STEPS = 7


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2",
                        help="model name or folder (default: smollm2; tiny: synthetic, offline)")
    drop = parser.add_mutually_exclusive_group()
    drop.add_argument("--drop-attention", type=layers_argument, metavar="BLOCKS",
                      help="remove the attention of these blocks (e.g. 12-19) instead of choosing by score")
    drop.add_argument("--drop-attention-count", type=int, metavar="N",
                      help="remove the N consecutive attentions of least summed removal score "
                           "(default: 8 for smollm2, 2 for tiny; none when --groups is given)")
    parser.add_argument("--groups", type=groups_argument, default=None,
                        help="runs to fuse, FIRST-LAST[,...] (default: planned from the dependencies)")
    parser.add_argument("--max-group-size", type=int, default=4, help="most blocks per planned group (default 4)")
    parser.add_argument("--norm", choices=NORM_MODES, default="fold",
                        help="fold: each block's norm gain folded into its weights (exact); last: the paper's")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=DEFAULT_WEIGHTING,
                        help=f"calibration: weigh each token's error relative to its stream norm, or not "
                             f"(default {DEFAULT_WEIGHTING}; see reffuse.method.calibrate)")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                        help=f"calibration ridge, relative to the trace (default {DEFAULT_RIDGE:g})")
    parser.add_argument("--held-out-tokens", type=int, default=512, help="held-out tokens scored (default 512)")
    parser.add_argument("--calibration-tokens", type=int, default=1024,
                        help="calibration tokens for the refit (default 1024)")
    parser.add_argument("--scoring-tokens", type=int, default=128,
                        help="calibration tokens for the removal scores (default 128)")
    parser.add_argument("--dependency-tokens", type=int, default=64,
                        help="calibration tokens for the dependency matrix (default 64)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens of the exactness check (default 32)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens per decode timing (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats; the median is reported (default 5)")
    parser.add_argument("--sample-tokens", type=int, default=12, help="tokens of each greedy sample (default 12)")
    parser.add_argument("--prompt", default=PROMPT, help=f"prompt of the greedy samples (default {PROMPT!r})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ids of the exactness check")
    parser.add_argument("--figures", type=Path, default=Path("reffuse-demo"),
                        help="folder for the figures (default ./reffuse-demo)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def relative_error(a, b) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def step(number: int, text: str) -> None:
    note(f"[{number}/{STEPS}] {text}")


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def exactness(removed: Model, groups, norm: str, tokens: int, seed: int) -> dict:
    """Fused vs the parallel form (Theorem 3.1: equal) in float32 and float64, and sequential vs parallel
    (the approximation) in float64, on random token ids."""
    ids = np.random.default_rng(seed).integers(0, removed.config.vocab_size, tokens)
    errors = {}
    model64 = cast(removed, "float64")
    for dtype, model in (("float32", removed), ("float64", model64)):
        reference = model if norm == "fold" else with_last_norm(model, groups)
        parallel = forward(reference, ids, parallel_groups=groups)
        errors[dtype] = relative_error(forward(fuse(model, groups, norm=norm), ids), parallel)
    sequential = forward(model64, ids)
    parallel = forward(model64 if norm == "fold" else with_last_norm(model64, groups), ids, parallel_groups=groups)
    gap = {"max_abs_logit_difference": float(np.max(np.abs(parallel - sequential))),
           "relative_logit_difference": relative_error(parallel, sequential),
           "top1_agreement": float(np.mean(parallel.argmax(-1) == sequential.argmax(-1))), "tokens": tokens}
    return {"fused_vs_parallel_relative_error": errors, "sequential_vs_parallel": gap}


def region_seconds(models: dict, region: tuple[int, int], tokens: int, repeats: int, dim: int) -> dict:
    """Median seconds to run the blocks of `region` (numbered as in the unfused model) on `tokens` positions,
    per model, timed in alternation. Fused models run the blocks that stand for those layers."""
    rng = np.random.default_rng(0)
    fns = {}
    for name, model in models.items():
        x = rng.standard_normal((tokens, dim)).astype(model.dtype)
        cos, sin = rope_tables(np.arange(tokens), model.config.head_dim, model.config.rope_theta, model.dtype)
        layers = [i for i, span in enumerate(original_layers(model)) if region[0] <= span[0] <= region[1]]

        def run(model=model, x=x, cos=cos, sin=sin, layers=layers):
            for layer in layers:
                x = block_forward(model, layer, x, cos, sin)
            return x
        fns[name] = run
    return compare_seconds(fns, repeats)


def samples(models: dict, tokenizer, prompt: str, tokens: int, vocab: int) -> dict:
    """A greedy continuation of the prompt from each model (token ids for the synthetic model)."""
    ids = tokenizer.encode(prompt) if tokenizer else list(np.random.default_rng(3).integers(0, vocab, 8))
    out = {"prompt": prompt if tokenizer else [int(i) for i in ids], "continuations": {}}
    for name, model in models.items():
        new = generate(model, ids, tokens)
        out["continuations"][name] = tokenizer.decode(new) if tokenizer else [int(i) for i in new]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run


def run(args) -> int:
    started = time.perf_counter()
    count = args.drop_attention_count
    if args.drop_attention is None and count is None and args.groups is None:
        count = DEFAULT_DROP.get(args.model, DEFAULT_DROP["smollm2"])
    if count is not None and count < 1:
        raise ReffuseError(f"--drop-attention-count {count} must be at least 1")
    original = load_model(args.model)
    synthetic = is_synthetic(args.model, original)
    result = {"model": args.model, "model_name": original.config.name, "synthetic": synthetic, "norm": args.norm}
    with blas_threads(None):
        step(1, "text: calibration and held-out windows")
        texts = load_texts(args.model, original, args.calibration_tokens, args.held_out_tokens)
        check_calibration_tokens(texts.calibration.ids.size)
        result["texts"] = texts.describe()

        step(2, "attention removal")
        removal = None
        if args.drop_attention is not None or count is not None:
            removal = choose_attention_removal(original, texts.scoring(args.scoring_tokens, 128),
                                               blocks=args.drop_attention, count=count,
                                               contiguous=args.drop_attention is None)
        removed = drop_attention(original, removal["blocks"]) if removal else original
        result["attention_removal"] = removal

        step(3, "dependencies and the fusion plan")
        if args.groups is not None:
            groups, M = args.groups, None
            result["plan"] = {"groups": [list(g) for g in groups], "rule": "given (--groups)"}
        else:
            plan, M = plan_fusion(removed, texts.scoring(args.dependency_tokens, 64), args.max_group_size)
            groups = plan.groups
            result["plan"] = plan.to_json()
            if not groups:
                raise ReffuseError("the plan has no group to fuse (the attention-free runs are too short): remove more "
                                   "attention (--drop-attention-count)")
        fused = fuse(removed, groups, norm=args.norm)  # checks the groups: clear errors before any long work
        runs = attention_free_runs(removed)
        region = next(r for r in runs if r[0] <= groups[0][0] <= r[1])
        result.update(groups=[list(g) for g in groups], region=list(region))
        if M is not None:
            result["ffn_dependency"] = {"matrix": matrix_to_json(M), "tokens": args.dependency_tokens}

        step(4, "fusion: exactness and the sequential-vs-parallel gap")
        result.update(exactness(removed, groups, args.norm, args.tokens, args.seed))
        result.update(layout_before=layout(original), layout_removed=layout(removed), layout_after=layout(fused))

        step(5, "calibration of the fused down-projections")
        with Progress("calibrating fused groups", len(groups), "groups") as bar:
            calibrated, fits = calibrated_fuse(removed, groups, texts.calibration.ids, norm=args.norm,
                                               ridge=args.ridge, progress=bar.update, weighting=args.weighting)
        result["calibration"] = [f.as_dict() for f in fits]

        step(6, "quality on held-out text")
        first = min(removal["blocks"][0], groups[0][0]) if removal else groups[0][0]
        with Progress("scoring on held-out text", 5, "models") as bar:
            judge = cache_prefix(original, texts.held_out.ids)
            bar.update()
            before_fusion = cache_prefix(removed, texts.held_out.ids)
            bar.update()
            models = {"attention removed": removed, "fused": fused, "fused, calibrated": calibrated}
            quality = {"original": {"perplexity": score_variant(judge, original, len(original.blocks))["perplexity"]}}
            for name, model in models.items():
                s = score_variant(judge, model, first, reference=before_fusion)
                quality[name] = {"perplexity": s["perplexity"], "kl_vs_original": s["kl_from_base"],
                                 "top1_vs_original": s["top1_agreement"],
                                 "kl_vs_attention_removed": s["kl_from_reference"] if model is not removed else 0.0}
                bar.update()
        plain, cal = quality["fused"], quality["fused, calibrated"]
        ppl_gap = plain["perplexity"] - quality["attention removed"]["perplexity"]
        result["quality"] = {
            "models": quality, "predictions": judge.predictions,
            "calibration_closes": {
                "kl_vs_attention_removed": 1 - cal["kl_vs_attention_removed"] / plain["kl_vs_attention_removed"],
                "perplexity": (plain["perplexity"] - cal["perplexity"]) / ppl_gap if ppl_gap else None},
            "calibrated_beats_plain_kl_vs_original": cal["kl_vs_original"] < plain["kl_vs_original"]}

        step(7, "speed (one run, in alternation) and greedy samples")
        speed_models = {"original": original, "attention removed": removed, "fused": calibrated}
        prompt = texts.held_out.ids[0][:32]
        seconds, _ = time_decode({name: (lambda p, n, m=m: reffuse_decode(m, p, n))
                                  for name, m in speed_models.items()}, prompt, args.decode_tokens, args.repeats)
        decode = {name: {"tokens_per_second": args.decode_tokens / s, "ms_per_token": 1e3 * s / args.decode_tokens,
                         "speedup": seconds["original"] / s} for name, s in seconds.items()}
        region_rows = []
        for tokens in (1, 128):
            times = region_seconds(speed_models, region, tokens, args.repeats, original.config.dim)
            region_rows.append({"tokens": tokens, **{name: {"ms": 1e3 * t, "speedup": times["original"] / t}
                                                     for name, t in times.items()}})
        result["speed"] = {"decode": decode, "decode_tokens": args.decode_tokens, "prompt_tokens": len(prompt),
                           "region": list(region), "region_rows": region_rows, "repeats": args.repeats}
        result["samples"] = samples({"original": original, **models}, texts.tokenizer, args.prompt,
                                    args.sample_tokens, original.config.vocab_size)

    if importlib.util.find_spec("matplotlib") is None:  # the core install has no plotting; the rest still runs
        note("figures skipped: drawing them needs matplotlib (pip install 'reffuse[real]')")
        result["figures"] = []
    else:
        result["figures"] = [str(p) for p in write_figures(result, args.figures)]
    result["seconds"] = time.perf_counter() - started
    note(f"done in {result['seconds']:.0f} s; figures in {args.figures}/")
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


def write_figures(result: dict, folder: Path) -> list[Path]:
    from reffuse.plots.dependency import dependency_heatmap
    from reffuse.plots.layout import layout_figure
    from reffuse.plots.pipeline import pipeline_summary_figure
    from reffuse.plots.removal import attention_scores_figure

    name = result["model_name"]
    removed_blocks = [r["block"] for r in result["layout_removed"] if not r["attention"]]
    figures = {"layout.png": layout_figure({f"{name} as loaded": result["layout_before"],
                                            "attention removed": result["layout_removed"],
                                            f"fused ({result['norm']}): {_groups_text(result['groups'])}":
                                                result["layout_after"]}, "Block layout before and after fusion"),
               "quality_speed.png": pipeline_summary_figure(result)}
    removal = result["attention_removal"]
    if removal and removal.get("scores"):
        figures["attention_scores.png"] = attention_scores_figure(removal, f"Attention removal scores, {name}")
    if "ffn_dependency" in result:
        matrix = result["ffn_dependency"]["matrix"]
        measured = 1 + max(i for i, row in enumerate(matrix) if any(v is not None for v in row[i + 1:]))
        matrix = [row[:measured + 1] for row in matrix[:measured + 1]]  # blocks 0..measured (the rest not run)
        figures["ffn_dependency.png"] = dependency_heatmap(
            matrix, f"{name}: FFN-level dependency, attention removed ({result['ffn_dependency']['tokens']} tokens)",
            removed_blocks)
    return [save_figure(fig, folder / file) for file, fig in figures.items()]


# ---------------------------------------------------------------------------------------------------------------
# Printing


def _groups_text(groups) -> str:
    return ",".join(f"{a}-{b}" for a, b in groups)


def layout_table(rows) -> str:
    return format_table(["block", "attention", "FFN width", "fused from"],
                        [[r["block"], "yes" if r["attention"] else "-", r["ffn_width"],
                          ",".join(map(str, r["fused_from"])) or "-"] for r in rows])


def print_report(r: dict) -> None:
    out = sys.stdout
    texts = r["texts"]
    synthetic = "  [SYNTHETIC: random weights and random token ids, shows the mechanics only]"
    print(f"model: {r['model']} ({r['model_name']})" + (synthetic if r["synthetic"] else ""), file=out)
    for part in ("calibration", "held_out"):
        t = texts[part]
        spans = "; ".join(f"{s['title']} chars {s['start']}-{s['end']}" for s in t["spans"]) or t["split"]
        print(f"{part.replace('_', '-')} text: {t['tokens']} tokens ({spans})")
    removal = r["attention_removal"]
    if removal:
        joint = f"; KL when removed together {removal['joint_kl']:.3g} nats" if "joint_kl" in removal else ""
        summed = f", summed single scores {removal['summed_score']:.3g}" if removal.get("summed_score") else ""
        print(f"\nattention removed: blocks {removal['blocks_text']} ({removal['rule']}{summed}{joint})")
    print(f"fusion plan: {_groups_text(r['groups'])} ({r['plan'].get('rule', 'given')}), norm {r['norm']}\n")
    print("layout before fusion (attention removed)\n" + layout_table(r["layout_removed"]) + "\n")
    print("layout after fusion\n" + layout_table(r["layout_after"]) + "\n")
    errors, gap = r["fused_vs_parallel_relative_error"], r["sequential_vs_parallel"]
    print("fusion exactness, max |fused - parallel| / max |parallel| over the logits (Theorem 3.1: zero)")
    print(format_table(["dtype", "relative error"], [[k, f"{v:.2e}"] for k, v in errors.items()]) + "\n")
    print(f"the approximation, parallel form vs sequential model (float64 logits, {gap['tokens']} random tokens)")
    print(format_table(["max |diff|", "relative", "top-1 agreement"],
                       [[gap["max_abs_logit_difference"], f"{gap['relative_logit_difference']:.3e}",
                         f"{gap['top1_agreement']:.1%}"]]) + "\n")
    print("calibration (ridge least squares on calibration text), relative fit error of the run's update")
    print(format_table(["group", "tokens", "plain", "calibrated", "solved by"],
                       [[f"{f['group'][0]}-{f['group'][1]}", f["tokens"], f"{f['fit_error_plain']:.3e}",
                         f"{f['fit_error_calibrated']:.3e}", f["form"]] for f in r["calibration"]]) + "\n")
    q = r["quality"]
    print(f"quality on held-out text ({q['predictions']} predictions)")
    rows = []
    for name, s in q["models"].items():
        if name == "original":
            rows.append([name, f"{s['perplexity']:.4g}", "0", "100%", "-"])
        else:
            rows.append([name, f"{s['perplexity']:.4g}", f"{s['kl_vs_original']:.4g}", f"{s['top1_vs_original']:.1%}",
                         f"{s['kl_vs_attention_removed']:.4g}"])
    print(format_table(["model", "perplexity", "KL vs original", "top-1 vs original", "KL vs attention removed"], rows))
    closes = q["calibration_closes"]
    ppl = f"{closes['perplexity']:.0%}" if closes["perplexity"] is not None else "-"
    print(f"calibration closes {closes['kl_vs_attention_removed']:.0%} of the fusion gap in KL (to the attention-"
          f"removed model) and {ppl} of it in perplexity; calibrated KL to the original is "
          f"{'lower' if q['calibrated_beats_plain_kl_vs_original'] else 'NOT lower'} than plain fusion's\n")
    s = r["speed"]
    print(f"speed, float32, medians of {s['repeats']} timed in alternation in one run")
    rows = [[name, f"{d['tokens_per_second']:.1f}", f"{d['speedup']:.2f}x"] for name, d in s["decode"].items()]
    print(format_table(["model", f"decode tokens/s ({s['decode_tokens']} after {s['prompt_tokens']})",
                        "vs original"], rows) + "\n")
    a, b = s["region"]
    header = ["tokens"] + [f"{n} ms" for n in s["decode"]] + [f"{n} vs original" for n in list(s["decode"])[1:]]
    rows = [[row["tokens"]] + [f"{row[n]['ms']:.3f}" for n in s["decode"]]
            + [f"{row[n]['speedup']:.2f}x" for n in list(s["decode"])[1:]] for row in s["region_rows"]]
    print(f"time of blocks {a}-{b} (the attention-free run): with attention, FFNs one by one, fused")
    print(format_table(header, rows) + "\n")
    sample = r["samples"]
    print(f"greedy samples, prompt {sample['prompt']!r}")
    for name, text in sample["continuations"].items():
        print(f"  {name:>18}: {text!r}")
    if r["figures"]:
        print(f"\nfigures: {', '.join(r['figures'])}")
