"""Argument parsing and printing shared by the commands."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.evaluation.activations import DEFAULT_TEXT
from reffuse.formats.registry import load_tokenizer
from reffuse.core.layout import parse_groups, parse_layers


def groups_argument(text: str) -> list[tuple[int, int]]:
    """parse_groups for argparse `type=`, so that a bad value is reported with its reason."""
    try:
        return parse_groups(text)
    except ReffuseError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def layers_argument(text: str) -> list[int]:
    """parse_layers for argparse `type=`: "14-21" or "3,5,14-21" -> block indices."""
    try:
        return parse_layers(text)
    except ReffuseError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def number_argument(convert, kind: str, accept, refusal):
    """An argparse `type=`: `convert(text)`, refused with "'x' is not <kind>" or with `refusal(value)` when
    `accept(value)` is false, so that argparse names the flag and the reason in one line."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(refusal(value))
        return value
    return parse


positive_int = number_argument(int, "an integer", lambda v: v >= 1, lambda v: f"{v} is not a count: give 1 or more")
non_negative_int = number_argument(int, "an integer", lambda v: v >= 0, lambda v: f"{v} is negative: give 0 or more")
positive_seconds = number_argument(float, "a number of seconds", lambda v: 0 < v < float("inf"),
                                   lambda v: f"{v:g} is not a duration: give a number of seconds > 0")


# The text a command reads, by what it is for; one flag and one meaning in every command that takes it.
TOKEN_ARGUMENTS = {
    "held_out": ("--held-out-tokens", "held-out tokens that quality is judged on"),
    "calibration": ("--calibration-tokens", "calibration tokens (every fit and choice reads only these)"),
    "scoring": ("--scoring-tokens", "calibration tokens for the KL scores of single removals and of the plan's FFN pairs"),
    "dependency": ("--dependency-tokens", "calibration tokens for the dependency matrices"),
    "training": ("--training-tokens", "training tokens, the budget of distillation (training text only)"),
}


def add_token_arguments(parser, **defaults: int) -> None:
    """--held-out-tokens, --calibration-tokens, ... (the keys of TOKEN_ARGUMENTS given), with their defaults."""
    for key, default in defaults.items():
        flag, meaning = TOKEN_ARGUMENTS[key]
        parser.add_argument(flag, type=positive_int, default=default, help=f"{meaning} (default {default})")


DROP_ATTENTION_HELP = "remove the attention of these blocks, e.g. 5-12 or 3,5,12-19 (0-based, inclusive)"
DROP_ATTENTION_COUNT_HELP = ("remove the attention of the N consecutive blocks whose single removals cost the least "
                             "summed KL on calibration text")


def add_attention_removal_arguments(parser, count_default: str = "none") -> None:
    """--drop-attention BLOCKS or --drop-attention-count N, one of the two."""
    drop = parser.add_mutually_exclusive_group()
    drop.add_argument("--drop-attention", type=layers_argument, metavar="BLOCKS", help=DROP_ATTENTION_HELP)
    drop.add_argument("--drop-attention-count", type=positive_int, metavar="N",
                      help=f"{DROP_ATTENTION_COUNT_HELP} (default: {count_default})")


def add_device_argument(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the arrays live and the arithmetic runs: cpu (NumPy) or gpu (CuPy, the `gpu` "
                             "extra; default cpu)")


def add_dtype_argument(parser) -> None:
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="precision of the weights and the arithmetic (default float32; float64 shows what is "
                             "exact)")


def add_json_argument(parser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of the tables (files are written either way)")


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float)
                                           else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def ids_argument(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ReffuseError(f"--ids {text!r} is not a list of integers (e.g. 504,3575,282)") from None


def add_input_arguments(parser, default_tokens: int = 64) -> None:
    """--text / --ids / --tokens / --tokenizer, shared with `reffuse dump`."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="input text (default: a built-in passage of ~135 tokens)")
    source.add_argument("--ids", type=ids_argument, default=None, help="input token ids, e.g. 504,3575,282")
    parser.add_argument("--tokens", type=positive_int, default=None,
                        help=f"use the first N tokens of the text (default: all of --text, or the first "
                             f"{default_tokens} of the built-in passage)")
    parser.set_defaults(default_tokens=default_tokens)
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --text (default: the model's)")


def input_ids(args, model_name) -> np.ndarray:
    """The token ids the arguments ask for: --ids as given, else the first --tokens tokens of the text."""
    if args.ids is not None:
        return np.asarray(args.ids, dtype=np.int64)
    ids = load_tokenizer(args.tokenizer or model_name).encode(DEFAULT_TEXT if args.text is None else args.text)
    tokens = args.tokens or (len(ids) if args.text is not None else args.default_tokens)
    if tokens < 1 or len(ids) < tokens:
        raise ReffuseError(f"--tokens {tokens}: the text has {len(ids)} tokens; give a longer --text or fewer tokens")
    return np.asarray(ids[:tokens], dtype=np.int64)
