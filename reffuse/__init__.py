"""reffuse: the reference and teaching implementation of FFN Fusion (arXiv 2503.18908) in NumPy.

    model = reffuse.load_model("tiny")                        # or "smollm2", or a saved folder
    logits = reffuse.forward(model, ids)                      # sequential, eq. 1-4
    logits = reffuse.forward(model, ids, parallel_groups=[(4, 8)])   # a run in parallel, eq. 5
    fused = reffuse.fuse(model, [(4, 8)], norm="fold")        # the run as one wide SwiGLU, Theorem 3.1
"""

from reffuse.core.backend import gpu_available
from reffuse.formats.checkpoint import save_model
from reffuse.formats.corpus import calibration_windows, held_out_windows
from reffuse.errors import ReffuseError
from reffuse.evaluation.scoring import evaluate, perplexity
from reffuse.formats.fetch import fetch
from reffuse.core.fusion import fuse
from reffuse.core.generate import generate
from reffuse.formats.registry import load_model
from reffuse.method.metrics import dependency, greedy_windows, window_statistics
from reffuse.core.model import Config, KVCache, Model, cast, forward, layout, to_device
from reffuse.method.planning import propose_groups
from reffuse.formats.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["Config", "KVCache", "Model", "ReffuseError", "calibration_windows", "cast", "dependency", "evaluate",
           "fetch", "forward", "fuse", "generate", "gpu_available", "greedy_windows", "held_out_windows", "layout",
           "load_model", "load_tokenizer", "perplexity", "propose_groups", "save_model", "to_device",
           "window_statistics"]
