"""Write a model in a format another engine reads.

--format gguf writes one llama.cpp file: architecture `llama` for a plain Llama, `deci` (llama.cpp's name for the
Nemotron-NAS models FFN Fusion produced) for a model with attention-free or fused blocks; q/k rows in llama.cpp's
RoPE order; the tokenizer with its pre-tokenizer and chat template; tensors F32 (exact), F16 or Q8_0. reffuse
reads its own F32 export back exactly. --format nemotron-nas writes a DeciLM folder (reffuse.formats.nemotron_nas),
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

from reffuse.commands.common import add_json_argument, print_json
from reffuse.errors import ReffuseError
from reffuse.files import check_writable_file
from reffuse.formats.checkpoint import save_model, save_nemotron_nas
from reffuse.formats.gguf_export import TENSOR_TYPES, is_plain_llama, save_gguf
from reffuse.formats.registry import find_tokenizer, load_model

HELP = "write a model for another engine: a llama.cpp GGUF (llama or deci), a Nemotron-NAS or an HF Llama folder"


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--format", choices=("gguf", "nemotron-nas", "hf"), required=True,
                        help="gguf: one llama.cpp file; nemotron-nas: a DeciLM folder, the format of the released "
                             "FFN-Fusion models; hf: a folder transformers loads (plain Llamas only)")
    parser.add_argument("--tensor-type", choices=TENSOR_TYPES, default="f32",
                        help="gguf: how matrices are stored (default f32, exact; norms are always F32)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to write with it (default: the model's)")
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file, or the folder, to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the file (gguf) or the model reffuse saved in the folder (hf, nemotron-nas)")
    add_json_argument(parser)


def run(args) -> int:
    if args.format == "gguf":
        check_writable_file(args.out)
        if args.out.exists() and not args.overwrite:
            raise ReffuseError(f"{args.out} exists: give another file, or --overwrite to replace it")
    model = load_model(args.model)
    if args.format == "gguf":  # llama.cpp loads no model without a tokenizer; the folders go without one if need be
        tokenizer = find_tokenizer(args.tokenizer or args.model)
    else:
        try:
            tokenizer = find_tokenizer(args.tokenizer or args.model)
        except ReffuseError:
            tokenizer = None
    if args.format == "gguf":
        path = save_gguf(model, args.out, tokenizer, args.tensor_type)
        what = "llama" if is_plain_llama(model) else "deci"
    elif args.format == "nemotron-nas":
        path = save_nemotron_nas(model, args.out, tokenizer, args.overwrite)
        what = "Nemotron-NAS (DeciLM) folder"
    else:
        if not is_plain_llama(model):
            raise ReffuseError(f"{args.model} has attention-free or fused blocks, which transformers' Llama cannot "
                               "hold: export it as --format nemotron-nas or --format gguf (llama.cpp's deci)")
        path = save_model(model, args.out, args.overwrite, tokenizer)
        what = "HF Llama folder"
    result = {"model": args.model, "format": args.format, "architecture": what, "path": str(path),
              "tensor_type": args.tensor_type if args.format == "gguf" else "f32"}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {path} ({what}{', ' + args.tensor_type if args.format == 'gguf' else ''})")
    return 0
