"""The trainer: AdamW on a chosen set of weights, window after window, from a teacher's logits (knowledge
distillation) or from the next tokens.

A step accumulates the gradients of `windows_per_step` windows (their mean), clips them by global norm, and
takes one AdamW step at the schedule's learning rate (warm-up, then cosine decay). The windows come in a seeded
order: epoch e is the permutation default_rng([seed, e]) of the windows, so step s reads the same windows whether
the run was interrupted or not. A checkpoint (the trained weights, AdamW's moments, the step and the log) is
written all or nothing every `checkpoint_every` steps; `resume` continues from it with the same trajectory, bit
for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reffuse.core.backend import array_module, to_numpy
from reffuse.core.model import Model, forward, lm_logits
from reffuse.core.names import named_weights, with_weights
from reffuse.errors import ReffuseError
from reffuse.outputs import write_bytes_atomic
from reffuse.progress import note
from reffuse.records import FlatRecord
from reffuse.training.gradients import check_trainable, gradients
from reffuse.training.optim import AdamW, Schedule, clip_by_global_norm

CHECKPOINT_FILE = "checkpoint.npz"


@dataclass(frozen=True)
class TrainingOptions:
    """Every choice that shapes a training run's numbers."""
    steps: int
    windows_per_step: int = 1          # gradient accumulation: the mean gradient of this many windows per step
    learning_rate: float = 1e-4        # the peak, after warm-up
    warmup: int = 0                    # steps of linear warm-up
    final_fraction: float = 0.1        # the cosine decays to learning_rate · final_fraction at the last step
    weight_decay: float = 0.0
    clip: float = 1.0                  # the largest global gradient norm
    temperature: float = 1.0           # distillation's τ
    betas: tuple = (0.9, 0.95)
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "windows_per_step"):
            if getattr(self, key) < 1:
                raise ReffuseError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ReffuseError(f"clip must be a finite number > 0, got {self.clip}")
        Schedule(self.learning_rate, self.steps, self.warmup, self.final_fraction)  # its own checks

    def to_json(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_json(cls, raw: dict) -> "TrainingOptions":
        return cls(**{**raw, "betas": tuple(raw["betas"])})


@dataclass
class TrainingLog(FlatRecord):
    """What a run did, step by step."""
    losses: list = field(default_factory=list)          # the mean loss of each step's windows, before its update
    gradient_norms: list = field(default_factory=list)  # before clipping
    learning_rates: list = field(default_factory=list)
    tokens: int = 0                                      # tokens read so far
    seconds: float = 0.0                                 # time spent training (over resumed parts too)


TRAIN_CHOICES = ("fused", "run", "all", "blocks A-B")


def trainable_names(model: Model, choice: str) -> list[str]:
    """The HF names that train for --train: "fused" (the fused blocks), "run" (every attention-free block),
    "blocks A-B" (blocks A..B of the model as it is numbered), or "all"."""
    names = named_weights(model)
    if choice == "all":
        return list(names)
    if choice == "fused":
        blocks = [i for i, b in enumerate(model.blocks) if b.fused_from]
        what = "fused blocks"
    elif choice == "run":
        blocks = [i for i, b in enumerate(model.blocks) if b.attention is None and b.ffn is not None]
        what = "attention-free blocks"
    elif choice.startswith("blocks "):
        try:
            first, _, last = choice.removeprefix("blocks ").partition("-")
            first, last = int(first), int(last or first)
        except ValueError:
            raise ReffuseError(f"--train {choice!r}: write blocks A-B, e.g. 'blocks 5-8'") from None
        if not 0 <= first <= last < len(model.blocks):
            raise ReffuseError(f"--train {choice!r}: {model.config.name} has blocks 0-{len(model.blocks) - 1}")
        blocks, what = list(range(first, last + 1)), f"blocks {first}-{last}"
    else:
        raise ReffuseError(f"--train {choice!r} is not a choice: use one of {', '.join(TRAIN_CHOICES)}")
    if not blocks:
        raise ReffuseError(f"--train {choice}: {model.config.name} has no {what}; use --train all or blocks A-B")
    prefixes = tuple(f"model.layers.{i}." for i in blocks)
    return [n for n in names if n.startswith(prefixes)]


def window_index(step_window: int, n_windows: int, seed: int) -> int:
    """Which window the run reads as its `step_window`-th (0-based): epoch by epoch, each a seeded permutation."""
    epoch, position = divmod(step_window, n_windows)
    return int(np.random.default_rng([seed, epoch]).permutation(n_windows)[position])


def _checkpoint_state(options, trainable, model_name) -> dict:
    return {"options": options.to_json(), "trainable": sorted(trainable), "model": model_name}


def save_checkpoint(folder: Path, weights: dict, optimizer: AdamW, log: TrainingLog, state: dict) -> None:
    arrays = {f"w/{n}": to_numpy(w) for n, w in weights.items()}
    arrays.update({k: to_numpy(a) for k, a in optimizer.state().items()})
    state = {**state, "step": optimizer.step_count, "log": log.to_json()}
    buffer = io.BytesIO()
    np.savez(buffer, state=np.array(json.dumps(state)), **arrays)
    write_bytes_atomic(folder / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(folder: Path, weights: dict, optimizer: AdamW, state: dict) -> TrainingLog:
    """Restore weights and moments in place from the folder's checkpoint; its log. Refuse one of another run."""
    path = folder / CHECKPOINT_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = json.loads(str(data["state"]))
            arrays = {k: data[k] for k in data.files if k != "state"}
    except (OSError, ValueError, KeyError) as e:
        raise ReffuseError(f"{path} is not a reffuse training checkpoint ({e}): delete it to start afresh")
    for key in ("options", "trainable", "model"):
        if saved.get(key) != state[key]:
            raise ReffuseError(f"{path} was written by a run with other {key} ({saved.get(key)!r}, not "
                               f"{state[key]!r}): resume with the same settings, or delete it to start afresh")
    for name, w in weights.items():
        w[...] = array_module(w).asarray(arrays[f"w/{name}"])
    optimizer.load_state({k: array_module(weights[k[2:]]).asarray(a) for k, a in arrays.items()
                          if k[:2] in ("m/", "v/")}, saved["step"])
    return TrainingLog.from_json(saved["log"])


def take_step(optimizer: AdamW, schedule: Schedule, grads: dict, loss: float, step: int, clip: float,
              log: TrainingLog, tokens: int, started: float, what: str = "training") -> None:
    """Step `step` of a run: its gradients clipped by global norm, one AdamW update at the schedule's rate, and
    the step in the log (`tokens` read, the time since `started`). A non-finite loss stops the run before the
    update, which would carry it into every weight."""
    if not math.isfinite(loss):
        raise ReffuseError(f"{what} diverged at step {step} (loss {loss}): use a smaller learning rate")
    norm = clip_by_global_norm(grads, clip)
    rate = schedule.rate(step)
    optimizer.step(grads, rate)
    log.losses.append(loss)
    log.gradient_norms.append(norm)
    log.learning_rates.append(rate)
    log.tokens += tokens
    log.seconds += time.perf_counter() - started


def teacher_logits(teacher: Model, ids, streams: dict | None = None):
    """The teacher's logits [T, vocab] for the window ids [T].

    streams: if a dict, the teacher's stream leaving its last block, [T, d], is kept per window, so that the
    window seen again (another run over the same text) costs only the final norm and the LM head. The logits are
    the same, bit for bit: forward ends in that same lm_logits on that same stream."""
    if streams is None:
        return forward(teacher, ids)
    key = np.asarray(ids).tobytes()
    if key not in streams:
        hidden = []
        forward(teacher, ids, hidden_states=hidden)
        streams[key] = hidden[-1]
    return lm_logits(teacher, streams[key])


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def train(student: Model, windows, trainable, options: TrainingOptions, teacher: Model | None = None,
          checkpoint_folder=None, checkpoint_every: int = 0, resume: bool = False, progress: bool = True,
          teacher_streams: dict | None = None) -> tuple[Model, TrainingLog]:
    """The student with its `trainable` weights (HF names) trained on `windows` [n, T] ids, and the run's log.

    With a teacher, the loss is distillation from the teacher's logits on each window (computed as training
    runs); without one, next-token cross-entropy. The student's own arrays are never written: it is trained on
    copies of its trainable weights. teacher_streams: as teacher_logits' streams, a dict the caller may share
    between runs with the same teacher over the same windows."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) == 0:
        raise ReffuseError(f"training windows must be a non-empty [n_windows, tokens] array, got shape {windows.shape}")
    trainable = check_trainable(student, trainable)
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise ReffuseError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the student's "
                           f"({student.config.vocab_size}): distillation compares their distributions token by token")
    model = with_weights(student, {n: w.copy() for n, w in named_weights(student).items() if n in trainable})
    weights = {n: w for n, w in named_weights(model).items() if n in trainable}  # the arrays the model computes with
    optimizer = AdamW(weights, options.betas, weight_decay=options.weight_decay)
    schedule = Schedule(options.learning_rate, options.steps, options.warmup, options.final_fraction)
    state = _checkpoint_state(options, trainable, student.config.name)
    folder = Path(checkpoint_folder) if checkpoint_folder is not None else None
    log = TrainingLog()
    if resume and folder is not None and (folder / CHECKPOINT_FILE).is_file():
        log = load_checkpoint(folder, weights, optimizer, state)
        note(f"resuming from step {optimizer.step_count} of {options.steps} ({folder / CHECKPOINT_FILE})")
    window_tokens = windows.shape[1]
    resumed_at, run_started = optimizer.step_count, time.perf_counter()   # the rate is this process's own
    for step in range(optimizer.step_count + 1, options.steps + 1):
        started = time.perf_counter()
        total, step_loss = None, 0.0
        for j in range(options.windows_per_step):
            ids = windows[window_index((step - 1) * options.windows_per_step + j, len(windows), options.seed)]
            target = teacher_logits(teacher, ids, teacher_streams) if teacher is not None else None
            loss, grads = gradients(model, ids, target, options.temperature, trainable)
            step_loss += loss / options.windows_per_step
            if total is None:
                total = grads
            else:
                for name, g in grads.items():
                    total[name] += g
        if options.windows_per_step > 1:
            for g in total.values():
                g /= options.windows_per_step
        take_step(optimizer, schedule, total, step_loss, step, options.clip, log,
                  options.windows_per_step * window_tokens, started)
        if progress:
            per_step = (time.perf_counter() - run_started) / (step - resumed_at)
            rate_tokens = options.windows_per_step * window_tokens / per_step
            left = (options.steps - step) * per_step
            note(f"step {step}/{options.steps}  tokens {log.tokens:,}  loss {step_loss:.4f}  "
                 f"{rate_tokens:,.0f} tokens/s  time left {_clock(left)}")
        if folder is not None and checkpoint_every and (step % checkpoint_every == 0 or step == options.steps):
            save_checkpoint(folder, weights, optimizer, log, state)
    return model, log
