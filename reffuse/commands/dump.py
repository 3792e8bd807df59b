"""Write reffuse's per-block activations and logits for some tokens to an .npz file, in the documented format
of reffuse.evaluation.activations (no pickle; read with np.load(path, allow_pickle=False)):

  format "reffuse-activations-1", model, token_ids [T], hidden_states [L+1, T, d] (after the embedding and after
  each block), logits [T, vocab]

Run your own implementation on the same token_ids, write the same keys, and compare with
`reffuse verify --model M --against yours.npz`.

examples:
  reffuse dump --model smollm2 --out smollm2.npz
  reffuse dump --model smollm2 --text "The capital of France is" --tokens 5 --out paris.npz --dtype float64
  reffuse dump --model tiny --ids 1,2,3,4 --out tiny.npz
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.evaluation.activations import FORMAT, activations, save_activations
from reffuse.formats.registry import load_model
from reffuse.commands.common import add_dtype_argument, add_input_arguments, add_overwrite_argument, input_ids
from reffuse.outputs import Output, claim_file

HELP = "write per-block activations and logits to an .npz file (documented format)"


def is_dump(path: Path) -> bool:
    with np.load(path, allow_pickle=False) as npz:
        return str(npz["format"]) == FORMAT


DUMP = Output("activation dump", recognise=is_dump)


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    add_input_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    add_overwrite_argument(parser, "the dump reffuse wrote at --out")
    add_dtype_argument(parser)


def run(args) -> int:
    claim_file(args.out, DUMP, args.overwrite)
    if args.out.suffix != ".npz":
        raise ReffuseError(f"--out {args.out}: a dump is an .npz file; give a name ending in .npz")
    ids = input_ids(args, args.model)
    model = load_model(args.model, dtype=args.dtype)
    path = save_activations(args.out, activations(model, ids), model.config.name)
    print(path)
    return 0
