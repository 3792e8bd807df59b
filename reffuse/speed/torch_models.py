"""A reffuse model's weights in PyTorch (the `reference` extra): the independent side of the gradient checks and
of `reffuse bench --train`.

- transformers_llama: transformers' LlamaForCausalLM holding the weights of a plain Llama (every block with its
  attention and its FFN, none fused), the LM head tied to the embedding where the model ties them;
- equations_forward: the logits of any reffuse model written from the paper's equations as a short autograd
  forward, for the models transformers has no class for (attention removed, FFNs fused): eq. 1-2 per block,
  either sub-block absent as the model says, a fused block one wide SwiGLU; rotate-half RoPE; query head h reads
  kv head h // group; with a KV cache, a plain PyTorch Llama that decodes (the GPU run's eager peer, where
  transformers may be absent);
- TorchStep: one training step in PyTorch on either, on the CPU or a CUDA device, the other side of
  `reffuse bench --train` and of the GPU run's training step.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

from reffuse.core.model import Model
from reffuse.core.names import named_weights, with_weights
from reffuse.errors import ReffuseError
from reffuse.optional import available, require
from reffuse.speed.train_result import Hyperparameters, TorchLibraries

PURPOSE = "running a reffuse model in PyTorch"


def is_plain_llama(model: Model) -> bool:
    """Whether transformers' LlamaForCausalLM can hold the model: every block has an attention and an FFN, all
    FFNs of one width, none fused."""
    return (all(b.attention is not None and b.ffn is not None and not b.fused_from for b in model.blocks)
            and len({b.ffn.width for b in model.blocks}) == 1)


def transformers_llama(model: Model, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """transformers' LlamaForCausalLM with the model's shapes and a copy of its weights (load_state_dict, strict),
    lm_head tied to the embedding where the model ties them; in train mode."""
    torch = require("torch", "reference", PURPOSE)
    transformers = require("transformers", "reference", PURPOSE)
    cfg = model.config
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=model.blocks[0].ffn.width,
        num_hidden_layers=len(model.blocks), num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation=attn_implementation,
        max_position_embeddings=cfg.max_positions or 2048)
    reference = transformers.LlamaForCausalLM(config).to(getattr(torch, str(np.dtype(dtype))))
    with warnings.catch_warnings():  # read-only arrays (a mapped file) are only read: load_state_dict copies
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {n: torch.from_numpy(np.asarray(w)) for n, w in named_weights(model).items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(state, strict=True)
    return reference.train()


def equations_forward(model: Model, weights: dict, ids, cache: dict | None = None):
    """Logits [T, vocab] of the model's structure from the equations, on `weights` (HF name -> torch tensor, all on
    one device). With `cache` (a dict, empty before the first call), each block's keys and values [kv_heads, t, hd]
    are kept there and `ids` continue the positions of the calls before: a KV-cache prefill, then decode steps."""
    torch = require("torch", "reference", PURPOSE)
    cfg, T = model.config, len(ids)
    hd, eps = cfg.head_dim, cfg.norm_eps
    past = cache.get("positions", 0) if cache is not None else 0
    device = weights["model.norm.weight"].device
    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd)
    angles = torch.arange(past, past + T, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    dtype = weights["model.norm.weight"].dtype
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def norm(x, gain):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * gain

    def rope(x):  # [heads, T, hd]
        half = hd // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    x = weights["model.embed_tokens.weight"][torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)]
    mask = torch.triu(torch.full((T, past + T), -math.inf, dtype=dtype, device=device), past + 1)  # [T, past + T]
    for i, block in enumerate(model.blocks):
        w = {k[len(f"model.layers.{i}."):]: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}
        if block.attention is not None:
            h = norm(x, w["input_layernorm.weight"])
            q = rope((h @ w["self_attn.q_proj.weight"].T).view(T, -1, hd).transpose(0, 1))
            k = rope((h @ w["self_attn.k_proj.weight"].T).view(T, -1, hd).transpose(0, 1))
            v = (h @ w["self_attn.v_proj.weight"].T).view(T, -1, hd).transpose(0, 1)
            if cache is not None:  # the earlier positions' keys and values first
                if i in cache:
                    k, v = torch.cat([cache[i][0], k], dim=1), torch.cat([cache[i][1], v], dim=1)
                cache[i] = (k, v)
            group = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, dim=-1)
            x = x + (probs @ v).transpose(0, 1).reshape(T, -1) @ w["self_attn.o_proj.weight"].T
        if block.ffn is not None:
            h = norm(x, w["post_attention_layernorm.weight"])
            x = x + (torch.nn.functional.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) \
                @ w["mlp.down_proj.weight"].T
    if cache is not None:
        cache["positions"] = past + T
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return norm(x, weights["model.norm.weight"]) @ head.T


class TorchStep:
    """One training step in PyTorch, as reffuse.speed.train_bench times it: cross-entropy of the next tokens,
    autograd, clip_grad_norm_ and torch.optim.AdamW (its default implementation; weight decay on matrices only),
    on transformers' LlamaForCausalLM (sdpa attention) for a plain Llama where transformers is installed, else on
    equations_forward; only the trainable tensors require grad; on torch's `device` ("cpu", "cuda"), from a model
    whose weights are NumPy arrays. step() -> the loss before the update."""

    def __init__(self, model: Model, trainable, ids, hyperparameters: Hyperparameters, device: str = "cpu"):
        torch = self.torch = require("torch", "reference", PURPOSE)
        trainable, ids = set(trainable), np.asarray(ids, dtype=np.int64)
        self.targets = torch.from_numpy(ids[1:].copy()).to(device)
        if is_plain_llama(model) and available("transformers"):
            module = transformers_llama(model, "float32", attn_implementation="sdpa").to(device)
            params = dict(module.named_parameters())  # a tied LM head is listed once, as the embedding
            for name, p in params.items():
                p.requires_grad_(name in trainable)
            input_ids = torch.from_numpy(ids.copy())[None].to(device)
            self.logits = lambda: module(input_ids=input_ids, use_cache=False).logits[0]
            self.implementation = "transformers LlamaForCausalLM (sdpa attention), autograd, torch.optim.AdamW"
        else:
            with warnings.catch_warnings():  # frozen arrays are only read
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                params = {n: (torch.tensor(np.array(w), requires_grad=True, device=device) if n in trainable
                              else torch.from_numpy(np.asarray(w)).to(device)) for n, w in named_weights(model).items()}
            if device == "cpu":  # the model's structure over the tensors' memory: trainable arrays not kept twice
                model = with_weights(model, {n: params[n].detach().numpy() for n in trainable})
            self.logits = lambda: equations_forward(model, params, ids)
            self.implementation = "the equations in PyTorch (equations_forward), autograd, torch.optim.AdamW"
        missing = sorted(trainable - set(params))
        if missing:
            raise ReffuseError(f"PyTorch's model has no parameter {missing[0]}")
        self.params = [p for n, p in params.items() if n in trainable]
        h = self.hyperparameters = hyperparameters
        groups = [{"params": [p for p in self.params if p.ndim == 2], "weight_decay": h.weight_decay},
                  {"params": [p for p in self.params if p.ndim != 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=h.learning_rate,
                                           betas=h.betas, eps=h.eps)
        self.parameters = sum(p.numel() for p in self.params)

    def step(self) -> float:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.logits()[:-1], self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.hyperparameters.clip)
        self.optimizer.step()
        return loss.item()


def torch_libraries() -> TorchLibraries:
    """What torch computes with here: its BLAS, its CPU kernels, its threads."""
    torch = require("torch", "reference", PURPOSE)
    shown = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", shown)
    blas = re.search(r"BLAS_INFO=(\w+)", shown)
    return TorchLibraries(f"MKL {mkl.group(1)}" if mkl else blas.group(1) if blas else None,
                          torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
