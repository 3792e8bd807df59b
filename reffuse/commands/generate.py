"""Continue a prompt with a model, printing tokens as they are generated (KV cache, greedy by default).

The prompt is tokenized with the model's own tokenizer (SmolLM2: the one stored in its GGUF; a model folder:
its tokenizer.json; or --tokenizer). With --chat the prompt is wrapped in the model's chat format as one
user message, and generation stops at the end of the assistant's turn. Timing goes to stderr.

examples:
  reffuse generate --model smollm2 "The capital of France is" --max-new-tokens 8
  reffuse generate --model smollm2 --chat "Write a haiku about rivers."
  reffuse generate --model fused_folder --tokenizer smollm2 "Once upon a time" --temperature 0.8 --top-k 40 --seed 1
"""

from __future__ import annotations

import sys
import time

from reffuse.commands.common import (add_device_argument, add_dtype_argument, check_positions, non_negative_int,
                                     non_negative_number, positive_int)
from reffuse.errors import ReffuseError
from reffuse.core.generate import generate
from reffuse.formats.registry import load_model, load_tokenizer, model_config
from reffuse.formats.tokenizer import StreamDecoder

HELP = "continue a prompt with a model, streaming the tokens"


def add_arguments(parser):
    parser.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer: smollm2, a .gguf file or a folder with tokenizer.json (default: the model's)")
    parser.add_argument("--max-new-tokens", type=non_negative_int, default=64,
                        help="most tokens to generate (default 64)")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat format to the prompt")
    parser.add_argument("--temperature", type=non_negative_number, default=0.0,
                        help="0 (default) is greedy; > 0 samples")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="with --temperature: sample only among the K most likely tokens")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="with --temperature: random seed for sampling")
    add_device_argument(parser)
    add_dtype_argument(parser)


def run(args) -> int:
    unused = [flag for flag, value in (("--top-k", args.top_k), ("--seed", args.seed)) if value is not None]
    if unused and args.temperature == 0:
        flags = " and ".join(unused)
        raise ReffuseError(f"{flags} {'matters' if len(unused) == 1 else 'matter'} only when sampling, and "
                           f"--temperature 0 is greedy: give --temperature > 0 (e.g. 0.8), or leave out {flags}")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.chat and not tokenizer.chat_template:
        raise ReffuseError(f"--chat: the tokenizer {tokenizer.source} has no chat template, so the model has no chat "
                           "format to follow: leave out --chat, or give a tokenizer with one (--tokenizer)")
    text = tokenizer.chat_prompt(args.prompt) if args.chat else args.prompt
    prompt_ids = tokenizer.encode(text)
    check_positions(model_config(args.model), args.model, len(prompt_ids) + args.max_new_tokens,
                    "the prompt and --max-new-tokens")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    stream = StreamDecoder(tokenizer, skip_special_tokens=True)

    def show(token_id):
        sys.stdout.write(stream.add(token_id))
        sys.stdout.flush()

    if not args.chat:
        sys.stdout.write(args.prompt)
    start = time.perf_counter()
    new_ids = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, on_token=show,
                       stop_ids=[tokenizer.eos_id] if tokenizer.eos_id is not None else ())
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(prompt_ids)} prompt tokens, {len(new_ids)} generated in {seconds:.2f} s]", file=sys.stderr)
    return 0
