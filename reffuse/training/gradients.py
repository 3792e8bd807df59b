"""The loss of a window and its gradient for every trainable weight: the whole model's forward and backward.

    x_0 = E[ids]                                     embedding
    x_{i+1} = f_i(x_i)                               blocks, eq. 1-2 (eq. 4 attention-free, a fused block alike)
    z = η_final(x_n) W_head^T                        final norm and LM head
    L = cross-entropy(z, next ids) or τ² KL(teacher || student)   (reffuse.training.losses)

and backward in the opposite order. A residual add x + F(x) passes its gradient on unchanged and adds F's:
dx = dy + (∂F/∂x)^T dy. Blocks below the lowest trainable weight only run forward (nothing there needs a
gradient); pieces that are frozen pass the gradient through without weight-gradient work. With tied embeddings
the embedding's gradient is the sum of the LM head's and the lookup's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import array_module
from reffuse.core.model import Block, Linear, Model, check_token_ids, run_blocks
from reffuse.core.rope import rope_tables
from reffuse.core.names import ATTENTION_NAMES, EMBED, FFN_NAMES, FINAL_NORM, LM_HEAD, block_prefix, named_weights
from reffuse.errors import ReffuseError
from reffuse.training import backward as bw
from reffuse.training.losses import head_loss


@dataclass
class BlockCache:
    """What a block's backward reads, per sub-block (None where the block has none)."""
    attention_norm: tuple | None = None
    attention: bw.AttentionCache | None = None
    ffn_norm: tuple | None = None
    ffn: tuple | None = None


def block_forward(block: Block, x, model: Model, cos, sin):
    """One block, eq. 1-2, keeping what the backward reads. x [T, d] -> [T, d]."""
    eps, cache = model.config.norm_eps, BlockCache()
    if block.attention is not None:
        normed, cache.attention_norm = bw.rms_norm_forward(x, block.attention.norm_gain, eps)
        out, cache.attention = bw.attention_forward(block.attention, normed, model.config, cos, sin)
        x = x + out                                                                    # eq. 1
    if block.ffn is not None:
        normed, cache.ffn_norm = bw.rms_norm_forward(x, block.ffn.norm_gain, eps)
        out, cache.ffn = bw.swiglu_forward(block.ffn, normed)
        x = x + out                                                                    # eq. 2 / eq. 4
    return x, cache


def block_backward(dy, block: Block, cache: BlockCache, cos, sin, prefix: str, trainable):
    """dy [T, d] leaving the block -> dx [T, d] entering it, and the block's trainable weight gradients by name."""
    grads = {}

    def keep(part_grads, names, norm_grad):
        for field, hf in names.items():
            if prefix + hf in trainable:
                grads[prefix + hf] = norm_grad if field == "norm_gain" else part_grads[field]

    if block.ffn is not None:  # x_out = x_mid + FFN(η2(x_mid))
        train = {f for f, hf in FFN_NAMES.items() if prefix + hf in trainable}
        d_normed, ffn_grads = bw.swiglu_backward(dy, cache.ffn, block.ffn, weights=bool(train - {"norm_gain"}))
        d_mid, d_gain = bw.rms_norm_backward(d_normed, cache.ffn_norm, block.ffn.norm_gain, "norm_gain" in train)
        keep(ffn_grads, FFN_NAMES, d_gain)
        dy = dy + d_mid
    if block.attention is not None:  # x_mid = x + Attn(η1(x))
        train = {f for f, hf in ATTENTION_NAMES.items() if prefix + hf in trainable}
        d_normed, attn_grads = bw.attention_backward(dy, cache.attention, block.attention, cos, sin,
                                                     weights=bool(train - {"norm_gain"}))
        d_in, d_gain = bw.rms_norm_backward(d_normed, cache.attention_norm, block.attention.norm_gain,
                                            "norm_gain" in train)
        keep(attn_grads, ATTENTION_NAMES, d_gain)
        dy = dy + d_in
    return dy, grads


def check_trainable(model: Model, trainable) -> set:
    """The names that train: all of the model's weights for None, else the given HF names (each must exist)."""
    names = named_weights(model)
    if trainable is None:
        return set(names)
    trainable = set(trainable)
    unknown = sorted(trainable - set(names))
    if unknown:
        raise ReffuseError(f"no weight named {unknown[0]} in {model.config.name}: trainable names are the model's "
                           f"HF tensor names, e.g. {next(iter(names))}")
    if not trainable:
        raise ReffuseError("nothing to train: the trainable set is empty")
    return trainable


def first_trainable_block(model: Model, trainable: set) -> int:
    """The lowest block with a trainable weight (0 when the embedding trains; len(blocks) when none does)."""
    if EMBED in trainable:
        return 0
    for i in range(len(model.blocks)):
        if any(name.startswith(block_prefix(i)) for name in trainable):
            return i
    return len(model.blocks)


def check_differentiable(model: Model) -> None:
    """Refuse, by name, what the backward below does not differentiate: attention biases and sub-blocks replaced
    by a linear map."""
    cfg = model.config
    if cfg.qkv_bias or cfg.o_bias:
        raise ReffuseError(f"{cfg.name} has attention biases, which reffuse's backward does not differentiate: "
                           "training takes Llama attention without biases")
    linear = [i for i, b in enumerate(model.blocks) if isinstance(b.attention, Linear) or isinstance(b.ffn, Linear)]
    if linear:
        raise ReffuseError(f"block {linear[0]} of {cfg.name} has a sub-block replaced by a linear map, which "
                           f"reffuse's backward does not differentiate ({len(linear)} such blocks)")


def gradients(model: Model, token_ids, teacher_logits=None, temperature: float = 1.0, trainable=None):
    """(loss, grads) of one window token_ids [T].

    loss: the mean next-token cross-entropy over the T - 1 predictions when `teacher_logits` is None; otherwise
    the mean over the T positions of KL(softmax(teacher / τ) || softmax(student / τ)) · τ², teacher_logits [T, vocab].
    grads: HF tensor name (as save_model numbers the blocks) -> gradient of the loss, the weight's shape, dtype and
    device, for the names in `trainable` (every weight when None)."""
    ids = check_token_ids(model, token_ids)
    T, cfg = len(ids), model.config
    if teacher_logits is None and T < 2:
        raise ReffuseError("next-token cross-entropy needs at least 2 tokens (1 prediction); got 1")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (T, cfg.vocab_size):
        raise ReffuseError(f"teacher logits have shape {tuple(teacher_logits.shape)}; {T} tokens need "
                           f"({T}, {cfg.vocab_size})")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ReffuseError(f"temperature must be a finite number > 0, got {temperature}")
    check_differentiable(model)
    trainable = check_trainable(model, trainable)
    xp = array_module(model.embed)
    cos, sin = rope_tables(np.arange(T), cfg.head_dim, cfg.rope_theta, model.dtype, xp, cfg.rope_scaling)
    device_ids = xp.asarray(ids)

    # forward
    first = first_trainable_block(model, trainable)
    x = bw.embedding_forward(model.embed, device_ids)                                   # [T] -> [T, d]
    x = run_blocks(model, x, cos, sin, stop=first)                                      # frozen: no caches
    caches = []
    for block in model.blocks[first:]:
        x, cache = block_forward(block, x, model, cos, sin)
        caches.append(cache)
    h, final_cache = bw.rms_norm_forward(x, model.norm_gain, cfg.norm_eps)
    head_name = EMBED if cfg.tie_embeddings else LM_HEAD
    loss, dh, d_head = head_loss(h, model.lm_head, ids, teacher_logits, temperature, head_name in trainable)

    # backward
    grads = {}
    dx, d_gain = bw.rms_norm_backward(dh, final_cache, model.norm_gain, FINAL_NORM in trainable)
    if d_gain is not None:
        grads[FINAL_NORM] = d_gain
    for i in reversed(range(first, len(model.blocks))):
        dx, block_grads = block_backward(dx, model.blocks[i], caches[i - first], cos, sin, block_prefix(i), trainable)
        grads.update(block_grads)
    if EMBED in trainable:
        d_embed = bw.embedding_backward(dx, device_ids, cfg.vocab_size)
        grads[EMBED] = d_embed + d_head if cfg.tie_embeddings else d_embed
    if d_head is not None and not cfg.tie_embeddings:
        grads[LM_HEAD] = d_head
    return loss, {name: grads[name] for name in named_weights(model) if name in grads}
