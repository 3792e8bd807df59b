"""Healing a fused model by knowledge distillation, as `reffuse heal` runs it (the paper's §3, the step after
fusion; the 253B model was distilled on tens of billions of tokens, this runs on a CPU's budget).

1. the student (a fused or attention-removed model) and the teacher (the model it came from) are loaded;
2. the trainable set is chosen: the fused blocks, the blocks of the attention-free run, a range of blocks, or all;
3. held-out text (never trained on) scores the student before: KL(teacher || student) and perplexity;
4. the student is trained on the training split (reffuse.formats.corpus), the teacher's logits computed as
   training runs (reffuse.training.trainer), checkpointed so that an interrupted run resumes;
5. the same held-out text scores the healed model; it is saved with heal.json, which records every choice, the
   loss curve and both scores.

The synthetic models have no tokenizer: random token ids (one seed per split) stand in for text, and heal.json
says so.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from reffuse.core.names import named_weights
from reffuse.core.model import Model
from reffuse.errors import ReffuseError
from reffuse.evaluation.scoring import Scores, evaluate
from reffuse.files import json_text
from reffuse.formats.checkpoint import is_model_folder, save_model
from reffuse.formats.corpus import WindowsRecord, held_out_windows, training_windows
from reffuse.formats.registry import find_tokenizer, load_model
from reffuse.method.pipeline import is_synthetic, synthetic_windows
from reffuse.options import FromArguments
from reffuse.outputs import check_output_folder
from reffuse.progress import Progress, note
from reffuse.records import present_fields
from reffuse.training.trainer import TrainingLog, TrainingOptions, train, trainable_names


@dataclass
class HealOptions(FromArguments):
    """What `reffuse heal` takes; the command's flags read their defaults from here."""
    model: str = ""
    teacher: str = "smollm2"
    out: str = ""
    training_tokens: int = 65536
    train: str = "fused"
    window: int = 512
    windows_per_step: int = 1
    learning_rate: float = 1e-4
    warmup_fraction: float = 0.1
    final_fraction: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    held_out_tokens: int = 16384
    checkpoint_every: int = 16
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"

    def training(self) -> TrainingOptions:
        steps = max(1, self.training_tokens // (self.window * self.windows_per_step))
        return TrainingOptions(steps=steps, windows_per_step=self.windows_per_step,
                               learning_rate=self.learning_rate, warmup=round(self.warmup_fraction * steps),
                               final_fraction=self.final_fraction, weight_decay=self.weight_decay, clip=self.clip,
                               temperature=self.temperature, seed=self.seed)


def checkpoint_folder(out) -> Path:
    """Where a run keeps its checkpoint: beside --out, removed once the healed model is saved."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


@dataclass(frozen=True)
class HealTexts:
    """The text a run trained on and the held-out text that scored it."""
    synthetic: bool                 # random token ids (a model without a tokenizer), not the corpus
    training: WindowsRecord
    held_out: WindowsRecord
    epochs: float                   # passes over the training text

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, record: dict) -> HealTexts:
        return cls(record["synthetic"], WindowsRecord.from_json(record["training"]),
                   WindowsRecord.from_json(record["held_out"]), record["epochs"])


@dataclass(frozen=True)
class HealRecord:
    """What heal.json records: every choice, the loss curve, and the held-out scores before and after."""
    options: dict                   # the command's options (HealOptions.to_json) as the run recorded them
    training: TrainingOptions
    trainable: list[str]            # the names of the tensors trained
    student: str
    teacher: str
    texts: HealTexts
    log: TrainingLog
    held_out_before: Scores         # the student against the teacher, before training
    held_out_after: Scores          # the healed model, on the same windows
    seconds: float                  # the whole run, loading and scoring included
    command: str | None = None      # how a committed run was made, where it was written beside the record
    load_note: str | None = None    # the machine's load during a committed run, likewise

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, record: dict) -> HealRecord:
        return cls(record["options"], TrainingOptions.from_json(record["training"]), record["trainable"],
                   record["student"], record["teacher"], HealTexts.from_json(record["texts"]),
                   TrainingLog.from_json(record["log"]), Scores.from_json(record["held_out_before"]),
                   Scores.from_json(record["held_out_after"]), record["seconds"], record.get("command"),
                   record.get("load_note"))


def score(model: Model, teacher: Model, windows, label: str) -> Scores:
    with Progress(f"scoring {label} on held-out text", total=len(windows), unit="windows") as bar:
        return evaluate(model, windows.ids, base=teacher, progress=lambda *_: bar.update())


def run_heal(options: HealOptions) -> HealRecord:
    """Heal, save, and return what heal.json records."""
    training_options = options.training()  # checks the numbers before any loading
    if not options.out:
        raise ReffuseError("--out is required: the folder to save the healed model to")
    check_output_folder(options.out, options.overwrite, is_model_folder, "model")
    started = time.perf_counter()
    note("[1/5] loading the student and the teacher")
    student = load_model(options.model, device=options.device)
    teacher = load_model(options.teacher, device=options.device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ReffuseError(f"--teacher {options.teacher} has a vocabulary of {teacher.config.vocab_size}, the student "
                           f"{student.config.vocab_size}: distil from the model the student was made from")
    names = trainable_names(student, options.train)
    note(f"[2/5] training {options.train}: {len(names)} tensors, "
         f"{sum(named_weights(student)[n].size for n in names):,} weights")
    synthetic = is_synthetic(options.model, student)
    if synthetic:
        tokenizer = None
        held_out = synthetic_windows(student, "held-out", options.window, options.held_out_tokens)
        text = synthetic_windows(student, "training", options.window, options.training_tokens)
    else:
        tokenizer = find_tokenizer(options.model, options.teacher)
        held_out = held_out_windows(tokenizer, options.window, options.held_out_tokens)
        text = training_windows(tokenizer, options.window, options.training_tokens)
    note(f"[3/5] held-out text: {held_out.ids.size:,} tokens in {len(held_out)} windows")
    before = score(student, teacher, held_out, "the student")
    needed = training_options.steps * training_options.windows_per_step
    note(f"[4/5] distillation: {training_options.steps} steps of {training_options.windows_per_step} x "
         f"{options.window} tokens from {text.ids.size:,} training tokens ({needed / len(text):.2f} epochs)")
    healed, log = train(student, text.ids, names, training_options, teacher=teacher,
                        checkpoint_folder=checkpoint_folder(options.out),
                        checkpoint_every=options.checkpoint_every, resume=options.resume)
    note("[5/5] scoring the healed model and saving it")
    after = score(healed, teacher, held_out, "the healed model")
    record = HealRecord(options.to_json(), training_options, names, student.config.name, teacher.config.name,
                        HealTexts(synthetic, text.describe(), held_out.describe(), needed / len(text)), log,
                        before, after, time.perf_counter() - started)
    files = {"heal.json": json_text(record.to_json(), inline_lists=True)}
    source = Path(options.model)
    for name in ("fuse.json", "heal.json"):
        if (source / name).is_file():  # the student's own record, kept beside the new one
            files[f"student-{name}"] = (source / name).read_text()
    save_model(healed, options.out, overwrite=options.overwrite, tokenizer=tokenizer, files=files)
    shutil.rmtree(checkpoint_folder(options.out), ignore_errors=True)
    return record


def summary(record: HealRecord) -> str:
    """Held-out KL to the teacher and perplexity, before and after, in a few lines."""
    b, a = record.held_out_before, record.held_out_after
    return "\n".join([
        f"healed {record.student} ({record.options['train']}: {len(record.trainable)} tensors) on "
        f"{record.log.tokens:,} tokens in {record.seconds:.0f} s",
        f"held-out KL to the teacher  {b.kl_from_base:.4g} -> {a.kl_from_base:.4g} nats",
        f"held-out perplexity         {b.perplexity:.2f} -> {a.perplexity:.2f}  "
        f"(teacher {b.base_perplexity:.2f})"])
