"""What `reffuse demo` found (reffuse.experiments.demo.run_demo), typed: the records its command, report and figures
read, and its JSON both ways.

A speedup's 95% interval is a pair, or None where fewer than reffuse.stats.MIN_PAIRS repeats gave none. A synthetic
model has no held-out quality: `quality` and `sequential_vs_parallel` are then None ({"meaningful": false} and
absent in the JSON).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from reffuse.formats.corpus import WindowsRecord
from reffuse.method.calibrate import GroupCalibration
from reffuse.method.pipeline import RemovalChoice, TextsRecord
from reffuse.method.planning import Plan
from reffuse.records import FlatRecord, as_json, as_tuple, records_of
from reffuse.training.trainer import TrainingOptions

GIVEN_PLAN = "given (--groups)"  # the rule of groups given on the command line instead of planned
# The models' names: the keys of the quality, speed and samples records, and their labels in tables and figures.
ORIGINAL, REMOVED, FUSED, CALIBRATED, HEALED = ("original", "attention removed", "fused", "fused, calibrated",
                                                "fused, healed")


@dataclass(frozen=True)
class FfnDependency(FlatRecord):
    """The FFN-level dependency matrix of the attention-removed model (reffuse.method.metrics.matrix_to_json: null
    where undefined or not run)."""
    matrix: list[list]
    tokens: int


@dataclass(frozen=True)
class Exactness:
    """max |fused - parallel| / max |parallel| over the logits (Theorem 3.1: zero but for rounding)."""
    float32: float
    float64: float
    tokens: int

    def to_json(self) -> dict:
        """Two keys of the demo's JSON."""
        return {"fused_vs_parallel_relative_error": {"float32": self.float32, "float64": self.float64},
                "exactness_tokens": self.tokens}

    @classmethod
    def from_json(cls, raw: dict) -> Exactness:
        """From the demo's whole JSON, where its two keys lie."""
        errors = raw["fused_vs_parallel_relative_error"]
        return cls(errors["float32"], errors["float64"], raw["exactness_tokens"])


@dataclass(frozen=True)
class LayoutChange:
    """A block of the fused model that differs from the layers it stands for: fused, or its attention removed."""
    block: int
    layers: tuple[int, ...]
    attention: bool
    ffn_width: int
    attention_before: tuple[bool, ...]  # of each layer, as loaded
    ffn_widths_before: tuple[int, ...]

    def to_json(self) -> dict:
        return as_json(asdict(self))

    @classmethod
    def from_json(cls, raw: dict) -> LayoutChange:
        return cls(raw["block"], as_tuple(raw["layers"]), raw["attention"], raw["ffn_width"],
                   as_tuple(raw["attention_before"]), as_tuple(raw["ffn_widths_before"]))


@dataclass(frozen=True)
class Healing:
    """The fused blocks' short distillation from the original: its budget, options and loss at each step."""
    tokens: int
    window: int
    steps: int
    trainable: str
    weights: int
    options: TrainingOptions
    losses: list[float]
    seconds: float
    text: WindowsRecord

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "window": self.window, "steps": self.steps, "trainable": self.trainable,
                "weights": self.weights, "options": self.options.to_json(), "losses": self.losses,
                "seconds": self.seconds, "text": self.text.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> Healing:
        return cls(raw["tokens"], raw["window"], raw["steps"], raw["trainable"], raw["weights"],
                   TrainingOptions.from_json(raw["options"]), raw["losses"], raw["seconds"],
                   WindowsRecord.from_json(raw["text"]))


@dataclass(frozen=True)
class ModelQuality:
    """One model on held-out text; the original, the reference of the rest, has only its perplexity."""
    perplexity: float
    kl_vs_original: float | None = None
    top1_vs_original: float | None = None
    kl_vs_attention_removed: float | None = None
    top1_vs_attention_removed: float | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, raw: dict) -> ModelQuality:
        return cls(**raw)


@dataclass(frozen=True)
class GapClosed(FlatRecord):
    """The share of the fusion gap a step closes (reffuse.experiments.demo.gap_closed); None without a gap."""
    kl_vs_attention_removed: float | None
    perplexity: float | None


@dataclass(frozen=True)
class HeldOutQuality:
    """Every model on held-out text, by name, and what calibration and healing win back of the fusion gap."""
    models: dict[str, ModelQuality]
    predictions: int
    calibration_closes: GapClosed
    healing_closes: GapClosed
    calibrated_beats_plain_kl_vs_original: bool

    def to_json(self) -> dict:
        return {"models": as_json(self.models), "predictions": self.predictions,
                "meaningful": True, "calibration_closes": self.calibration_closes.to_json(),
                "healing_closes": self.healing_closes.to_json(),
                "calibrated_beats_plain_kl_vs_original": self.calibrated_beats_plain_kl_vs_original}

    @classmethod
    def from_json(cls, raw: dict) -> HeldOutQuality:
        return cls(records_of(ModelQuality, raw["models"]), raw["predictions"],
                   GapClosed.from_json(raw["calibration_closes"]), GapClosed.from_json(raw["healing_closes"]),
                   raw["calibrated_beats_plain_kl_vs_original"])


@dataclass(frozen=True)
class SequentialVsParallel(FlatRecord):
    """The approximation fusion makes: the fused model (the parallel form) against the sequential blocks."""
    kl: float
    top1_agreement: float
    predictions: int


@dataclass(frozen=True)
class DecodeSpeed:
    """A model's decode: its median rate, and its speedup over the original with the 95% interval."""
    tokens_per_second: float
    ms_per_token: float
    speedup: float
    speedup_interval_95: tuple | None

    def to_json(self) -> dict:
        return as_json(asdict(self))

    @classmethod
    def from_json(cls, raw: dict) -> DecodeSpeed:
        return cls(raw["tokens_per_second"], raw["ms_per_token"], raw["speedup"], as_tuple(raw["speedup_interval_95"]))


@dataclass(frozen=True)
class RegionTime:
    """A model's median time of the run's blocks, and its speedup over the original with the 95% interval."""
    ms: float
    speedup: float
    speedup_interval_95: tuple | None

    def to_json(self) -> dict:
        return as_json(asdict(self))

    @classmethod
    def from_json(cls, raw: dict) -> RegionTime:
        return cls(raw["ms"], raw["speedup"], as_tuple(raw["speedup_interval_95"]))


@dataclass(frozen=True)
class RegionRow:
    """The run's blocks timed on `tokens` tokens, each model by name."""
    tokens: int
    times: dict[str, RegionTime]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, **as_json(self.times)}

    @classmethod
    def from_json(cls, raw: dict) -> RegionRow:
        times = {name: t for name, t in raw.items() if name != "tokens"}
        return cls(raw["tokens"], records_of(RegionTime, times))


@dataclass(frozen=True)
class Speed:
    """Decode and the run's blocks, every model timed in one run, in alternation."""
    decode: dict[str, DecodeSpeed]  # the original first
    decode_tokens: int
    prompt_tokens: int
    load_average_1min: float | None  # None where the system gives none
    region: tuple[int, int]
    region_rows: tuple[RegionRow, ...]
    repeats: int

    def to_json(self) -> dict:
        return {"decode": as_json(self.decode), "decode_tokens": self.decode_tokens,
                "prompt_tokens": self.prompt_tokens, "load_average_1min": self.load_average_1min,
                "region": as_json(self.region), "region_rows": as_json(self.region_rows), "repeats": self.repeats}

    @classmethod
    def from_json(cls, raw: dict) -> Speed:
        return cls(records_of(DecodeSpeed, raw["decode"]), raw["decode_tokens"],
                   raw["prompt_tokens"], raw["load_average_1min"], as_tuple(raw["region"]),
                   tuple(RegionRow.from_json(row) for row in raw["region_rows"]), raw["repeats"])


@dataclass(frozen=True)
class Samples(FlatRecord):
    """A greedy continuation of the prompt from each model: text, or token ids for a synthetic model."""
    prompt: str | list[int]
    continuations: dict[str, str | list[int]]


@dataclass(frozen=True)
class DemoResult:
    """Every step of the demo on one model; `figures` are None until the command draws them."""
    model: str
    model_name: str
    synthetic: bool
    norm: str
    texts: TextsRecord
    attention_removal: RemovalChoice | None  # None: no attention removed
    plan: Plan | None                        # None: the groups given (--groups)
    groups: tuple[tuple[int, int], ...]
    region: tuple[int, int]                  # the attention-free run holding the first group
    ffn_dependency: FfnDependency
    exactness: Exactness
    layout_before: list[dict]                # reffuse.core.layout.Layout.rows(): as loaded,
    layout_removed: list[dict]               # attention removed,
    layout_after: list[dict]                 # and fused
    layout_changes: tuple[LayoutChange, ...]
    calibration: tuple[GroupCalibration, ...]
    healing: Healing
    quality: HeldOutQuality | None
    sequential_vs_parallel: SequentialVsParallel | None
    speed: Speed
    samples: Samples
    seconds: float
    figures: tuple[str, ...] | None = None

    def attention_free_blocks(self) -> list[int]:
        """The blocks without attention once it is removed, before fusion."""
        return [row["block"] for row in self.layout_removed if not row["attention"]]

    def to_json(self) -> dict:
        groups = as_json(self.groups)
        raw = {"model": self.model, "model_name": self.model_name, "synthetic": self.synthetic, "norm": self.norm,
               "texts": self.texts.to_json(),
               "attention_removal": None if self.attention_removal is None else self.attention_removal.to_json(),
               "plan": {"groups": groups, "rule": GIVEN_PLAN} if self.plan is None else self.plan.to_json(),
               "groups": groups, "region": as_json(self.region), "ffn_dependency": self.ffn_dependency.to_json(),
               **self.exactness.to_json(), "layout_before": self.layout_before, "layout_removed": self.layout_removed,
               "layout_after": self.layout_after, "layout_changes": as_json(self.layout_changes),
               "calibration": [f.as_dict() for f in self.calibration], "healing": self.healing.to_json(),
               "quality": {"meaningful": False} if self.quality is None else self.quality.to_json()}
        if self.sequential_vs_parallel is not None:
            raw["sequential_vs_parallel"] = self.sequential_vs_parallel.to_json()
        raw |= {"speed": self.speed.to_json(), "samples": self.samples.to_json(), "seconds": self.seconds}
        return raw if self.figures is None else raw | {"figures": as_json(self.figures)}

    @classmethod
    def from_json(cls, raw: dict) -> DemoResult:
        removal, plan, quality = raw["attention_removal"], raw["plan"], raw["quality"]
        gap = raw.get("sequential_vs_parallel")
        return cls(raw["model"], raw["model_name"], raw["synthetic"], raw["norm"], TextsRecord.from_json(raw["texts"]),
                   None if removal is None else RemovalChoice.from_json(removal),
                   None if plan["rule"] == GIVEN_PLAN else Plan.from_json(plan),
                   as_tuple(raw["groups"]), as_tuple(raw["region"]),
                   FfnDependency.from_json(raw["ffn_dependency"]), Exactness.from_json(raw), raw["layout_before"],
                   raw["layout_removed"], raw["layout_after"],
                   tuple(LayoutChange.from_json(c) for c in raw["layout_changes"]),
                   tuple(GroupCalibration.from_dict(f) for f in raw["calibration"]), Healing.from_json(raw["healing"]),
                   HeldOutQuality.from_json(quality) if quality["meaningful"] else None,
                   None if gap is None else SequentialVsParallel.from_json(gap), Speed.from_json(raw["speed"]),
                   Samples.from_json(raw["samples"]), raw["seconds"], as_tuple(raw.get("figures")))
