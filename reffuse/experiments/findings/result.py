"""The result of `reffuse experiments` on one region, as its experiments.json holds it: the run's setup, what every
finding measured (each finding's module defines the record of its own measurement) and the verdicts.

A run made before some findings existed lacks their measurements: those fields are None, and so are the fields
that judging a run again adds (verdicts_as_run, revision) until it is judged again.
"""

from __future__ import annotations

from dataclasses import dataclass

from reffuse.core.layout import BlockLayout, blocks_from_json, blocks_to_json
from reffuse.experiments.findings.a_intensity import IntensityRow
from reffuse.experiments.findings.b_removal import DecodeTiming, Removal
from reffuse.experiments.findings.c_last_ffn import LastFfnRow
from reffuse.experiments.findings.d_reversed import ReversedRow
from reffuse.experiments.findings.e_full_block import FullBlock
from reffuse.experiments.findings.g_calibrated import Calibration
from reffuse.experiments.findings.h_predictors import PredictorComparison
from reffuse.experiments.findings.i_equal_latency import EqualLatency
from reffuse.experiments.findings.j_calibration_scale import CalibrationScale
from reffuse.experiments.findings.rules import Verdict
from reffuse.experiments.provenance import Provenance, Revision
from reffuse.experiments.study import DependencyInRun, PlanCosts, ReferenceScores, Sink
from reffuse.method.pipeline import RemovalChoice, TextsRecord
from reffuse.records import FlatRecord, present_fields


@dataclass(frozen=True)
class Environment(FlatRecord):
    """The machine the run measured on, and its load when the run started and ended (None where the platform
    has no load average)."""
    machine: str
    cores: int
    threads: int                    # BLAS threads
    python: str
    numpy: str
    load_average_1min_at_start: float | None
    load_average_1min_at_end: float | None


@dataclass(frozen=True)
class Settings:
    """The arguments of the run (reffuse.experiments.run.run_experiments)."""
    drop_count: int
    held_out_tokens: int
    calibration_tokens: int
    scoring_tokens: int
    dependency_tokens: int
    window: int
    decode_tokens: int
    repeats: int
    region_rank: int
    scale_tokens: list[int] | None = None   # None in runs made before finding (j)

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> Settings:
        return cls(**raw)


def _optional(record_type, raw: dict, key: str):
    """The record under `key` of a JSON object, None where the key is absent."""
    return record_type.from_json(raw[key]) if key in raw else None


def _verdicts(raw: list[dict]) -> list[Verdict]:
    return [Verdict.from_json(v) for v in raw]


@dataclass(frozen=True)
class StudyResult:
    """One region's run: the fields of experiments.json, in its order."""
    model: str                                  # the name the model was asked for
    definitions: dict[str, str]                 # term -> what it means (reffuse.experiments.study.DEFINITIONS)
    rules: Provenance                           # the commit of the code that judges (run.RULE_FILES)
    setup: Provenance | None                    # the commit of the code that measures (run.SETUP_FILES); None in
                                                # runs that did not record it
    environment: Environment
    settings: Settings
    model_name: str                             # the model's own name
    texts: TextsRecord
    attention_removal: RemovalChoice
    region: tuple[int, int]                     # the attention-free run [a, b]
    span: tuple[int, int]                       # the span fused, [a, b - 1]
    layouts: dict[str, tuple[BlockLayout, ...]]  # "original" and "pre_fusion" -> their blocks
    original: ReferenceScores
    sink: Sink
    pre_fusion: ReferenceScores
    ffn_dependency: DependencyInRun
    plan_costs: PlanCosts | None                # None in runs planned by cosine-M
    calibration: Calibration                    # (g)
    intensity: list[IntensityRow]               # (a), with (f)'s and (g)'s variants
    calibration_scale: CalibrationScale | None  # (j)
    removal: Removal                            # (b)
    equal_latency: EqualLatency | None          # (i)
    last_ffn: list[LastFfnRow]                  # (c)
    reversed: list[ReversedRow]                 # (d)
    full_block: FullBlock                       # (e)
    predictors: PredictorComparison | None      # (h)
    decode: dict[str, DecodeTiming]             # model name -> its decode latency
    seconds: float
    verdicts: list[Verdict]
    command: str | None = None                  # set once the command that ran the study writes it
    verdicts_as_run: list[Verdict] | None = None  # the verdicts the run recorded, once judged again
    revision: Revision | None = None            # when and how it was judged again

    def to_json(self) -> dict:
        raw = present_fields(self)
        raw["layouts"] = {name: blocks_to_json(blocks) for name, blocks in self.layouts.items()}
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> StudyResult:
        return cls(
            raw["model"], raw["definitions"], Provenance.from_json(raw["rules"]), _optional(Provenance, raw, "setup"),
            Environment.from_json(raw["environment"]), Settings.from_json(raw["settings"]), raw["model_name"],
            TextsRecord.from_json(raw["texts"]), RemovalChoice.from_json(raw["attention_removal"]),
            tuple(raw["region"]), tuple(raw["span"]),
            {name: blocks_from_json(rows, f"experiments.json layouts.{name}") for name, rows in raw["layouts"].items()},
            ReferenceScores.from_json(raw["original"]), Sink.from_json(raw["sink"]),
            ReferenceScores.from_json(raw["pre_fusion"]), DependencyInRun.from_json(raw["ffn_dependency"]),
            _optional(PlanCosts, raw, "plan_costs"), Calibration.from_json(raw["calibration"]),
            [IntensityRow.from_json(row) for row in raw["intensity"]],
            _optional(CalibrationScale, raw, "calibration_scale"), Removal.from_json(raw["removal"]),
            _optional(EqualLatency, raw, "equal_latency"), [LastFfnRow.from_json(row) for row in raw["last_ffn"]],
            [ReversedRow.from_json(row) for row in raw["reversed"]], FullBlock.from_json(raw["full_block"]),
            _optional(PredictorComparison, raw, "predictors"),
            {name: DecodeTiming.from_json(timing) for name, timing in raw["decode"].items()}, raw["seconds"],
            _verdicts(raw["verdicts"]), raw.get("command"),
            _verdicts(raw["verdicts_as_run"]) if "verdicts_as_run" in raw else None,
            _optional(Revision, raw, "revision"))
