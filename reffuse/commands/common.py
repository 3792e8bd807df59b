"""Argument parsing and printing shared by the commands."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.evaluation.activations import DEFAULT_TEXT
from reffuse.formats.registry import load_tokenizer, model_config
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
positive_seconds = number_argument(float, "a number of seconds", lambda v: 0 < v < math.inf,
                                   lambda v: f"{v:g} is not a duration: give a number of seconds > 0")
# NaN fails every comparison, so these refuse it with the infinities.
positive_number = number_argument(float, "a number", lambda v: 0 < v < math.inf,
                                  lambda v: f"{v:g} is not a finite number > 0")
non_negative_number = number_argument(float, "a number", lambda v: 0 <= v < math.inf,
                                      lambda v: f"{v:g} is not a finite number >= 0")


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


def add_overwrite_argument(parser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} (only a result of the same kind this command wrote is replaced; "
                             "anything else at --out is refused and left as it is)")


def add_json_argument(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the tables")


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
    """--ids: token ids >= 0, separated by commas or spaces (the vocabulary's bound is checked with the model)."""
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers (e.g. 504,3575,282)") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given (e.g. 504,3575,282)")
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"token id {min(ids)} is negative: ids count from 0")
    return ids


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


def input_ids(args, model_name, extra_positions: int = 0) -> np.ndarray:
    """The token ids the arguments ask for: --ids as given, else the first --tokens tokens of the text; refused
    when they (and `extra_positions` generated after them) run past the model's context length, or past its
    vocabulary."""
    config = model_config(model_name)
    if args.ids is not None:
        ids, flag = np.asarray(args.ids, dtype=np.int64), "--ids"
    else:
        if args.tokens is not None:
            check_positions(config, model_name, args.tokens + extra_positions, "--tokens")
        ids = load_tokenizer(args.tokenizer or model_name).encode(DEFAULT_TEXT if args.text is None else args.text)
        tokens = args.tokens or (len(ids) if args.text is not None else args.default_tokens)
        if tokens < 1 or len(ids) < tokens:
            raise ReffuseError(f"--tokens {tokens}: the text has {len(ids)} tokens; give a longer --text or fewer "
                               "tokens")
        ids, flag = np.asarray(ids[:tokens], dtype=np.int64), "--tokens" if args.tokens else "--text"
    if ids.max() >= config.vocab_size:
        raise ReffuseError(f"{flag}: token id {int(ids.max())} is past the vocabulary of {model_name} "
                           f"({config.vocab_size} tokens): give ids below {config.vocab_size}")
    check_positions(config, model_name, ids.size + extra_positions, flag)
    return ids


def check_positions(config, model_name, positions: int, flag: str) -> None:
    """Refuse, before the work, more positions than the model's context length (the positions it was trained
    on: past them RoPE still computes, but not what the model knows)."""
    limit = config.max_positions
    if limit is not None and positions > limit:
        raise ReffuseError(f"{flag}: {positions} positions are past the context length of {model_name}, {limit}: "
                           f"give at most {limit}")


def check_window(model_name, window: int, flag: str = "--window") -> None:
    """check_positions for a command's windows of tokens, from the model's config alone."""
    check_positions(model_config(model_name), model_name, window, flag)
