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

from reffuse.evaluation.activations import activations, save_activations
from reffuse.formats.registry import load_model
from reffuse.files import check_writable_file
from reffuse.commands.common import add_dtype_argument, add_input_arguments, input_ids

HELP = "write per-block activations and logits to an .npz file (documented format)"


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    add_input_arguments(parser)
    parser.add_argument("--out", required=True, help="the .npz file to write")
    add_dtype_argument(parser)


def run(args) -> int:
    check_writable_file(args.out)
    model = load_model(args.model, dtype=args.dtype)
    ids = input_ids(args, args.model)
    path = save_activations(args.out, activations(model, ids), model.config.name)
    print(path)
    return 0
