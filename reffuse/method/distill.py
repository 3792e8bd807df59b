"""Local distillation of a fused block in NumPy: its gate, up and down trained to reproduce the sequential run.

The closed-form refit (reffuse.method.calibrate) keeps the fused gate and up projections and solves for the down
projection. Here all three are trained by gradient descent (Adam) on the same local objective and the same cached
calibration inputs. For the stream x [T, d] entering the run, its sequential update R = f_last(...f_first(x)) - x,
and token weights w_t = 1 / ||x_t + R_t|| (calibrate's "relative" weighting, so that the attention sink's huge
stream does not outweigh every other token), the loss is the fused block's relative squared error

    L = Σ_t w_t² ||F(x_t) - R_t||² / Σ_t w_t² ||R_t||²,      F(x) = (silu(u W_g^T) ⊙ u W_u^T) W_d^T,  u = η*(x)

(1 is predicting nothing; training starts from plain fusion, Theorem 3.1's weights). With G = u W_g^T, V = u W_u^T,
S = silu(G), H = S ⊙ V and E = 2 w² (F - R) / Z (Z the denominator), the gradients are

    dW_d = Eᵀ H,   dH = E W_d,   dW_u = (dH ⊙ S)ᵀ u,   dW_g = (dH ⊙ V ⊙ silu'(G))ᵀ u,
    silu'(g) = σ(g) (1 + g (1 - σ(g))),

u does not depend on the weights (the fused block's RMSNorm has unit gain under norm="fold"), so it needs none.
Steps are full-batch over the cached tokens, in the model's dtype (the tests check the gradients against finite
differences in float64); Adam with the usual betas. It is the local part of what the paper does with knowledge
distillation on billions of tokens: only the fused block learns, only from its own run's inputs and outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from reffuse.core.backend import array_module
from reffuse.core.model import FFN, Model, rms_norm, silu
from reffuse.errors import ReffuseError
from reffuse.method.calibrate import fuse_group_by_group, sequential_update

DEFAULT_STEPS = 200
DEFAULT_LEARNING_RATE = 1e-4
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


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
    gate_in, up_in = u @ ffn.gate.T, u @ ffn.up.T                   # G, V [T, dh]
    activated = silu(gate_in)                                        # S
    hidden = activated * up_in                                       # H
    error = hidden @ ffn.down.T - targets                            # F - R [T, d]
    scale = 1.0 / float(xp.sum((weights * targets) ** 2))
    loss = float(xp.sum((weights * error) ** 2)) * scale
    e = 2 * scale * weights ** 2 * error                             # dL/dF
    d_down = e.T @ hidden                                            # [d, dh]
    d_hidden = e @ ffn.down                                          # [T, dh]
    with np.errstate(over="ignore"):  # e^-g overflows for g < -88 (float32): σ is 0 there, as it should be
        sigmoid = 1 / (1 + xp.exp(-gate_in))
    d_gate_in = d_hidden * up_in * sigmoid * (1 + gate_in * (1 - sigmoid))
    return loss, ((d_gate_in.T @ u), ((d_hidden * activated).T @ u), d_down)


def train_fused_ffn(ffn: FFN, u, targets, weights, steps: int = DEFAULT_STEPS,
                    learning_rate: float = DEFAULT_LEARNING_RATE) -> tuple[FFN, list]:
    """Adam on the three projections of `ffn` from its current weights; the trained FFN and the losses (before
    every tenth step and after the last)."""
    xp = array_module(u)
    params = [ffn.gate.copy(), ffn.up.copy(), ffn.down.copy()]
    moments = [(xp.zeros_like(p), xp.zeros_like(p)) for p in params]
    losses = []
    for step in range(1, steps + 1):
        current = FFN(ffn.norm_gain, *params)
        loss, grads = local_loss_and_gradients(current, u, targets, weights)
        if (step - 1) % 10 == 0:
            losses.append(loss)
        if not np.isfinite(loss):
            raise ReffuseError(f"local distillation diverged at step {step} (loss {loss}): use a smaller "
                               "learning rate")
        for p, g, (m, v) in zip(params, grads, moments):
            m *= BETAS[0]
            m += (1 - BETAS[0]) * g
            v *= BETAS[1]
            v += (1 - BETAS[1]) * g * g
            m_hat, v_hat = m / (1 - BETAS[0] ** step), v / (1 - BETAS[1] ** step)
            p -= learning_rate * m_hat / (xp.sqrt(v_hat) + ADAM_EPS)
    trained = FFN(ffn.norm_gain, *params)
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
