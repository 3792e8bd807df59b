"""Running the healing study: the learning-rate choice on calibration text, then every point on held-out text,
cheapest first, each saved as it finishes and every training run checkpointed, so that the study resumes where
it stopped (`reffuse healing-study --out DIR` again).

Folder layout: DIR/study.json (settings, the fusion study's choices, the learning-rate choice, provenance),
DIR/points/<point>.json (one per finished point), DIR/README.md and DIR/recovery.png (the report, rewritten
after every point); training checkpoints live beside DIR in DIR.checkpoints and are removed as points finish.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from reffuse.errors import ReffuseError
from reffuse.experiments.healing.plan import (FUSION_STUDY, Budgets, FusionChoices, Point, Variant,
                                              build_variant, read_fusion_choices, study_points, sweep_points)
from reffuse.experiments.healing.points import HealingPoint, original_logits, score, train_point
from reffuse.experiments.provenance import Provenance, provenance
from reffuse.files import json_text, locked, read_json
from reffuse.outputs import write_text_atomic
from reffuse.formats.corpus import TokenWindows, calibration_windows, held_out_windows, training_windows
from reffuse.formats.registry import find_tokenizer, load_model
from reffuse.method.removal import drop_attention
from reffuse.progress import note
from reffuse.records import present_fields

# The code and data that shape the study's numbers: a change to any of them after a point was run is reported.
SETUP_FILES = ("reffuse/experiments/healing", "reffuse/training", "reffuse/formats/corpus.py",
               "reffuse/method/calibrate.py", "reffuse/method/distill.py", "reffuse/method/removal.py",
               "reffuse/core", "reports/experiments/smollm2/experiments.json")
RULE_FILES = ("reffuse/experiments/healing/findings.py", "reffuse/stats.py")


@dataclass(frozen=True)
class HealingStudySettings:
    """What every point shares; a study folder refuses to continue under other settings."""
    model: str = "smollm2"
    window: int = 512
    held_out_tokens: int = 16384
    calibration_scoring_tokens: int = 8192     # the learning-rate choice's scoring text
    budgets: Budgets = Budgets()

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, record: dict) -> HealingStudySettings:
        return cls(**(record | {"budgets": Budgets.from_json(record["budgets"])}))


@dataclass(frozen=True)
class RecordedFusionStudy:
    """The fusion study's choices as the healing study recorded them when it started, and where they came from."""
    choices: FusionChoices
    file: str                  # the fusion study's JSON, relative to the checkout
    provenance: Provenance     # its commit

    def to_json(self) -> dict:
        return self.choices.to_json() | {"file": self.file, "provenance": self.provenance.to_json()}

    @classmethod
    def from_json(cls, record: dict) -> RecordedFusionStudy:
        return cls(FusionChoices.from_json(record), record["file"], Provenance.from_json(record["provenance"]))


@dataclass(frozen=True)
class StudyRecord:
    """A study folder's study.json: what every point shares, written when the study starts."""
    settings: HealingStudySettings
    fusion_study: RecordedFusionStudy
    rules: Provenance          # the findings' rules files when the study started
    setup: Provenance          # the setup files when the study started

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, record: dict) -> StudyRecord:
        return cls(HealingStudySettings.from_json(record["settings"]),
                   RecordedFusionStudy.from_json(record["fusion_study"]), Provenance.from_json(record["rules"]),
                   Provenance.from_json(record["setup"]))


@dataclass
class Texts:
    held_out: TokenWindows
    calibration: TokenWindows       # scores the learning-rate choice
    refit: TokenWindows             # the refit variants' calibration text, as the fusion study used it
    training: TokenWindows          # the largest budget's windows; a point takes the first tokens // window


def load_texts(tokenizer, settings: HealingStudySettings, choices: FusionChoices) -> Texts:
    largest = max(max(settings.budgets.kd), max(settings.budgets.local))
    return Texts(held_out_windows(tokenizer, settings.window, settings.held_out_tokens),
                 calibration_windows(tokenizer, settings.window, settings.calibration_scoring_tokens),
                 calibration_windows(tokenizer, choices.calibration_window, choices.calibration_tokens),
                 training_windows(tokenizer, settings.window, largest))


def point_windows(texts: Texts, tokens: int):
    """A budget's training windows: the first tokens // window of the turn-by-turn order (all of them, for more
    epochs, when the split holds fewer)."""
    return texts.training.ids[:max(1, tokens // texts.training.window)]


def point_path(folder: Path, point: Point) -> Path:
    return folder / "points" / f"{point.key}.json"


def read_points(folder: Path) -> list[HealingPoint]:
    return [HealingPoint.from_json(read_json(p, "delete the file to run its point again"))
            for p in sorted((folder / "points").glob("*.json"))]


def read_study(folder: Path, remedy: str) -> StudyRecord:
    return StudyRecord.from_json(read_json(folder / "study.json", remedy))


def choose_rates(folder: Path, budgets: Budgets) -> dict:
    """The learning rate of each objective from the sweep: the candidate with the lowest calibration KL."""
    done = {(r.point.objective, r.point.learning_rate): r.scores.mean_kl
            for r in read_points(folder) if r.point.split == "calibration"}
    rates = {}
    for objective, candidates in (("kd", budgets.kd_rates), ("local", budgets.local_rates)):
        scored = {r: done[(objective, r)] for r in candidates if (objective, r) in done}
        if len(scored) == len(candidates):
            rates[objective] = min(scored, key=scored.get)
    if "kd" in rates:
        rates["kd-fused"] = rates["ce"] = rates["kd"]
    return rates


class Runner:
    """Holds the models and texts once, and runs points."""

    def __init__(self, folder: Path, settings: HealingStudySettings, choices: FusionChoices):
        self.folder, self.settings, self.choices = folder, settings, choices
        self.original = load_model(settings.model)
        self.pre = drop_attention(self.original, self.choices.attention_removed)
        self.texts = load_texts(find_tokenizer(settings.model), settings, self.choices)
        self.variants: dict[str, Variant] = {}
        self.logits: dict[str, list] = {}
        self.teacher_streams: dict[bytes, object] = {}   # the original's last-block stream per training window
        self.provenance = provenance(SETUP_FILES)  # the code this process loaded, whatever the checkout holds later

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            self.variants[name] = build_variant(name, self.original, self.choices, self.texts.refit.ids)
        return self.variants[name]

    def original_logits(self, split: str) -> list:
        if split not in self.logits:
            self.logits = {split: original_logits(self.original, self.windows(split))}  # one split held at a time
        return self.logits[split]

    def windows(self, split: str) -> TokenWindows:
        return self.texts.held_out if split == "held-out" else self.texts.calibration

    def run(self, point: Point) -> HealingPoint:
        variant = self.variant(point.variant)
        model, log = variant.model, None
        checkpoint = self.folder.with_name(self.folder.name + ".checkpoints") / point.key
        if point.tokens:
            model, log = train_point(point, variant, self.original, self.pre,
                                     point_windows(self.texts, point.tokens), checkpoint, self.teacher_streams)
        scoring = time.perf_counter()
        scores = score(model, self.windows(point.split), self.original_logits(point.split))
        shutil.rmtree(checkpoint, ignore_errors=True)
        trained = log.seconds if log is not None else 0.0       # every process's training steps, resumed or not
        return HealingPoint(point, variant.trainable(point.objective) if point.tokens else [], scores, log,
                            trained + time.perf_counter() - scoring, os.cpu_count(), self.provenance)


def check_settings(folder: Path, settings: HealingStudySettings) -> StudyRecord:
    """The folder's study.json, written on first use; refuse a folder of a study with other settings."""
    path = folder / "study.json"
    if path.is_file():
        study = read_study(folder, f"delete {folder} to start the study afresh")
        if study.settings != settings:
            raise ReffuseError(f"{folder} holds a healing study with other settings ({path}): use another --out, "
                               "or the same settings to continue it")
        return study
    if folder.exists() and any(folder.iterdir()):
        raise ReffuseError(f"{folder} is not empty and holds no healing study: choose another --out")
    study = StudyRecord(settings, RecordedFusionStudy(read_fusion_choices(), FUSION_STUDY, provenance([FUSION_STUDY])),
                        provenance(RULE_FILES), provenance(SETUP_FILES))
    write_text_atomic(path, json_text(study.to_json()))
    return study


def recorded_choices(study: StudyRecord) -> FusionChoices:
    """The fusion study's choices as the study recorded them when it started; the committed fusion study may have
    been judged again since, and its choices must not move under a study in progress."""
    recorded, now = study.fusion_study.choices, read_fusion_choices()
    if recorded != now:
        note(f"the fusion study's choices changed since this study started ({FUSION_STUDY}): the study goes on "
             "with the ones it recorded")
    return recorded


def run_study(folder, settings: HealingStudySettings = HealingStudySettings(), up_to: int | None = None,
              report=None) -> list[HealingPoint]:
    """Run every point not yet in the folder, up to `up_to` training tokens; `report(folder)` after each."""
    folder = Path(folder)
    study = check_settings(folder, settings)
    budgets = settings.budgets
    runner = None
    todo = sweep_points(budgets) + study_points(budgets)
    with locked(folder / "study.json"):      # two processes on one study run its points one at a time
        for number, point in enumerate(todo, 1):
            if up_to is not None and point.tokens > up_to:
                continue
            if point.split == "held-out" and point.tokens:
                rates = choose_rates(folder, budgets)
                if point.objective not in rates:
                    note(f"the learning-rate choice for {point.objective} is not complete: run the sweep first")
                    continue
                point = replace(point, learning_rate=rates[point.objective])
            path = point_path(folder, point)
            if path.is_file():
                continue
            if runner is None:
                note("loading SmolLM2, the texts and the fusion study's choices")
                runner = Runner(folder, settings, recorded_choices(study))
            note(f"[{number}/{len(todo)}] {point.variant}, {point.objective}, {point.tokens:,} tokens, seed "
                 f"{point.seed}" + (f", learning rate {point.learning_rate:g}" if point.tokens else "")
                 + f", scored on {point.split} text")
            result = runner.run(point)
            write_text_atomic(path, json_text(result.to_json(), inline_lists=True))
            if report is not None:
                report(folder)
    return read_points(folder)

