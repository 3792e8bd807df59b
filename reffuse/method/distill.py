"""Local distillation of a fused block in NumPy: its gate, up and down trained to reproduce the sequential run.

The closed-form refit (reffuse.method.calibrate) keeps the fused gate and up projections and solves for the down
projection. Here all three are trained by gradient descent (Adam) on the same local objective and the same cached
calibration inputs. For the stream x [T, d] entering the run, its sequential update R = f_last(...f_first(x)) - x,
and token weights w_t = 1 / ||x_t + R_t|| (calibrate's "relative" weighting, so that the attention sink's huge
stream does not outweigh every other token), the loss is the fused block's relative squared error

    L = Σ_t w_t² ||F(x_t) - R_t||² / Σ_t w_t² ||R_t||²,      F(x) = (silu(u W_g^T) ⊙ u W_u^T) W_d^T,  u = η*(x)

(1 is predicting nothing; training starts from plain fusion, Theorem 3.1's weights). Its gradient is SwiGLU's
backward (reffuse.training.backward.swiglu_backward, the same code that backpropagates through a model) from
dL/dF = 2 w² (F - R) / Z (Z the denominator); u does not depend on the weights (the fused block's RMSNorm has unit
gain under norm="fold"), so it needs none. Steps are full-batch over the cached tokens, in the model's dtype,
with AdamW (reffuse.training.optim) at a constant learning rate and no weight decay. It is the local part of what
the paper does with knowledge distillation on billions of tokens: only the fused block learns, only from its own
run's inputs and outputs (`reffuse heal` distils the whole model's output instead).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from reffuse.core.backend import array_module
from reffuse.core.model import FFN, Model, rms_norm
from reffuse.errors import ReffuseError
from reffuse.method.calibrate import fuse_group_by_group, sequential_update
from reffuse.training.backward import swiglu_backward, swiglu_forward
from reffuse.training.optim import AdamW

DEFAULT_STEPS = 200
DEFAULT_LEARNING_RATE = 1e-4
BETAS = (0.9, 0.999)


@dataclass
class GroupDistillation:
    """What training one fused group did."""
    group: tuple[int, int]
    tokens: int
    steps: int
    learning_rate: float
    losses: list             # the relative squared error before step 0, 10, 20, ... and after the last step

    def as_dict(self) -> dict:
        return asdict(self)


def local_loss_and_gradients(ffn: FFN, u, targets, weights):
    """L and (dW_g, dW_u, dW_d) of the module doc for the normalised inputs u [T, d], targets R [T, d] and token
    weights w [T, 1]."""
    xp = array_module(u)
    output, cache = swiglu_forward(ffn, u)                           # F [T, d]
    error = output - targets                                         # F - R [T, d]
    scale = 1.0 / float(xp.sum((weights * targets) ** 2))
    loss = float(xp.sum((weights * error) ** 2)) * scale
    _, grads = swiglu_backward(2 * scale * weights ** 2 * error, cache, ffn)  # from dL/dF
    return loss, (grads["gate"], grads["up"], grads["down"])


def train_fused_ffn(ffn: FFN, u, targets, weights, steps: int = DEFAULT_STEPS,
                    learning_rate: float = DEFAULT_LEARNING_RATE) -> tuple[FFN, list]:
    """AdamW on the three projections of `ffn` from its current weights; the trained FFN and the losses (before
    every tenth step and after the last)."""
    params = {"gate": ffn.gate.copy(), "up": ffn.up.copy(), "down": ffn.down.copy()}
    optimizer = AdamW(params, betas=BETAS)
    losses = []
    for step in range(1, steps + 1):
        loss, grads = local_loss_and_gradients(FFN(ffn.norm_gain, **params), u, targets, weights)
        if (step - 1) % 10 == 0:
            losses.append(loss)
        if not np.isfinite(loss):
            raise ReffuseError(f"local distillation diverged at step {step} (loss {loss}): use a smaller "
                               "learning rate")
        optimizer.step(dict(zip(("gate", "up", "down"), grads)), learning_rate)
    trained = FFN(ffn.norm_gain, **params)
    losses.append(local_loss_and_gradients(trained, u, targets, weights)[0])
    return trained, losses


def distill_group(model: Model, group: tuple[int, int], ffn: FFN, streams: list, steps: int = DEFAULT_STEPS,
                  learning_rate: float = DEFAULT_LEARNING_RATE) -> tuple[FFN, GroupDistillation]:
    """The fused FFN of `group` trained on the streams [T_w, d] entering it (the pre-fusion model's run on them
    gives the targets)."""
    first, last = group
    x = array_module(streams[0]).concatenate(streams)                # [T, d]
    targets = sequential_update(model, first, last, x)               # R [T, d]
    xp = array_module(x)
    weights = 1.0 / xp.linalg.norm(x + targets, axis=-1, keepdims=True)  # [T, 1]
    u = rms_norm(x, ffn.norm_gain, model.config.norm_eps)
    trained, losses = train_fused_ffn(ffn, u, targets, weights, steps, learning_rate)
    return trained, GroupDistillation(tuple(group), int(x.shape[0]), steps, learning_rate, losses)


def distilled_fuse(model: Model, groups, windows, steps: int = DEFAULT_STEPS,
                   learning_rate: float = DEFAULT_LEARNING_RATE, progress=None
                   ) -> tuple[Model, list[GroupDistillation]]:
    """fuse(model, groups, norm="fold") with every fused block trained by local distillation on the calibration
    `windows`, group after group on the stream the groups before it produce (as calibrated_fuse)."""
    return fuse_group_by_group(model, groups, windows, "fold",
                               lambda group, ffn, streams: distill_group(model, group, ffn, streams, steps,
                                                                         learning_rate), progress)
