"""Compare reffuse's numerics with another implementation, block by block.

--against transformers runs transformers' LlamaForCausalLM on the same weights (for SmolLM2 or a .gguf:
transformers' own GGUF conversion; needs the `reference` extra) and compares, on the same tokens, the output of
the token embedding and of every block (max |diff|, and that over the largest |value| of the reference), the
logits, and the ids of a greedy continuation (reffuse with its KV cache, transformers with its own).

--against FILE.npz compares with a dump written by any implementation in reffuse's documented format
(reffuse.evaluation.activations; `reffuse dump` writes one). The dump's token ids are used; reffuse is the reference.

Targets (float32): logits max |diff| <= 2e-4 and <= 1e-5 of the largest |logit|, identical greedy ids.
float64 (--dtype float64 and a float64 dump): logits max |diff| <= 1e-9 of the largest |logit|. transformers
computes norms, softmax and RoPE in float32 even in a float64 model, so against it the float32 targets apply.
Exit status 0 when the targets are met, 1 when not.

examples:
  reffuse verify --model smollm2 --against transformers
  reffuse verify --model smollm2 --against transformers --dtype float64 --tokens 128
  reffuse dump --model smollm2 --out ref.npz && reffuse verify --model smollm2 --against ref.npz
"""

from __future__ import annotations

import numpy as np

from reffuse.evaluation.activations import DEFAULT_TEXT, activations, compare, load_activations
from reffuse.errors import ReffuseError
from reffuse.core.generate import generate
from reffuse.formats.registry import load_model
from reffuse.formats.registry import load_tokenizer
from reffuse.commands.common import format_table, print_json

HELP = "compare reffuse's per-block activations and logits with transformers or with a dump (.npz)"

# What "agrees" means, per precision of the less precise side. float32: roundings accumulated over 30 blocks,
# measured ~1e-4 absolute (3e-6 relative) on SmolLM2; float64 leaves ~1e-13 relative, so 1e-9 is a wide margin.
TARGETS = {"float32": {"logits_max_abs": 2e-4, "logits_relative": 1e-5},
           "float64": {"logits_relative": 1e-9}}


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
    parser.add_argument("--tokens", type=int, default=None,
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


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--against", required=True, metavar="transformers|FILE.npz",
                        help="the other implementation: transformers, or a dump file")
    add_input_arguments(parser)
    parser.add_argument("--generate", type=int, default=32,
                        help="greedy tokens to compare against transformers (default 32)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args) -> int:
    if args.against == "transformers":
        from reffuse.evaluation.reference import load_reference, reference_activations, reference_greedy
        ids = input_ids(args, args.model)
        model = load_model(args.model, dtype=args.dtype)
        reference_model = load_reference(args.model, dtype=args.dtype)
        result = compare(activations(model, ids), reference_activations(reference_model, ids))
        ours = generate(model, ids, args.generate)
        theirs = reference_greedy(reference_model, ids, args.generate)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        result["greedy"] = {"tokens": args.generate, "identical_prefix": same, "reffuse": ours, "reference": theirs}
        against = "transformers (LlamaForCausalLM)"
        precision = "float32"  # transformers' norms, softmax and RoPE tables are float32 in any dtype
    else:
        dump = load_activations(args.against)
        model = load_model(args.model, dtype=args.dtype)
        result = compare(dump, activations(model, dump["token_ids"]))
        ids, against = dump["token_ids"], f"{args.against} (model {dump['model'] or '?'}; reffuse is the reference)"
        precision = "float64" if args.dtype == "float64" and dump["logits"].dtype == np.float64 else "float32"

    targets = TARGETS[precision]
    logits = result["logits"]
    checks = {f"logits relative <= {targets['logits_relative']:g}": logits["relative"] <= targets["logits_relative"]}
    if "logits_max_abs" in targets:
        checks[f"logits max |diff| <= {targets['logits_max_abs']:g}"] = logits["max_abs"] <= targets["logits_max_abs"]
    if "greedy" in result:
        checks[f"greedy ids identical for {args.generate} tokens"] = result["greedy"]["identical_prefix"] == args.generate
    result.update({"model": model.config.name, "against": against, "dtype": args.dtype, "tokens": len(ids),
                   "targets": precision, "targets_met": checks})

    if args.json:
        print_json(result)
    else:
        print(f"model: {model.config.name}    against: {against}    dtype: {args.dtype}    tokens: {len(ids)}\n")
        rows = result["hidden_states"] + [logits]
        print(format_table(["output of", "max |diff|", "max |reference|", "relative"],
                           [[r["step"], f"{r['max_abs']:.3e}", f"{r['max_reference']:.4g}", f"{r['relative']:.3e}"]
                            for r in rows]))
        print(f"\ntop-1 agreement over positions: {result['top1_agreement']:.1%}")
        if "greedy" in result:
            g = result["greedy"]
            print(f"greedy continuation: {g['identical_prefix']}/{g['tokens']} ids identical before the first "
                  "difference")
        print(f"targets for a {precision} comparison:")
        for check, met in checks.items():
            print(f"{'met' if met else 'NOT MET'}: {check}")
    return 0 if all(checks.values()) else 1
