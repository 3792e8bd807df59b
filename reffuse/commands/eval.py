"""Perplexity on held-out Shakespeare, and with --base the distance from a base model.

The text is the corpus' held-out split (reffuse.formats.corpus has the fixed split): eight plays, each from its
first scene, and the Sonnets. --held-out-tokens tokens are taken from them in non-overlapping windows of --window
tokens, dealt out in equal shares over the nine texts, each window scored on its own (its first token gets no
prediction, so a window of W tokens scores W - 1). The output records the model, the text span
(play, character offsets, token count) and the windowing, so a number can be reproduced.

With --base, the same windows also go through the base model: mean KL(base || model) of the next-token
distributions (nats), top-1 agreement, and the base model's own perplexity.

examples:
  reffuse eval --model smollm2
  reffuse eval --model fused_folder --base smollm2 --json
  reffuse eval --model smollm2 --held-out-tokens 8192 --window 512
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from reffuse.formats.corpus import WindowsRecord, held_out_windows
from reffuse.evaluation.scoring import Scores, evaluate
from reffuse.formats.registry import check_tokenizer, find_tokenizer, load_model, load_tokenizer
from reffuse.progress import Progress
from reffuse.commands.common import (add_device_argument, add_dtype_argument, add_json_argument, add_token_arguments,
                                     check_window, format_table, positive_int, print_json)

HELP = "perplexity on held-out text; with --base, KL to the base model and top-1 agreement"
DEFAULT_TOKENS = 2048
DEFAULT_WINDOW = 256
WINDOWING = "non-overlapping windows scored independently; the first token of each window has no prediction"


@dataclass(frozen=True)
class EvalResult:
    """What `reffuse eval` measured (its --json prints this): the scores, and the model, text and windows they
    were measured on, so that a number can be reproduced."""
    model: str                # as given (--model)
    model_name: str           # its config name
    base: str | None          # --base, None without one
    dtype: str
    tokenizer: str            # where the tokenizer came from
    text: WindowsRecord
    windowing: str            # how windows are scored
    scores: Scores            # base_perplexity, kl_from_base and top1_agreement only with a base
    seconds: float

    def to_json(self) -> dict:
        return {"model": self.model, "model_name": self.model_name, "base": self.base, "dtype": self.dtype,
                "tokenizer": self.tokenizer, "text": self.text.to_json(), "windowing": self.windowing,
                **self.scores.to_json(), "seconds": self.seconds}

    @classmethod
    def from_json(cls, raw: dict) -> EvalResult:
        scores = Scores.from_json({f.name: raw[f.name] for f in fields(Scores) if f.name in raw})
        return cls(raw["model"], raw["model_name"], raw["base"], raw["dtype"], raw["tokenizer"],
                   WindowsRecord.from_json(raw["text"]), raw["windowing"], scores, raw["seconds"])


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--base", default=None, help="base model to compare with (name or folder)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer: smollm2, a .gguf file or a folder with tokenizer.json "
                             "(default: the model's, else the base model's)")
    add_token_arguments(parser, held_out=DEFAULT_TOKENS)
    parser.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW,
                        help=f"tokens per window; windows do not overlap (default {DEFAULT_WINDOW})")
    add_dtype_argument(parser)
    add_device_argument(parser)
    add_json_argument(parser)


def run(args) -> int:
    for name in (args.model, args.base) if args.base else (args.model,):
        check_window(name, args.window)
    tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer else
                 find_tokenizer(*[source for source in (args.model, args.base) if source]))
    windows = held_out_windows(tokenizer, args.window, args.held_out_tokens)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    base = load_model(args.base, dtype=args.dtype, device=args.device) if args.base else None
    check_tokenizer(tokenizer, model, args.model)
    start = time.perf_counter()
    with Progress(f"scoring {args.model}" + (f" against {args.base}" if base else ""), len(windows),
                  "windows") as bar:
        scores = evaluate(model, windows, base, progress=bar.update)
    result = EvalResult(args.model, model.config.name, args.base, args.dtype, tokenizer.source, windows.describe(),
                        WINDOWING, scores, time.perf_counter() - start)
    if args.json:
        print_json(result.to_json())
        return 0
    text = result.text
    spans = "; ".join(f"{s.title} ({s.play}) characters {s.start}-{s.end}, {s.tokens} tokens" for s in text.spans)
    print(f"model: {args.model} ({model.config.name}), {args.dtype}")
    print(f"text: {text.split}: {spans}")
    print(f"windows: {text.windows} x {text.window} tokens, scored independently: "
          f"{scores.predictions} predictions\n")
    header, row = ["perplexity"], [f"{scores.perplexity:.4f}"]
    if base is not None:
        header += ["base perplexity", "KL(base||model) nats", "top-1 agreement"]
        row += [f"{scores.base_perplexity:.4f}", f"{scores.kl_from_base:.3e}", f"{scores.top1_agreement:.2%}"]
    print(format_table(header, [row]))
    return 0
