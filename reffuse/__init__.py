"""reffuse: the reference and teaching implementation of FFN Fusion (arXiv 2503.18908) in NumPy.

    model = reffuse.load_model("tiny")                        # or "smollm2", or a saved folder
    logits = reffuse.forward(model, ids)                      # sequential, eq. 1-4
    logits = reffuse.forward(model, ids, parallel_groups=[(4, 8)])   # a run in parallel, eq. 5
    fused = reffuse.fuse(model, [(4, 8)], norm="fold")        # the run as one wide SwiGLU, Theorem 3.1
    loss, grads = reffuse.gradients(fused, ids)               # backpropagation, grads by HF tensor name

The package is layered; each layer imports only the ones above it in this list:
    core         the model, its layout, fusion, generation, the array backend (NumPy only)
    formats      weights and tokenizers on disk (safetensors, GGUF), fetching, the text corpus, named models
    evaluation   scoring on text (perplexity, KL), the stream cache, activation dumps, the transformers reference
    training     backpropagation (forward/backward pairs), the losses, AdamW, the trainer that heals a fused model
    method       dependency metrics, attention and FFN removal, fusion planning, calibration, the shared pipeline
    speed        timing, benchmarks, the decode-latency cost model
    tp           tensor parallelism: sharding, all-reduce, the MPI runtime and job
    experiments  whole studies: the demo pipeline and the paper's findings at small scale
    plots, cli   figures from results; the `reffuse` command
"""

from reffuse.core.backend import gpu_available
from reffuse.core.fusion import fuse, fuse_ffns, with_last_norm
from reffuse.core.generate import generate
from reffuse.core.layout import (BlockLayout, Layout, attention_free_runs, attention_layers, format_layers,
                                 full_blocks, parse_layers)
from reffuse.core.config import Config
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import (FFN, Attention, Block, Model, attention, block_forward, cast, forward, layout, rms_norm,
                                run_blocks, silu, swiglu, to_device)
from reffuse.core.rope import apply_rope, rope_tables
from reffuse.core.tiny import build_tiny
from reffuse.errors import ReffuseError
from reffuse.files import checkout_root
from reffuse.evaluation.prefix import cache_prefix, kl_from_base, score_variant
from reffuse.evaluation.scoring import evaluate, kl_per_token, log_softmax, perplexity
from reffuse.formats.checkpoint import save_model
from reffuse.formats.corpus import calibration_windows, held_out_windows
from reffuse.formats.fetch import fetch
from reffuse.formats.registry import load_model, load_tokenizer
from reffuse.method.calibrate import calibrated_fuse
from reffuse.training.gradients import gradients
from reffuse.method.metrics import dependency, greedy_windows, window_statistics
from reffuse.method.planning import inside_dependency, propose_groups
from reffuse.method.removal import attention_scores, cheapest, drop_attention, drop_ffns, ffn_scores

__version__ = "0.1.0"

__all__ = ["FFN", "Attention", "Block", "BlockLayout", "Config", "KVCache", "Layout", "Model", "ReffuseError",
           "apply_rope", "attention", "attention_free_runs", "attention_layers", "attention_scores", "block_forward",
           "build_tiny", "cache_prefix", "calibrated_fuse", "calibration_windows", "cast", "cheapest", "checkout_root",
           "dependency",
           "drop_attention", "drop_ffns", "evaluate", "fetch", "ffn_scores", "format_layers", "forward",
           "full_blocks", "fuse", "fuse_ffns", "generate", "gradients", "gpu_available", "greedy_windows",
           "held_out_windows",
           "inside_dependency", "kl_from_base", "kl_per_token", "layout", "load_model", "load_tokenizer",
           "log_softmax", "parse_layers", "perplexity", "propose_groups", "rms_norm", "rope_tables", "run_blocks",
           "save_model", "score_variant", "silu", "swiglu", "to_device", "window_statistics", "with_last_norm"]
