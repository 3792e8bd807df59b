"""transformers' LlamaForCausalLM as an independent reference for reffuse's numerics (the `reference` extra).

For a GGUF, transformers does its own conversion (dequantization, q/k un-permutation, name mapping), so
agreement checks reffuse's loader as well as its forward pass. Activations come in
reffuse.evaluation.activations' layout: the output of the token embedding and of every decoder layer (forward
hooks), and the logits.

transformers computes RMSNorm, the attention softmax and the RoPE tables in float32 whatever the model's dtype,
so even in float64 it agrees with reffuse's float64 only to about float32's precision (~1e-7 relative). Tighter
float64 comparisons need a dump from a float64 implementation (reffuse.evaluation.activations).

    ref = load_reference("smollm2")                 # or a .gguf file, or an HF Llama folder
    acts = reference_activations(ref, ids)          # token_ids, hidden_states [L+1, T, d], logits [T, vocab]
    ids32 = reference_greedy(ref, ids, 32)
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.evaluation.activations import Activations
from reffuse.optional import require

PURPOSE = "comparing against transformers"


def load_reference(name_or_path, dtype="float32"):
    """transformers' LlamaForCausalLM for "smollm2", a Llama .gguf file or an HF Llama folder, in eval mode."""
    torch = require("torch", "reference", PURPOSE)
    transformers = require("transformers", "reference", PURPOSE)
    key = str(name_or_path)
    if key == "smollm2":
        from reffuse.formats.fetch import fetch
        path = fetch("smollm2")
    else:
        path = Path(key)
    if path.suffix == ".gguf" and path.is_file():
        require("gguf", "reference", PURPOSE)
        require("accelerate", "reference", PURPOSE)
        folder, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if config.get("format") == "reffuse":
            raise ReffuseError(f"{path} is a reffuse model folder, which transformers cannot run (its blocks may be "
                               "fused or lack attention); compare it with `reffuse dump` / `verify --against`")
        folder, kwargs = path, {}
    else:
        raise ReffuseError(f"no transformers reference for {key!r}: give 'smollm2', a Llama .gguf file, or an HF "
                           "Llama folder")
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[str(np.dtype(dtype))]
    # transformers 4.56 renamed torch_dtype to dtype
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs, **{dtype_kw: torch_dtype})
    if type(model).__name__ != "LlamaForCausalLM":
        raise ReffuseError(f"{path} loads in transformers as {type(model).__name__}, not LlamaForCausalLM")
    return model.eval()


def reference_activations(model, token_ids) -> Activations:
    """token_ids, hidden_states [L+1, T, d] (embedding, then each decoder layer's output) and logits [T, vocab]."""
    torch = require("torch", "reference", PURPOSE)
    ids = np.asarray(token_ids, dtype=np.int64)
    captured = []

    def keep(module, inputs, output):  # a decoder layer returns a tensor (transformers 5) or a tuple (4.x)
        captured.append((output[0] if isinstance(output, tuple) else output)[0].detach().numpy().copy())

    hooks = [model.model.embed_tokens.register_forward_hook(keep)]
    hooks += [layer.register_forward_hook(keep) for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return Activations(ids, logits, np.stack(captured))


def reference_greedy(model, token_ids, max_new_tokens: int) -> list[int]:
    """Greedy continuation with transformers' own KV cache: argmax of each step's logits, no early stop."""
    torch = require("torch", "reference", PURPOSE)
    # the cache argument and output are `cache` in recent transformers, `past_key_values` before
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    new_ids: list[int] = []
    inputs = torch.from_numpy(np.asarray(token_ids, dtype=np.int64))[None]
    cache = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(inputs, use_cache=True, **{cache_name: cache})
            cache = getattr(out, cache_name)
            token = int(out.logits[0, -1].argmax())
            new_ids.append(token)
            inputs = torch.tensor([[token]])
    return new_ids
