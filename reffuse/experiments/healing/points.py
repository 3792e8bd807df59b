"""One point of the healing study: a starting model, trained with one objective on a budget of training tokens,
then scored against the original on held-out (or, for the learning-rate choice, calibration) text.

A point's result keeps, per scored window, the summed KL(original || model), the summed negative log-likelihood
of the next tokens, the top-1 agreements and the number of predictions, and which text the window came from: the
findings' intervals are over windows and over texts (reffuse.experiments.healing.findings).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reffuse.core.backend import array_module, to_numpy
from reffuse.core.model import Model, forward, rms_norm, run_blocks
from reffuse.core.names import named_weights, with_weights
from reffuse.errors import ReffuseError
from reffuse.evaluation.scoring import log_softmax, score_windows
from reffuse.experiments.healing.plan import Point, Variant
from reffuse.experiments.provenance import Provenance
from reffuse.formats.corpus import TokenWindows
from reffuse.method.calibrate import sequential_update
from reffuse.method.distill import local_loss_and_gradients
from reffuse.progress import note
from reffuse.records import FlatRecord, present_fields
from reffuse.training.optim import AdamW, Schedule
from reffuse.training.trainer import (CHECKPOINT_FILE, TrainingLog, TrainingOptions, load_checkpoint, take_step,
                                      save_checkpoint, train, window_index)

WARMUP_FRACTION = 0.1    # as `reffuse heal`: 10% of the steps warm up, the cosine ends at 10% of the peak
FINAL_FRACTION = 0.1
CLIP = 1.0


@dataclass
class WindowScores(FlatRecord):
    """Per scored window: Σ KL(original || model), Σ -log p(next token), Σ top-1 agreement, predictions, text."""
    kl: list
    nll: list
    agree: list
    predictions: list
    text: list               # the index of the window's text in `texts`
    texts: list              # the texts' names, in order

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / sum(self.predictions)

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / sum(self.predictions))

    @property
    def top1(self) -> float:
        return sum(self.agree) / sum(self.predictions)


@dataclass(frozen=True)
class HealingPoint:
    """A finished point as its file in the study's points/ folder holds it."""
    point: Point
    trainable: list[str] | int     # the names of the tensors trained (the learning-rate sweep recorded their count)
    scores: WindowScores
    log: TrainingLog | None        # None for an untrained start
    seconds: float                 # training (over every resumed part) and scoring
    cpus: int | None               # the machine's cores; not recorded by the sweep's points
    provenance: Provenance         # the setup files' commit

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("log",))

    @classmethod
    def from_json(cls, record: dict) -> HealingPoint:
        log = record["log"]
        return cls(Point.from_json(record["point"]), record["trainable"], WindowScores.from_json(record["scores"]),
                   TrainingLog.from_json(log) if log is not None else None, record["seconds"], record.get("cpus"),
                   Provenance.from_json(record["provenance"]))


def window_texts(windows: TokenWindows) -> tuple[list[int], list[str]]:
    """Which text each window came from (windows are taken text by text, the spans in order)."""
    if not windows.spans:     # synthetic ids: each window its own unit
        return list(range(len(windows))), [f"window {i}" for i in range(len(windows))]
    text = [i for i, span in enumerate(windows.spans) for _ in range(span.tokens // windows.window)]
    return text, [span.play for span in windows.spans]


def original_logits(original: Model, windows: TokenWindows) -> list:
    """The original's logits on every window, [W - 1, vocab] each in its own dtype: computed once, they serve
    every point scored on those windows (the same numbers score_windows would compute each time)."""
    return [to_numpy(forward(original, ids))[:-1] for ids in windows.ids]


def score(model: Model, windows: TokenWindows, logits_of_original: list) -> WindowScores:
    """The model against the original (its logits on each window, from original_logits) on every window."""
    totals = score_windows(windows.ids, lambda w: forward(model, windows.ids[w]),
                           lambda w: lambda rows: log_softmax(logits_of_original[w][rows]))
    text, names = window_texts(windows)
    return WindowScores([float(k.sum()) for k in totals.window_kl], [float(n.sum()) for n in totals.window_nll],
                        [int(a.sum()) for a in totals.window_agree], [int(k.size) for k in totals.window_kl],
                        text, names)


def training_options(point: Point, window: int) -> TrainingOptions:
    steps = max(1, point.tokens // window)
    return TrainingOptions(steps=steps, learning_rate=point.learning_rate, warmup=round(WARMUP_FRACTION * steps),
                           final_fraction=FINAL_FRACTION, clip=CLIP, seed=point.seed)


def train_point(point: Point, variant: Variant, original: Model, pre: Model, windows: np.ndarray,
                checkpoint: Path, teacher_streams: dict | None = None) -> tuple[Model, TrainingLog]:
    """The variant trained as the point says; the run checkpoints into `checkpoint` and resumes from it.
    teacher_streams: the original's streams per window, shared by the points that distil from it (train's)."""
    options = training_options(point, windows.shape[1])
    if point.objective in ("kd", "ce"):
        return train(variant.model, windows, variant.ffn_names(), options,
                     teacher=original if point.objective == "kd" else None,
                     checkpoint_folder=checkpoint, checkpoint_every=16, resume=True, teacher_streams=teacher_streams)
    if point.objective == "kd-fused":
        return train(variant.model, windows, variant.fused_names(), options, teacher=original,
                     checkpoint_folder=checkpoint, checkpoint_every=16, resume=True, teacher_streams=teacher_streams)
    if point.objective == "local":
        return train_local(variant, pre, windows, options, checkpoint)
    raise ReffuseError(f"no objective {point.objective!r} to train with")


LOCAL_FIELDS = ("gate_proj", "up_proj", "down_proj")


def train_local(variant: Variant, pre: Model, windows: np.ndarray, options: TrainingOptions,
                checkpoint: Path) -> tuple[Model, TrainingLog]:
    """Local distillation on training windows: each fused FFN learns the sequential run's update on the stream
    entering it, by the relative squared error of reffuse.method.distill (its weights per token), one window a
    step, AdamW, the schedule and the clipping of the global objective. The blocks before a fused block are
    frozen, so its stream is the partially trained model's own."""
    model = variant.model
    fused = [i for i, b in enumerate(model.blocks) if b.fused_from]
    if not fused:
        raise ReffuseError(f"{variant.name} has no fused block to train by local distillation")
    names = [f"model.layers.{i}.mlp.{f}.weight" for i in fused for f in LOCAL_FIELDS]
    model = with_weights(model, {n: w.copy() for n, w in named_weights(model).items() if n in names})
    weights = {n: named_weights(model)[n] for n in names}
    optimizer = AdamW(weights, options.betas, weight_decay=options.weight_decay)
    schedule = Schedule(options.learning_rate, options.steps, options.warmup, options.final_fraction)
    state = {"options": options.to_json(), "trainable": sorted(names), "model": f"{model.config.name} local"}
    log = TrainingLog()
    if (checkpoint / CHECKPOINT_FILE).is_file():
        log = load_checkpoint(checkpoint, weights, optimizer, state)
    eps = model.config.norm_eps
    xp = array_module(model.embed)
    for step in range(optimizer.step_count + 1, options.steps + 1):
        started = time.perf_counter()
        ids = windows[window_index(step - 1, len(windows), options.seed)]
        cos, sin = model.rope(np.arange(len(ids)))
        x, position, loss, grads = model.embed[xp.asarray(ids)], 0, 0.0, {}     # [T, d]
        for index in fused:
            x = run_blocks(model, x, cos, sin, start=position, stop=index)     # the stream entering the block
            position = index
            block = model.blocks[index]
            first, last = block.fused_from[0], block.fused_from[-1]
            targets = sequential_update(pre, first, last, x)                    # R [T, d]
            token_weights = 1.0 / xp.linalg.norm(x + targets, axis=-1, keepdims=True)   # [T, 1]
            u = rms_norm(x, block.ffn.norm_gain, eps)
            value, (d_gate, d_up, d_down) = local_loss_and_gradients(block.ffn, u, targets, token_weights)
            loss += value / len(fused)
            prefix = f"model.layers.{index}.mlp."
            grads.update({prefix + "gate_proj.weight": d_gate, prefix + "up_proj.weight": d_up,
                          prefix + "down_proj.weight": d_down})
        take_step(optimizer, schedule, grads, loss, step, options.clip, log, windows.shape[1], started,
                  what="local distillation")
        if step % 16 == 0 or step == options.steps:
            save_checkpoint(checkpoint, weights, optimizer, log, state)
            note(f"local step {step}/{options.steps}  tokens {log.tokens:,}  loss {loss:.4f}")
    return model, log
