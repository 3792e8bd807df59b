"""Local distillation against the closed-form refit, on the study's first region, scored on held-out text.

    python -m reffuse.experiments.distillation --out reports/distillation/smollm2

The setup is `reffuse experiments`' first region (reffuse.experiments.study.prepare_study, the same settings):
attention removed from the cheapest window of 8 blocks, the span fused the run without its last block, held-out and
calibration text from the fixed corpus split. For the span fused into k groups (k = 1, 2: the plans of finding
(a)), three versions of the fused model:

- plain fusion (Theorem 3.1's weights, norm "fold");
- the closed-form refit of each fused down projection (reffuse.method.calibrate, its default ridge and weighting);
- local distillation (reffuse.method.distill): gate, up and down trained by Adam, DISTILL_STEPS full-batch steps
  at DISTILL_LEARNING_RATE from the plain weights, on the same calibration tokens and the same local objective.

Each is scored on the held-out text against the pre-fusion model, and every comparison is a paired difference with
its intervals (reffuse.stats.paired_difference). The step count and learning rate are fixed here, before the run, and
never chosen on held-out text. Pre-fusion and plain KL are the references: "share removed" is 1 - KL / plain KL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from reffuse.core.fusion import fuse
from reffuse.core.layout import format_groups
from reffuse.evaluation.intervals import describe
from reffuse.evaluation.prefix import score_variant
from reffuse.evaluation.scoring import PerToken
from reffuse.experiments.study import prepare_study
from reffuse.outputs import write_json_atomic, write_text_atomic
from reffuse.formats.registry import load_model
from reffuse.method.calibrate import calibrated_fuse
from reffuse.method.distill import GroupDistillation, distilled_fuse
from reffuse.method.pipeline import TextsRecord, load_texts
from reffuse.progress import note
from reffuse.records import FlatRecord, as_json, as_tuple
from reffuse.speed.timing import blas_threads
from reffuse.stats import PairedDifference, paired_difference

DISTILL_STEPS = 200
DISTILL_LEARNING_RATE = 1e-4
STEP_COUNTS = (1, 2)
VERSIONS = ("plain", "refit", "distilled")   # the three versions of each fused model, in the report's order


@dataclass(frozen=True)
class VersionScores:
    """One version of a fused model on the held-out text: KL to the pre-fusion model (nats), perplexity, and each
    prediction's values."""
    kl_from_base: float
    perplexity: float
    per_token: PerToken

    def to_json(self) -> dict:
        return {"kl_from_base": self.kl_from_base, "perplexity": self.perplexity, "per_token": self.per_token.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> VersionScores:
        return cls(raw["kl_from_base"], raw["perplexity"], PerToken.from_json(raw["per_token"]))


@dataclass(frozen=True)
class DistillationRow:
    """The span fused into `steps` groups: each version's scores (version name -> scores) and what training each
    group did."""
    steps: int
    groups: tuple[tuple[int, int], ...]
    scores: dict[str, VersionScores]
    distillation: list[GroupDistillation]

    def to_json(self) -> dict:
        return {"steps": self.steps, "groups": [list(g) for g in self.groups],
                "scores": {name: s.to_json() for name, s in self.scores.items()},
                "distillation": [as_json(d.as_dict()) for d in self.distillation]}

    @classmethod
    def from_json(cls, raw: dict) -> DistillationRow:
        return cls(raw["steps"], as_tuple(raw["groups"]),
                   {name: VersionScores.from_json(s) for name, s in raw["scores"].items()},
                   [GroupDistillation(**{**d, "group": tuple(d["group"])}) for d in raw["distillation"]])


@dataclass(frozen=True)
class DistillationSettings(FlatRecord):
    drop_count: int
    held_out_tokens: int
    calibration_tokens: int
    window: int
    steps: int             # Adam steps of the distillation
    learning_rate: float


@dataclass(frozen=True)
class DistillationResult:
    """What distillation.json holds."""
    model: str
    attention_removed: str          # the blocks whose attention was removed, as text
    region: tuple[int, int]         # the attention-free run [a, b]
    settings: DistillationSettings
    texts: TextsRecord
    pre_fusion_perplexity: float
    rows: list[DistillationRow]
    seconds: float
    command: str | None = None      # set once the command that ran it writes it

    def to_json(self) -> dict:
        raw = {"model": self.model, "attention_removed": self.attention_removed, "region": list(self.region),
               "settings": self.settings.to_json(), "texts": self.texts.to_json(),
               "pre_fusion_perplexity": self.pre_fusion_perplexity, "rows": [row.to_json() for row in self.rows],
               "seconds": self.seconds}
        return raw if self.command is None else raw | {"command": self.command}

    @classmethod
    def from_json(cls, raw: dict) -> DistillationResult:
        return cls(raw["model"], raw["attention_removed"], tuple(raw["region"]),
                   DistillationSettings.from_json(raw["settings"]), TextsRecord.from_json(raw["texts"]),
                   raw["pre_fusion_perplexity"], [DistillationRow.from_json(row) for row in raw["rows"]],
                   raw["seconds"], raw.get("command"))


def run_distillation(model_name: str = "smollm2", drop_count: int = 8, held_out_tokens: int = 2048,
                     calibration_tokens: int = 2048, scoring_tokens: int = 256, dependency_tokens: int = 128,
                     window: int = 256, threads: int | None = None) -> DistillationResult:
    started = time.perf_counter()
    with blas_threads(threads):
        original = load_model(model_name)
        texts = load_texts(model_name, original, calibration_tokens, held_out_tokens, window)
        study = prepare_study(original, texts, drop_count, scoring_tokens, dependency_tokens, window)
        windows = list(texts.calibration.ids)
        rows = []
        for k in STEP_COUNTS:
            groups = study.plans[k]
            note(f"{k} step(s): {format_groups(groups)}: plain, refit, distilled")
            refit, _ = calibrated_fuse(study.pre, groups, windows)
            distilled, reports = distilled_fuse(study.pre, groups, windows, DISTILL_STEPS, DISTILL_LEARNING_RATE)
            scores = {}
            for name, model in zip(VERSIONS, (fuse(study.pre, groups), refit, distilled)):
                s = score_variant(study.prefix, model, study.span[0], per_token=True)
                scores[name] = VersionScores(s.kl_from_base, s.perplexity, s.per_token)
            rows.append(DistillationRow(k, as_tuple(groups), scores, reports))
    return DistillationResult(
        model_name, study.prepared.attention_removal.blocks_text, study.region,
        DistillationSettings(drop_count, held_out_tokens, calibration_tokens, window, DISTILL_STEPS,
                             DISTILL_LEARNING_RATE),
        texts.describe(), study.prepared.pre_fusion.perplexity, rows, time.perf_counter() - started)


def comparisons(row: DistillationRow) -> dict[str, PairedDifference]:
    """The paired differences of a row: distilled - plain, refit - plain, distilled - refit (KL)."""
    kl = {name: s.per_token.kl for name, s in row.scores.items()}
    return {label: paired_difference(kl[x], kl[y]) for label, x, y in
            (("distilled - plain", "distilled", "plain"), ("refit - plain", "refit", "plain"),
             ("distilled - refit", "distilled", "refit"))}


def markdown(r: DistillationResult, command: str) -> str:
    settings = r.settings
    lines = ["# Local distillation against the closed-form refit", "", "Produced by:", "", f"    {command}", "",
             f"{r.seconds / 60:.1f} minutes. {r.model} with the attention of blocks {r.attention_removed} "
             f"removed; the run {r.region[0]}-{r.region[1]}, its span fused without the last block. "
             f"{settings.calibration_tokens} calibration tokens fit both the refit and the distillation "
             f"({settings.steps} Adam steps at learning rate {settings.learning_rate:g}, fixed before the run); "
             f"{settings.held_out_tokens} held-out tokens score them against the pre-fusion model (perplexity "
             f"{r.pre_fusion_perplexity:.2f}).", "",
             "| steps | groups | plain KL | refit KL | distilled KL | share removed, refit | share removed, "
             "distilled | perplexity plain / refit / distilled | local loss before / after training |",
             "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for row in r.rows:
        kl = {name: s.kl_from_base for name, s in row.scores.items()}
        ppl = " / ".join(f"{row.scores[name].perplexity:.2f}" for name in VERSIONS)
        loss = "; ".join(f"{d.losses[0]:.3f} -> {d.losses[-1]:.3f}" for d in row.distillation)
        lines.append(f"| {row.steps} | {format_groups(row.groups)} | {kl['plain']:.4f} | "
                     f"{kl['refit']:.4f} | {kl['distilled']:.4f} | {1 - kl['refit'] / kl['plain']:.0%} | "
                     f"{1 - kl['distilled'] / kl['plain']:.0%} | {ppl} | {loss} |")
    lines += ["", "Paired differences of the held-out KL (95% intervals over windows and over token blocks):", ""]
    for row in r.rows:
        for label, d in comparisons(row).items():
            lines.append(f"- {row.steps} step(s), {label}: {describe(d)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model name (default smollm2)")
    parser.add_argument("--out", type=Path, required=True, help="folder for distillation.json and README.md")
    args = parser.parse_args(argv)
    command = " ".join(["python -m reffuse.experiments.distillation"] + sys.argv[1:])
    result = replace(run_distillation(args.model), command=command)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "distillation.json", result.to_json())
    write_text_atomic(args.out / "README.md", markdown(result, command))
    print(json.dumps({row.steps: {name: s.kl_from_base for name, s in row.scores.items()} for row in result.rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
