"""Speed: prefill and decode against transformers and llama.cpp in the same run, the bound, and the fused-FFN run.

Measures, with BLAS and torch pinned to --threads: prefill time for 64, 128, 256 and 512 tokens; decode tokens/s
with the KV cache (32 greedy tokens after a 64-token prompt); the same for transformers' LlamaForCausalLM on
the same token ids when the `reference` extra is installed and transformers can load the model; on the CPU, the
bound on decode (every weight read once, at the streaming rate NumPy reaches here) and each engine's fraction of
it; and a run of 8 of the model's FFNs, sequential vs fused, at 1, 16, 128 and 512 tokens. With --against
llama.cpp, llama.cpp's prefill and decode of the same weights (an F32 GGUF) join the alternation, and its decode
of the attention-removed model is timed against the fused one. With --device gpu: the FFN run up to 4096 tokens,
every timed region synchronised, transformers not compared. Medians after warm-up, timed in alternation. Shared
machines are noisy: trust the ratios, which are measured in the same run. Each ratio is the ratio of the
medians with the bootstrap 95% interval of the paired repeats; with few --repeats the intervals are wide, and below 6
there is none and no target is decided (the committed runs use 11).

The speed targets (2 cores, float32) are checked and reported: prefill <= 0.8x transformers' time at every
length, decode >= 2.5x transformers' tokens/s and >= 0.5x llama.cpp's, the fused FFN run >= 1.3x faster at 1
token and never slower at 128 and 512. A target is "met" when every interval it checks lies on its side, "not
met" when one lies wholly on the other side, "unresolved" otherwise.

The output says which BLAS kernels ran and whether OpenBLAS detected them for this CPU or the environment chose
them: some machines set OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE to work around older OpenBLAS builds. To time NumPy
on the kernels OpenBLAS would choose, unset both for that command alone (the last example).

--train all|fused times a training step instead (reffuse.speed.train_bench): forward, next-token cross-entropy,
backward, clipping and one AdamW step on the same 512-token window of real text, in reffuse and in PyTorch
(transformers' LlamaForCausalLM holding the same weights and torch.optim.AdamW; for a model transformers cannot
hold, the equations in PyTorch), each engine in a worker process of its own taking steps in turns with the
other, with the ratio of their tokens/s and its 95% interval, and each one's peak resident memory. "all" trains
every weight; "fused" trains the fused blocks of the model with the attention of blocks 5-12 removed and blocks
5-8 and 9-11 fused. Give --train twice for both. Targets (2 threads, float32, 512 tokens): reffuse's tokens/s
>= 1.0x PyTorch's for --train all, and reffuse's peak resident memory under 3 GiB.

--out FILE.json writes the JSON there and the Markdown tables beside it (FILE.md), with the command line.

examples:
  reffuse bench --model smollm2
  reffuse bench --model smollm2 --threads 2 --against llama.cpp --out out/bench_smollm2.json
  reffuse bench --model tiny --repeats 3 --no-transformers
  reffuse bench --model smollm2 --threads 2 --train all --train fused --out out/bench_train_smollm2.json
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE reffuse bench --model smollm2 --repeats 11   # OpenBLAS's kernels
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path

from reffuse.errors import ReffuseError
from reffuse.speed.bench import DECODE_PROMPT_TOKENS, DECODE_TOKENS, PREFILL_TOKENS, run_benchmark
from reffuse.speed.bench_report import markdown, train_markdown
from reffuse.speed.environment import default_threads
from reffuse.speed.train_bench import TRAIN_CHOICES, TRAIN_TOKENS, run_train_benchmark
from reffuse.formats.registry import check_tokenizer, find_tokenizer, load_model, model_config
from reffuse.progress import note
from reffuse.outputs import claim_file, json_naming, Output, text_headed, write_json_atomic, write_text_atomic
from reffuse.commands.common import (add_device_argument, add_json_argument, add_overwrite_argument, check_window,
                                     positive_int, print_json)

HELP = ("prefill/decode speed against transformers (and llama.cpp), fused vs sequential FFN runs; with --train, "
        "a training step's speed and memory against PyTorch")

RESULT = Output("benchmark result", recognise=json_naming("reffuse bench"))
TABLES = Output("benchmark report", recognise=text_headed("# reffuse bench"))  # FILE.md beside FILE.json


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2", help="model name, folder or .gguf file (default: smollm2)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help=f"BLAS and torch threads (default: the cores available, here {default_threads()})")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed repeats of each measurement, alternated; medians and paired 95%% intervals "
                             "(default 7)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the transformers comparison (with --train: time reffuse alone)")
    parser.add_argument("--against", choices=("llama.cpp",), action="append", default=[],
                        help="llama.cpp: also time llama.cpp on the same weights (an F32 GGUF; the `llamacpp` "
                             "extra), and its decode with and without fusion")
    parser.add_argument("--tokenizer", default=None,
                        help="with --against llama.cpp: the tokenizer written into its GGUF (default: the model's)")
    parser.add_argument("--train", choices=TRAIN_CHOICES, action="append", default=[],
                        help="time a training step instead: forward, cross-entropy, backward, clipping and one "
                             "AdamW step on one window of real text, in reffuse and in PyTorch (torch autograd and "
                             "torch.optim.AdamW on the same weights), alternated step by step, each engine in its "
                             "own process for its peak memory; all: every weight trains, fused: the fused blocks of "
                             "the model with attention 5-12 removed and 5-8, 9-11 fused (give twice for both)")
    parser.add_argument("--window", type=positive_int, default=TRAIN_TOKENS,
                        help=f"with --train: tokens in the training window (default {TRAIN_TOKENS})")
    add_device_argument(parser)
    add_json_argument(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON to this file (FILE.json) and the Markdown tables beside it (FILE.md)")
    add_overwrite_argument(parser, "the benchmark result reffuse wrote at --out, and its .md")


def command_line(args) -> str:
    """The command that reproduces this run, spelled out from the parsed options, after the environment variables
    that change what is timed (OpenBLAS's kernels)."""
    words = [f"{name}={os.environ[name]}" for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.get(name)]
    words += ["reffuse", "bench", "--model", str(args.model), "--repeats", str(args.repeats)]
    words += ["--threads", str(args.threads)] if args.threads else []
    words += ["--no-transformers"] if args.no_transformers else []
    words += [w for against in args.against for w in ("--against", against)]
    words += ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []
    words += [w for train in args.train for w in ("--train", train)]
    words += ["--window", str(args.window)] if args.train and args.window != TRAIN_TOKENS else []
    words += ["--device", args.device] if args.device != "cpu" else []
    words += ["--json"] if args.json else []
    words += ["--out", str(args.out)] if args.out else []
    return shlex.join(words)


def run(args) -> int:
    if args.out is not None:  # before the long work
        if args.out.suffix != ".json":
            raise ReffuseError(f"--out {args.out}: give a file name ending in .json (the tables go beside it, .md)")
        claim_file(args.out, RESULT, args.overwrite)
        claim_file(args.out.with_suffix(".md"), TABLES, args.overwrite)
    if args.train:
        check_window(args.model, args.window)
        return run_train(args)
    check_context(args.model)
    tokenizer = find_tokenizer(args.tokenizer or args.model) if "llama.cpp" in args.against else None
    model = load_model(args.model, dtype="float32", device=args.device)
    if tokenizer is not None:
        check_tokenizer(tokenizer, model, args.model)
    result = run_benchmark(model, args.model, threads=args.threads, repeats=args.repeats,
                           with_transformers=not args.no_transformers, progress=note, llamacpp_tokenizer=tokenizer)
    return publish(args, result, markdown)


def publish(args, result, render) -> int:
    """Stamp `result` with its command line, write it to --out (its JSON, and `render`'s Markdown beside it) and
    print it: its JSON with --json, else the Markdown."""
    command = command_line(args)
    result = dataclasses.replace(result, command=command)
    if args.out is not None:
        write_json_atomic(args.out, result.to_json())
        write_text_atomic(args.out.with_suffix(".md"), render(result, command))
        note(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if args.json:
        print_json(result.to_json())
    else:
        sys.stdout.write(render(result, command))
    return 0


def check_context(model_name) -> None:
    """Refuse, before the work, a model whose context length is shorter than the sequences the benchmark times
    (its sizes are fixed, so that results compare across models and machines)."""
    longest = max(*PREFILL_TOKENS, DECODE_PROMPT_TOKENS + DECODE_TOKENS)
    limit = model_config(model_name).max_positions
    if limit is not None and limit < longest:
        raise ReffuseError(f"{model_name} has a context length of {limit} positions, and `reffuse bench` times "
                           f"sequences of up to {longest}: bench a model of a longer context (or time training on "
                           f"shorter windows with --train and --window)")


def run_train(args) -> int:
    """`--train`: the training step in reffuse and PyTorch (reffuse.speed.train_bench)."""
    if args.device != "cpu" or args.against:
        raise ReffuseError("--train times training on the CPU against PyTorch: leave out --device and --against")
    result = run_train_benchmark(args.model, trains=list(dict.fromkeys(args.train)), tokens=args.window,
                                 threads=args.threads, repeats=args.repeats,
                                 with_pytorch=not args.no_transformers, progress=note)
    return publish(args, result, train_markdown)
