"""AdamW, its learning-rate schedule, and clipping by global norm.

AdamW (Loshchilov & Hutter, 2019), decoupled weight decay, step t = 1, 2, ...:

    θ ← θ (1 - lr·λ)                                   decay, applied to the weights themselves
    m ← β1 m + (1 - β1) g,   v ← β2 v + (1 - β2) g²
    θ ← θ - lr · (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + ε)

as torch.optim.AdamW computes it. Weight decay applies to matrices (projections, embedding), not to norm gains,
whose value 1 means "no scaling" rather than a weight to shrink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reffuse.core.backend import array_module
from reffuse.errors import ReffuseError


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `peak · final_fraction` at `steps`."""
    peak: float
    steps: int
    warmup: int = 0
    final_fraction: float = 0.1

    def __post_init__(self):
        if not (math.isfinite(self.peak) and self.peak > 0):
            raise ReffuseError(f"learning rate must be a finite number > 0, got {self.peak}")
        if self.steps < 1 or not 0 <= self.warmup <= self.steps:
            raise ReffuseError(f"warm-up of {self.warmup} steps does not fit a run of {self.steps} steps")
        if not 0 <= self.final_fraction <= 1:
            raise ReffuseError(f"the final learning rate fraction must lie in [0, 1], got {self.final_fraction}")

    def rate(self, step: int) -> float:
        """The learning rate of step `step` (1-based)."""
        if step <= self.warmup:
            return self.peak * step / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        low = self.peak * self.final_fraction
        return low + (self.peak - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def global_norm(grads: dict) -> float:
    """sqrt(Σ over every gradient of Σ g²)."""
    return math.sqrt(sum(float((g * g).sum()) for g in grads.values()))


def clip_by_global_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient in place by min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_); the norm before."""
    norm = global_norm(grads)
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads.values():
            g *= scale
    return norm


def decays(name: str, weight) -> bool:
    """Whether weight decay applies: to matrices, not to the norms' gains."""
    return weight.ndim == 2


class AdamW:
    """AdamW over named weights, updated in place. State: the step count and the moments m, v per name."""

    def __init__(self, weights: dict, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or not eps > 0 or not weight_decay >= 0:
            raise ReffuseError(f"AdamW needs 0 <= betas < 1, eps > 0, weight decay >= 0; got {betas}, {eps}, "
                               f"{weight_decay}")
        self.weights, self.betas, self.eps, self.weight_decay = weights, tuple(betas), eps, weight_decay
        self.step_count = 0
        self.m = {n: array_module(w).zeros_like(w) for n, w in weights.items()}
        self.v = {n: array_module(w).zeros_like(w) for n, w in weights.items()}

    def step(self, grads: dict, lr: float) -> None:
        """One update of every weight from its gradient, at learning rate `lr`."""
        self.step_count += 1
        b1, b2 = self.betas
        correction1, correction2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        for name, w in self.weights.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            xp = array_module(w)
            if self.weight_decay and decays(name, w):
                w *= 1 - lr * self.weight_decay
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            denominator = xp.sqrt(v) / math.sqrt(correction2) + self.eps
            w -= (lr / correction1) * m / denominator

    def state(self) -> dict:
        """Arrays to checkpoint: the moments, by "m/NAME" and "v/NAME"."""
        return {**{f"m/{n}": a for n, a in self.m.items()}, **{f"v/{n}": a for n, a in self.v.items()}}

    def load_state(self, arrays: dict, step_count: int) -> None:
        for name in self.weights:
            self.m[name][...] = arrays[f"m/{name}"]
            self.v[name][...] = arrays[f"v/{name}"]
        self.step_count = step_count
