"""Remove attention, fuse runs of attention-free blocks (optionally calibrated) and save the model.

Steps (attention removal and calibration optional; the groups come from --groups or --plan auto):
1. attention removal: --drop-attention BLOCKS removes the attention of the blocks given; --drop-attention-count N
   scores every block's attention by the KL damage of removing it alone (on calibration text) and removes the
   N consecutive blocks of least summed score (as `reffuse demo` does, on the same text);
2. the groups to fuse: --groups as given, or --plan auto, which fuses each adjacent pair of FFNs inside the
   attention-free runs alone and scores its KL damage on calibration text (the neighbour damage), then cuts each
   run (without its last block, as the paper does; --include-last keeps it) into groups of at most
   --max-group-size blocks where the least damage is left inside the groups (reffuse.method.planning says why
   this predictor and not the paper's cosine dependency);
3. fusion (Theorem 3.1) with --norm fold (exact) or last (the paper's), and with --calibrate each fused
   down-projection refitted by ridge least squares on calibration text (reffuse.method.calibrate);
4. the model is saved to --out (config.json, model.safetensors), with the tokenizer beside it and fuse.json,
   which records every choice, score and text span, so `reffuse eval`, `generate` and `bench` take the folder.

Calibration text comes from the corpus' calibration plays, never from the held-out play that `reffuse eval`
scores. The synthetic tiny model has no tokenizer: random token ids stand in for text, and no tokenizer is saved.

examples:
  reffuse fuse --model smollm2 --drop-attention 5-12 --groups 5-8,9-11 --out out/fused-smollm2
  reffuse fuse --model smollm2 --drop-attention-count 8 --plan auto --calibrate --out out/fused-smollm2
  reffuse eval --model out/fused-smollm2 --base smollm2
  reffuse fuse --model tiny --groups 4-8 --norm last --out out/fused-tiny
"""

from __future__ import annotations

from pathlib import Path

from reffuse.core.layout import format_groups
from reffuse.commands.common import (add_attention_removal_arguments, add_device_argument, add_json_argument,
                                     add_token_arguments, format_table, groups_argument, positive_int,
                                     positive_number, print_json)
from reffuse.core.fusion import NORM_MODES
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS
from reffuse.method.pipeline import FuseOptions, fuse_and_save

HELP = "remove attention, fuse runs of FFNs (optionally calibrated) and save the model"


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    add_attention_removal_arguments(parser)
    plan = parser.add_mutually_exclusive_group(required=True)
    plan.add_argument("--groups", type=groups_argument, help="runs to fuse, FIRST-LAST[,FIRST-LAST...]")
    plan.add_argument("--plan", choices=["auto"],
                      help="auto: propose groups from the damage of fusing each adjacent FFN pair")
    parser.add_argument("--max-group-size", type=positive_int, default=4,
                        help="--plan auto: most blocks per group (default 4)")
    parser.add_argument("--include-last", action="store_true",
                        help="--plan auto: fuse each run's last block too (the paper leaves it out)")
    parser.add_argument("--norm", choices=NORM_MODES, default="fold",
                        help="fold: each block's norm gain folded into its weights (exact); last: the paper's")
    parser.add_argument("--calibrate", action="store_true", help="refit each fused down-projection on calibration text")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=DEFAULT_WEIGHTING,
                        help=f"calibration: weigh each token's error relative to its stream norm, or not "
                             f"(default {DEFAULT_WEIGHTING}; see reffuse.method.calibrate)")
    parser.add_argument("--ridge", type=positive_number, default=DEFAULT_RIDGE,
                        help=f"--calibrate: ridge, relative to the trace of HᵀH (default {DEFAULT_RIDGE:g})")
    add_token_arguments(parser, calibration=2048, scoring=256)
    parser.add_argument("--out", required=True, help="folder to write the model into (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model already in --out (only a folder that reffuse saved is replaced)")
    add_device_argument(parser)
    add_json_argument(parser)


def run(args) -> int:
    record = fuse_and_save(FuseOptions.from_namespace(args))
    out = Path(args.out)
    if args.json:
        print_json(record.to_json())
        return 0
    removal = record.attention_removal
    if removal is not None:
        print(f"attention removed: blocks {removal.blocks_text} ({removal.rule})"
              + (f"; joint KL on calibration text {removal.joint_kl:.3e} nats" if removal.joint_kl is not None else ""))
    print(f"fused groups ({args.norm}): {format_groups(record.groups, ', ')}")
    for fit in record.calibration or ():
        print(f"calibrated {fit.group[0]}-{fit.group[1]}: relative fit error on {fit.tokens} calibration "
              f"tokens {fit.fit_error_plain:.3e} -> {fit.fit_error_calibrated:.3e}")
    print(format_table(["block", "attention", "FFN width", "fused from"],
                       [[i, "yes" if b.attention else "-", b.ffn_width, ",".join(map(str, b.fused_from)) or "-"]
                        for i, b in enumerate(record.layout)]))
    print(f"\nsaved to {out}; score it with: reffuse eval --model {out} --base {args.model}")
    return 0
