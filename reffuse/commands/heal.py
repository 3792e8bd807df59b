"""Heal a fused (or attention-removed) model by knowledge distillation from the model it came from.

The paper's third step (§3): after attention removal and fusion, the model is trained to match its teacher's
next-token distributions, KL(teacher || student) at temperature τ (times τ²), on text it is never scored on.

Steps:
1. the student (--model, a folder `reffuse fuse` saved) and the teacher (--teacher) are loaded;
2. --train chooses what trains: fused (the fused blocks), run (every attention-free block), 'blocks A-B', all;
   every other weight stays as it is, and gets no weight-gradient work;
3. held-out text (the corpus' held-out plays, --held-out-tokens in windows of --window; never trained on)
   scores the student:
   KL to the teacher and perplexity;
4. --training-tokens of training text (the corpus' 27 training plays and poems, disjoint from held-out and calibration
   text; another epoch where the budget is larger) in windows of --window tokens, --windows-per-step per AdamW
   step (the mean gradient), learning rate with linear warm-up over --warmup-fraction of the steps, then cosine
   decay to --final-fraction of it; gradients clipped to a global norm of --clip. A line per step on stderr:
   step, tokens, loss, tokens/s, time left. A checkpoint is written every --checkpoint-every steps beside --out
   (OUT.checkpoint/); after an interruption the same command with --resume continues where it was, with the same
   result as a run that was never interrupted;
5. the healed model is scored on the same held-out text and saved to --out with heal.json (every choice, the
   loss curve, held-out KL and perplexity before and after). `reffuse eval`, `generate`, `verify`, `export` and
   `bench` take the folder.

examples:
  reffuse fuse --model smollm2 --drop-attention-count 8 --plan auto --out out/fused
  reffuse heal --model out/fused --teacher smollm2 --training-tokens 65536 --train fused --out out/healed
  reffuse heal --model out/fused --teacher smollm2 --training-tokens 65536 --train fused --out out/healed --resume
  reffuse fuse --model tiny --groups 4-8 --out out/fused-tiny
  reffuse heal --model out/fused-tiny --teacher tiny --training-tokens 4096 --window 64 --out out/healed-tiny
"""

from __future__ import annotations

from reffuse.commands.common import (add_device_argument, add_json_argument, add_token_arguments, check_window,
                                     non_negative_int, non_negative_number, number_argument, positive_int,
                                     positive_number, print_json)
from reffuse.experiments.heal import HealOptions, run_heal, summary
from reffuse.training.trainer import TRAIN_CHOICES

HELP = "heal a fused model by knowledge distillation from the model it came from"

D = HealOptions  # the defaults, declared once there

fraction = number_argument(float, "a number", lambda v: 0 <= v <= 1, lambda v: f"{v:g} is not in [0, 1]")


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="the student: a folder `reffuse fuse` saved, or a model name")
    parser.add_argument("--teacher", default=D.teacher, help=f"the model to distil from (default {D.teacher})")
    parser.add_argument("--out", required=True, help="folder to save the healed model into (new or empty)")
    add_token_arguments(parser, training=D.training_tokens, held_out=D.held_out_tokens)
    parser.add_argument("--train", default=D.train, metavar="WHAT",
                        help=f"what trains: {', '.join(TRAIN_CHOICES)} (default {D.train})")
    parser.add_argument("--window", type=positive_int, default=D.window,
                        help=f"tokens per training and held-out window (default {D.window})")
    parser.add_argument("--windows-per-step", type=positive_int, default=D.windows_per_step,
                        help=f"windows whose mean gradient makes one step (default {D.windows_per_step})")
    parser.add_argument("--learning-rate", type=positive_number, default=D.learning_rate,
                        help=f"AdamW's peak learning rate (default {D.learning_rate:g})")
    parser.add_argument("--warmup-fraction", type=fraction, default=D.warmup_fraction,
                        help=f"share of the steps spent warming up linearly (default {D.warmup_fraction:g})")
    parser.add_argument("--final-fraction", type=fraction, default=D.final_fraction,
                        help=f"the cosine decays to this fraction of the peak (default {D.final_fraction:g})")
    parser.add_argument("--weight-decay", type=non_negative_number, default=D.weight_decay,
                        help=f"AdamW's decoupled weight decay, on matrices (default {D.weight_decay:g})")
    parser.add_argument("--clip", type=positive_number, default=D.clip,
                        help=f"largest global gradient norm (default {D.clip:g})")
    parser.add_argument("--temperature", type=positive_number, default=D.temperature,
                        help=f"distillation temperature τ (default {D.temperature:g})")
    parser.add_argument("--seed", type=non_negative_int, default=D.seed,
                        help=f"the order of the training windows (default {D.seed})")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=D.checkpoint_every,
                        help=f"steps between checkpoints, 0 for none (default {D.checkpoint_every})")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model already in --out (only a folder that reffuse saved is replaced)")
    add_device_argument(parser)
    add_json_argument(parser)


def run(args) -> int:
    check_window(args.model, args.window)
    record = run_heal(HealOptions.from_namespace(args))
    if args.json:
        print_json(record.to_json())
    else:
        print(summary(record))
        print(f"saved to {args.out}; score it with: reffuse eval --model {args.out} --base {args.teacher}")
    return 0
