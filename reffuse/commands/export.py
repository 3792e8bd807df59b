"""Write a model in a format another engine reads.

--format gguf writes one llama.cpp file: architecture `llama` for a plain Llama, `deci` (llama.cpp's name for the
Nemotron-NAS models FFN Fusion produced) for a model with attention-free, fused or linear blocks or per-block
key/value heads; q/k rows in llama.cpp's RoPE order; the tokenizer (of the model's vocabulary size) with its
pre-tokenizer and chat template; tensors F32 (exact), F16 or Q8_0. reffuse reads its own F32 export back exactly.
What the file holds other than the model as it is, it says: a block that keeps attention and has no FFN is
written with an all-zero FFN (llama.cpp's deci graph would drop its attention otherwise), and a Q8_0 export
names the matrices it left in F32. --format nemotron-nas writes a DeciLM folder (reffuse.formats.nemotron_nas),
the format vLLM and TensorRT-LLM read for Llama-Nemotron. --format hf writes a folder for a plain Llama that
transformers' LlamaForCausalLM.from_pretrained loads as it is.

examples:
  reffuse export --model smollm2 --format gguf --out out/smollm2-f32.gguf
  reffuse fuse --model smollm2 --drop-attention-count 8 --plan auto --out out/fused
  reffuse export --model out/fused --format gguf --out out/fused-f32.gguf
  reffuse export --model smollm2 --format gguf --tensor-type q8_0 --out out/smollm2-q8_0.gguf
  reffuse export --model out/fused --format nemotron-nas --out out/fused-nemotron
  reffuse export --model smollm2 --format hf --out out/smollm2-hf
"""

from __future__ import annotations

from pathlib import Path

from reffuse.commands.common import add_json_argument, add_overwrite_argument, print_json
from reffuse.errors import ReffuseError
from reffuse.outputs import check_output_folder, claim_file, Output, staged_file
from reffuse.formats.checkpoint import hf_model_type, is_model_folder, save_model, save_nemotron_nas
from reffuse.formats.gguf import LAYOUT_KEY
from reffuse.formats.gguf_export import TENSOR_TYPES, plan_gguf, save_gguf
from reffuse.formats.registry import find_tokenizer, load_model

HELP = "write a model for another engine: a llama.cpp GGUF (llama or deci), a Nemotron-NAS or an HF Llama folder"


def is_gguf_export(path: Path) -> bool:
    """A GGUF file that records reffuse's block layout: one `reffuse export` wrote (the key is near the start of
    its metadata, before the tokenizer's)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head.startswith(b"GGUF") and LAYOUT_KEY.encode() in head


GGUF_FILE = Output("GGUF file", recognise=is_gguf_export)


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--format", choices=("gguf", "nemotron-nas", "hf"), required=True,
                        help="gguf: one llama.cpp file; nemotron-nas: a DeciLM folder, the format of the released "
                             "FFN-Fusion models; hf: a folder transformers loads (plain Llamas only)")
    parser.add_argument("--tensor-type", choices=TENSOR_TYPES, default="f32",
                        help="gguf: how matrices are stored (default f32, exact; norms are always F32)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to write with it (default: the model's)")
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file, or the folder, to write")
    add_overwrite_argument(parser, "the file (gguf) or the model folder (hf, nemotron-nas) reffuse exported there")
    add_json_argument(parser)


def run(args) -> int:
    if args.format != "gguf" and args.tensor_type != "f32":
        raise ReffuseError(f"--tensor-type {args.tensor_type} is for --format gguf; a {args.format} folder holds "
                           "float32 weights: leave out --tensor-type")
    if args.format == "gguf":  # before the work
        claim_file(args.out, GGUF_FILE, args.overwrite)
    else:
        check_output_folder(args.out, args.overwrite, is_model_folder, "model")
    model = load_model(args.model)
    if args.format == "gguf":  # llama.cpp loads no model without a tokenizer; the folders go without one if need be
        tokenizer = find_tokenizer(args.tokenizer or args.model)
    else:
        try:
            tokenizer = find_tokenizer(args.tokenizer or args.model)
        except ReffuseError:
            tokenizer = None
    notes = []
    if args.format == "gguf":
        plan = plan_gguf(model, args.tensor_type)
        with staged_file(args.out) as staging:
            save_gguf(model, staging, tokenizer, args.tensor_type)
        path = args.out
        what, notes = plan.architecture, plan.notes()
    elif args.format == "nemotron-nas":
        path = save_nemotron_nas(model, args.out, tokenizer, args.overwrite)
        what = "Nemotron-NAS (DeciLM) folder"
    else:
        if hf_model_type(model) is None:
            raise ReffuseError(f"{args.model} is not a model transformers' Llama, Qwen2 or Mistral holds (it has "
                               "attention-free, fused or linear blocks, per-block key/value heads, RoPE by "
                               "per-frequency factors read from a GGUF, or a sliding window with biases): export it "
                               "as --format nemotron-nas or --format gguf (llama.cpp's deci)")
        path = save_model(model, args.out, args.overwrite, tokenizer)
        what = f"HF folder ({hf_model_type(model)})"
    result = {"model": args.model, "format": args.format, "architecture": what, "path": str(path),
              "tensor_type": args.tensor_type if args.format == "gguf" else "f32", "notes": notes}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {path} ({what}{', ' + args.tensor_type if args.format == 'gguf' else ''})")
        for note in notes:
            print(f"note: {note}")
    return 0
