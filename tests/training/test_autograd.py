"""reffuse's gradients against PyTorch autograd (the independent side), and AdamW against torch.optim.AdamW.

- SmolLM2 against transformers' LlamaForCausalLM holding the same weights. transformers computes RMSNorm, RoPE's
  tables and the eager softmax in float32 whatever the model's dtype; for the float64 check those three are
  patched here to keep the input's dtype (the same formulas), so that both sides are float64 throughout; its
  loss function casts the logits to float32, so the loss is taken from its logits here.
- An attention-removed model and a fused one against the paper's equations written in PyTorch
  (reffuse.speed.torch_models.equations_forward; transformers has no class for them).
Tolerances: every gradient tensor within 1e-9 of its own largest entry in float64 (the two sides sum in different
orders over T·vocab terms: ~1e-13 observed), and 1e-4 in float32 (float32's 6e-8 grown by the depth of the model).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reffuse  # noqa: E402
from reffuse.core.names import named_weights  # noqa: E402
from reffuse.speed.torch_models import equations_forward, transformers_llama  # noqa: E402
from reffuse.training.optim import AdamW, Schedule, clip_by_global_norm  # noqa: E402

TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


def worst_error(ours: dict, theirs: dict) -> float:
    """The largest, over tensors, of max |ours - theirs| / max |theirs|."""
    assert set(ours) == set(theirs)
    return max(float(np.abs(ours[n] - theirs[n]).max() / np.abs(theirs[n]).max()) for n in theirs)


def torch_weights(model, dtype):
    return {n: torch.tensor(np.asarray(w), dtype=dtype, requires_grad=True) for n, w in named_weights(model).items()}


def autograd_gradients(model, ids, dtype, teacher=None, temperature=1.0):
    weights = torch_weights(model, dtype)
    logits = equations_forward(model, weights, ids)
    if teacher is None:
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.as_tensor(ids[1:]))
    else:
        log_p = torch.log_softmax(torch.as_tensor(teacher, dtype=dtype) / temperature, -1)
        log_q = torch.log_softmax(logits / temperature, -1)
        loss = temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    loss.backward()
    return loss.item(), {n: w.grad.numpy() for n, w in weights.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", ["attention removed", "fused"])
def test_attention_removed_and_fused_models_against_autograd(dtype, variant):
    model = reffuse.cast(reffuse.build_tiny(), dtype)              # blocks 4-9 attention-free
    if variant == "fused":
        model = reffuse.fuse(model, [(4, 9)])
    ids = np.random.default_rng(2).integers(0, 256, 24)
    loss, grads = reffuse.gradients(model, ids)
    torch_loss, torch_grads = autograd_gradients(model, ids, getattr(torch, dtype))
    assert loss == pytest.approx(torch_loss, rel=TOLERANCE[dtype])
    error = worst_error(grads, torch_grads)
    print(f"worst relative error, {variant} tiny vs the equations in PyTorch, {dtype}: {error:.1e}")
    assert error < TOLERANCE[dtype]


def test_distillation_against_autograd():
    model = reffuse.cast(reffuse.build_tiny(), "float64")
    rng = np.random.default_rng(3)
    ids, teacher = rng.integers(0, 256, 16), 3 * rng.standard_normal((16, 256))
    loss, grads = reffuse.gradients(model, ids, teacher_logits=teacher, temperature=2.0)
    torch_loss, torch_grads = autograd_gradients(model, ids, torch.float64, teacher, 2.0)
    assert loss == pytest.approx(torch_loss, rel=1e-12)
    error = worst_error(grads, torch_grads)
    print(f"worst relative error, distillation loss (tau 2) tiny vs PyTorch, float64: {error:.1e}")
    assert error < 1e-9


def float64_transformers(monkeypatch, theta, head_dim):
    """Patch transformers' Llama to keep float64 in RMSNorm, RoPE's tables (its inv_freq buffer is made in float32)
    and the eager softmax (same formulas)."""
    from transformers.models.llama import modeling_llama as llama

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = position_ids[..., None].to(torch.float64) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(llama.LlamaRotaryEmbedding, "forward", rotary)
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim=-1, dtype=None: torch.softmax(x, dim=dim))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_smollm2_against_transformers_autograd(smollm2, monkeypatch, dtype):
    pytest.importorskip("transformers")
    model = reffuse.cast(smollm2, dtype)
    cfg = model.config
    if dtype == "float64":
        float64_transformers(monkeypatch, cfg.rope_theta, cfg.head_dim)
    reference = transformers_llama(model, dtype, attn_implementation="eager")
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, 48)
    logits = reference(input_ids=torch.as_tensor(ids)[None]).logits[0]
    torch_loss = torch.nn.functional.cross_entropy(logits[:-1], torch.as_tensor(ids[1:]))  # in the logits' dtype
    torch_loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in reference.named_parameters() if p.grad is not None}
    loss, grads = reffuse.gradients(model, ids)
    assert loss == pytest.approx(torch_loss.item(), rel=TOLERANCE[dtype])
    error = worst_error(grads, torch_grads)
    print(f"worst relative error, SmolLM2 vs transformers' autograd, {dtype}: {error:.1e}")
    assert error < TOLERANCE[dtype]


def test_twenty_adamw_steps_against_torch():
    """The same gradients (reffuse's, at reffuse's weights) drive both optimizers: weight decay on matrices only,
    clipping by global norm, warm-up then cosine decay (torch's LambdaLR)."""
    model = reffuse.cast(reffuse.build_tiny(), "float64")
    weights = {n: w.copy() for n, w in named_weights(model).items()}
    model = reffuse.core.names.with_weights(model, weights)
    theirs = {n: torch.tensor(w) for n, w in weights.items()}
    schedule = Schedule(peak=3e-3, steps=20, warmup=5, final_fraction=0.1)
    ours = AdamW(weights, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    groups = [{"params": [p for n, p in theirs.items() if p.ndim == 2], "weight_decay": 0.1},
              {"params": [p for n, p in theirs.items() if p.ndim != 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=schedule.peak, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.rate(s + 1) / schedule.peak)
    rng = np.random.default_rng(5)
    worst = 0.0
    for step in range(1, 21):
        _, grads = reffuse.gradients(model, rng.integers(0, 256, 16))
        for n, p in theirs.items():
            p.grad = torch.tensor(grads[n])
        torch.nn.utils.clip_grad_norm_(list(theirs.values()), max_norm=0.5)
        clip_by_global_norm(grads, 0.5)
        ours.step(grads, schedule.rate(step))
        optimizer.step()
        scheduler.step()
        worst = max(worst, max(float(np.abs(weights[n] - p.numpy()).max() / np.abs(p.numpy()).max())
                               for n, p in theirs.items()))
    print(f"worst relative error, 20 AdamW steps vs torch.optim.AdamW, float64: {worst:.1e}")
    assert worst < 1e-10
