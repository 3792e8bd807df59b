"""The training losses on the LM head's logits, and their gradients, a few positions at a time.

A window's logits are [T, vocab] (T·49,152 numbers for SmolLM2): the loss, its gradient and their temporaries
are made CHUNK_ROWS positions at a time (reffuse.evaluation.scoring.row_chunks), each chunk's logit gradient
sent through the LM head at once, so no [T, vocab] array is ever held.

    next-token cross-entropy   L = -1/(T-1) Σ_{t<T-1} log p(ids[t+1] | ..t),       dz_t = (p_t - onehot) / (T-1)
    distillation (KD)          L = τ²/T Σ_t KL(softmax(z^T_t/τ) || softmax(z_t/τ)),  dz_t = τ (q_t - p^T_t) / T

where z are the student's logits, q_t = softmax(z_t/τ) and p^T_t the teacher's softened distribution. The τ² keeps
the gradient's scale independent of the temperature (Hinton et al., 2015).
"""

from __future__ import annotations

from reffuse.core.backend import array_module
from reffuse.evaluation.scoring import row_chunks


def log_softmax_rows(z):
    """log softmax over the last axis, in z's dtype. [R, V] -> [R, V]."""
    xp = array_module(z)
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy_rows(logits, targets, count: int):
    """Σ of -log p(target) over rows with a target (target -1: none), and d(that sum / count)/d logits.
    logits [R, V], targets [R] -> (float, [R, V])."""
    xp = array_module(logits)
    log_probs = log_softmax_rows(logits)
    rows = xp.arange(len(targets))
    has_target = targets >= 0
    picked = log_probs[rows, xp.where(has_target, targets, 0)]
    loss = -float((picked * has_target).sum())
    d_logits = xp.exp(log_probs)                                  # p
    d_logits[rows, xp.where(has_target, targets, 0)] -= 1         # p - onehot
    d_logits *= (has_target / count)[:, None].astype(logits.dtype)  # rows without a target contribute nothing
    return loss, d_logits


def distillation_rows(logits, teacher_logits, temperature: float, count: int):
    """τ² Σ_rows KL(softmax(teacher/τ) || softmax(logits/τ)) / count and its gradient.
    logits, teacher_logits [R, V] -> (float, [R, V])."""
    xp = array_module(logits)
    log_q = log_softmax_rows(logits / temperature)
    log_p = log_softmax_rows(xp.asarray(teacher_logits, dtype=logits.dtype) / temperature)
    p = xp.exp(log_p)
    loss = temperature ** 2 * float((p * (log_p - log_q)).sum()) / count
    return loss, (temperature / count) * (xp.exp(log_q) - p)


def head_loss(h, lm_head, token_ids=None, teacher_logits=None, temperature: float = 1.0, weights: bool = True):
    """The loss on logits z = h W^T (h [T, d] the final-normed stream, W [vocab, d] the LM head), and its
    gradients dh [T, d] and dW [vocab, d] (None when the head is frozen): dz = as in the module doc,
    dh = dz W, dW = dz^T h, summed over chunks of positions.

    Cross-entropy on the next tokens of `token_ids` [T] when `teacher_logits` is None, else distillation
    from `teacher_logits` [T, vocab] at `temperature`."""
    xp = array_module(h)
    T = h.shape[0]
    if teacher_logits is None:
        targets = xp.concatenate([xp.asarray(token_ids[1:]), xp.asarray([-1])])  # the last position: no target
    dh = xp.empty_like(h)
    d_head = xp.zeros_like(lm_head) if weights else None
    loss = 0.0
    for rows in row_chunks(T):
        logits = h[rows] @ lm_head.T                                              # [R, d] -> [R, vocab]
        if teacher_logits is None:
            part, d_logits = cross_entropy_rows(logits, targets[rows], T - 1)
            part /= T - 1
        else:
            part, d_logits = distillation_rows(logits, teacher_logits[rows], temperature, T)
        loss += part
        dh[rows] = d_logits @ lm_head                                             # [R, vocab] -> [R, d]
        if weights:
            d_head += d_logits.T @ h[rows]                                        # [vocab, R] @ [R, d]
    return loss, dh, d_head
