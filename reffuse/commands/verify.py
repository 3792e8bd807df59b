"""Compare reffuse's numerics with another implementation, block by block.

--against transformers runs transformers' LlamaForCausalLM on the same weights (for SmolLM2 or a .gguf:
transformers' own GGUF conversion; needs the `reference` extra) and compares, on the same tokens, the output of
the token embedding and of every block (max |diff|, and that over the largest |value| of the reference), the
logits, and the ids of a greedy continuation (reffuse with its KV cache, transformers with its own).

--against llama.cpp exports the model as an F32 GGUF (reffuse.formats.gguf_export, `llama` or `deci`) and runs it
in llama.cpp (the `llamacpp` extra), with an F32 KV cache: logits and a greedy continuation, target 1e-4 of the
largest logit. For smollm2 it also reports, unjudged, llama.cpp on the published Q4_1 file (quantization's gap).

--model KIT --against llama.cpp, over a conformance kit (`reffuse conformance`), runs llama.cpp on every GGUF of
the kit and prints one line per block pattern: its logits against the kit's float64 reference, and which
pattern diverges. A saved folder without a tokenizer is verified on token ids (--ids) alone.

--against FILE.npz compares with a dump written by any implementation in reffuse's documented format
(reffuse.evaluation.activations; `reffuse dump` writes one). The dump's token ids are used; reffuse is the reference.

Targets (float32): logits max |diff| <= 2e-4 and <= 1e-5 of the largest |logit|, identical greedy ids.
float64 (--dtype float64 and a float64 dump): logits max |diff| <= 1e-9 of the largest |logit|. transformers
computes norms, softmax and RoPE in float32 even in a float64 model, so against it the float32 targets apply.
A dump that carries each block's sub-blocks (resid_mid, attn_out, mlp_out) is compared at that grain: the first
diverging output named is then a sub-block.
Exit status 0 when the targets are met, 1 when not.

examples:
  reffuse verify --model smollm2 --against transformers
  reffuse verify --model smollm2 --against transformers --dtype float64 --tokens 128
  reffuse verify --model out/fused --against llama.cpp
  reffuse conformance --out out/kit && reffuse verify --model out/kit --against llama.cpp
  reffuse dump --model smollm2 --out ref.npz && reffuse verify --model smollm2 --against ref.npz
"""

from __future__ import annotations

from reffuse.commands.common import (add_dtype_argument, add_input_arguments, add_json_argument, format_table,
                                     input_ids, non_negative_int, non_negative_number, positive_number, print_json)
from reffuse.errors import ReffuseError
from reffuse.evaluation.conformance import is_kit, verify_kit
from reffuse.evaluation.verify import TARGETS, check_dump_path, verify

HELP = "compare reffuse's per-block activations and logits with transformers, llama.cpp or a dump (.npz)"


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--against", required=True, metavar="transformers|llama.cpp|FILE.npz",
                        help="the other implementation: transformers, llama.cpp (the `llamacpp` extra; the model "
                             "exported as an F32 GGUF), or a dump file")
    add_input_arguments(parser)
    parser.add_argument("--generate", type=non_negative_int, default=32,
                        help="greedy tokens to compare against transformers or llama.cpp (default 32)")
    parser.add_argument("--rtol", type=positive_number, default=None,
                        help="relative target for every output, of its largest value (default: 1e-5 in float32, "
                             "1e-9 in float64, 1e-4 against llama.cpp)")
    parser.add_argument("--atol", type=non_negative_number, default=None,
                        help="also a bound on every output's largest absolute difference (default: none but the "
                             "logits' 2e-4 in float32)")
    add_dtype_argument(parser)
    add_json_argument(parser)


def run_kit(args) -> int:
    """One line per pattern of a conformance kit, llama.cpp against the kit's float64 reference."""
    rows = verify_kit(args.model)
    if args.json:
        print_json([r.to_json() for r in rows])
    else:
        print(f"llama.cpp on the conformance kit {args.model}, logits against its float64 reference "
              f"(target: <= {TARGETS['llama.cpp']['relative']:g} of the largest logit)\n")
        print(format_table(["pattern", "max |diff| / max |logit|", "top-1", "verdict"],
                           [[r.pattern, "-" if r.relative is None else f"{r.relative:.1e}",
                             "-" if r.top1_agreement is None else f"{r.top1_agreement:.0%}", r.verdict]
                            for r in rows]))
        for r in rows:
            if r.note:
                print(f"{r.pattern}: {r.note}")
    return 0 if all(r.met is not False for r in rows) else 1


def refuse_input_flags(args, holder: str) -> None:
    """Refuse --ids, --text and --tokens where `holder` brings its own token ids (they would change nothing)."""
    given = [flag for flag, value in (("--ids", args.ids), ("--text", args.text), ("--tokens", args.tokens))
             if value is not None]
    if given:
        raise ReffuseError(f"{', '.join(given)}: {holder} brings its own token ids, so these would change nothing: "
                           "leave them out")


def run(args) -> int:
    if args.against == "llama.cpp" and is_kit(args.model):
        refuse_input_flags(args, "a conformance kit")
        return run_kit(args)
    if args.against in ("transformers", "llama.cpp"):
        ids = input_ids(args, args.model, extra_positions=args.generate)
    else:
        refuse_input_flags(args, "a dump")
        check_dump_path(args.against)
        ids = None
    result = verify(args.model, args.against, ids, args.dtype, args.generate, args.rtol, args.atol, args.tokenizer)
    if args.json:
        print_json(result.to_json())
        return 0 if result.met else 1
    print(f"model: {result.model}    against: {result.against}    dtype: {result.dtype}    "
          f"tokens: {result.tokens}\n")
    print(format_table(["output of", "max |diff|", "max |reference|", "relative", "without the sink",
                        "worst position"],
                       [[r.step, f"{r.max_abs:.3e}", f"{r.max_reference:.4g}", f"{r.relative:.3e}",
                         "-" if r.relative_without_sink is None else f"{r.relative_without_sink:.3e}",
                         "-" if r.worst_position is None else r.worst_position]
                        for r in result.comparison.outputs()]))
    print(f"\ntop-1 agreement over positions: {result.comparison.top1_agreement:.1%}")
    if result.greedy is not None:
        g = result.greedy
        print(f"greedy continuation: {g.identical_prefix}/{g.tokens} ids identical before the first difference")
    if result.quantized_file is not None:
        q = result.quantized_file
        print(f"llama.cpp on the published {q.file} (its own quantized kernels, not judged): max |diff| "
              f"{q.logits.max_abs:.3g}, {q.logits.relative:.1%} of the largest logit, NMSE {q.logits.nmse:.2e}, "
              f"top-1 agreement {q.top1_agreement:.1%}: that gap is quantization, not a bug")
    checks = result.targets_met
    failed = [check for check, met in checks.items() if not met]
    print(f"targets for a {result.targets} comparison: {len(checks) - len(failed)} of {len(checks)} met"
          + (f"; the first output that diverges: {result.first_diverging}" if result.first_diverging else ""))
    for check in failed:
        print(f"NOT MET: {check}")
    if result.hint:
        print(f"hint: {result.hint}")
    return 0 if not failed else 1
