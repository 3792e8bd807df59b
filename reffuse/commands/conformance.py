"""Write a conformance kit for engines that run Nemotron-NAS (DeciLM) models.

One small random model per block pattern (both sub-blocks; attention no-op; FFN no-op with attention kept; both
no-op; linear attention; linear FFN; key/value heads and FFN widths varying by block; a fused wide FFN), each as
a Nemotron-NAS folder and a llama.cpp GGUF, with token ids and reffuse's outputs (logits, every block's stream,
every sub-block's output) in float64 and float32, and a README for engine developers saying how to hold an
engine against it. A few MB; seconds to write.

examples:
  reffuse conformance --out out/kit
  reffuse verify --model out/kit --against llama.cpp
  reffuse verify --model out/kit/linear-attention/nemotron-nas --against my-engine-dump.npz
"""

from __future__ import annotations

from pathlib import Path

from reffuse.commands.common import add_json_argument, format_table, non_negative_int, positive_int, print_json
from reffuse.evaluation.conformance import TOKENS, build_kit

HELP = "write small models of every Nemotron-NAS block pattern with reference outputs, to check an engine against"


def add_arguments(parser):
    parser.add_argument("--out", required=True, type=Path, help="the folder to write the kit into")
    parser.add_argument("--reference-tokens", type=positive_int, default=TOKENS,
                        help=f"random token ids each pattern's references are computed on (default {TOKENS})")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the random weights and ids (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a kit reffuse wrote at --out")
    add_json_argument(parser)


def run(args) -> int:
    manifest = build_kit(args.out, args.overwrite, args.reference_tokens, args.seed)
    if args.json:
        print_json(manifest.to_json())
        return 0
    print(format_table(["pattern", "blocks", "llama.cpp file"],
                       [[p.name, len(p.blocks), p.gguf or "none (kit.json says why)"] for p in manifest.patterns]))
    print(f"\nwrote {args.out} ({len(manifest.patterns)} patterns, {manifest.tokens} tokens each); "
          f"how to use it: {args.out / 'README.md'}")
    return 0
