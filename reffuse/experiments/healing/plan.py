"""What the healing study heals, with what, and in which order.

The starting models are the ones the fusion study measured before any training (reports/experiments/smollm2,
region 1): the original SmolLM2 with the attention of its cheapest 8-block window removed (the paper's PreFusion
model), that model fused into 4 steps and into 1 step, each fused model also with the calibrated refit of its
down-projections, and FFN removal at the same number of sequential FFN steps (which the cost model also puts at
the nearest modelled latency, so "equal steps" and "equal latency" are one comparison here). Every variant is
rebuilt from the original weights and the choices recorded in that study's JSON, whose commit the study records.

Each variant is healed with the same budget and the same trainable set: the FFN weights (norm gain, gate, up,
down) of every block in the attention-free region as the variant numbers it. The control, the original model,
trains the same set on the same text by next-token cross-entropy (no teacher: it is the teacher), to show how much
of "healing" is fitting Shakespeare.

Objectives:
- "kd": knowledge distillation from the original on the training split (the paper's healing, §3);
- "kd-fused": the same, training the fused blocks only (the trainable set of local distillation, for finding (n));
- "local": each fused FFN trained to reproduce the sequential run's update on the stream entering it
  (reffuse.method.distill's objective, stochastic over the training windows);
- "ce": next-token cross-entropy (the control).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from reffuse.core.fusion import fuse
from reffuse.core.model import Model
from reffuse.core.names import named_weights
from reffuse.errors import ReffuseError
from reffuse.experiments.findings.result import StudyResult
from reffuse.files import checkout_root, read_json
from reffuse.method.calibrate import calibrated_fuse
from reffuse.method.removal import cheapest, drop_attention, drop_ffns
from reffuse.records import FlatRecord

FUSION_STUDY = "reports/experiments/smollm2/experiments.json"  # the unhealed variants, measured and committed

# The variants, in the order of the report's tables and figure.
ATTENTION_REMOVED = "attention removed"
VARIANTS = (ATTENTION_REMOVED, "fused, 4 steps", "fused, 4 steps, refit", "3 FFNs removed",
            "fused, 1 step", "fused, 1 step, refit", "6 FFNs removed", "original")
FUSED = {"fused, 4 steps": 4, "fused, 4 steps, refit": 4, "fused, 1 step": 1, "fused, 1 step, refit": 1}
REMOVED = {"3 FFNs removed": 3, "6 FFNs removed": 6}
OBJECTIVES = ("kd", "kd-fused", "local", "ce")


@dataclass(frozen=True)
class FusionChoices:
    """What the fusion study chose, read from its committed JSON."""
    attention_removed: tuple[int, ...]   # blocks without attention
    region: tuple[int, int]              # the attention-free run
    plans: dict                          # steps -> groups [(first, last), ...]
    ffn_scores: dict                     # span FFN -> KL of removing it alone (the order FFN removal follows)
    ridge: float                         # the refit's ridge and weighting, chosen on calibration text
    weighting: str
    calibration_tokens: int
    calibration_window: int

    @classmethod
    def from_study(cls, study: StudyResult) -> FusionChoices:
        return cls(tuple(study.attention_removal.blocks), tuple(study.region),
                   {row.steps: [tuple(g) for g in row.groups] for row in study.intensity}, dict(study.removal.ffn_scores),
                   study.calibration.ridge, study.calibration.weighting, study.settings.calibration_tokens,
                   study.settings.window)

    def to_json(self) -> dict:
        """The choices as a study folder's study.json records them (lists for tuples, string keys)."""
        return {"attention_removed": list(self.attention_removed), "region": list(self.region),
                "plans": {str(steps): [list(g) for g in groups] for steps, groups in self.plans.items()},
                "ffn_scores": {str(ffn): kl for ffn, kl in self.ffn_scores.items()}, "ridge": self.ridge,
                "weighting": self.weighting, "calibration_tokens": self.calibration_tokens,
                "calibration_window": self.calibration_window}

    @classmethod
    def from_json(cls, record: dict) -> FusionChoices:
        return cls(tuple(record["attention_removed"]), tuple(record["region"]),
                   {int(k): [tuple(g) for g in groups] for k, groups in record["plans"].items()},
                   {int(k): v for k, v in record["ffn_scores"].items()}, record["ridge"], record["weighting"],
                   record["calibration_tokens"], record["calibration_window"])

    def removed(self, count: int) -> list[int]:
        """The `count` least important FFNs of the span (finding (b)'s order)."""
        return cheapest(self.ffn_scores, count)


def read_fusion_choices() -> FusionChoices:
    path = checkout_root() / FUSION_STUDY
    return FusionChoices.from_study(StudyResult.from_json(
        read_json(path, "run the healing study from a checkout of reffuse, which holds the committed fusion study")))


@dataclass(frozen=True)
class Variant:
    """A starting model and the blocks of its attention-free region (as it numbers them)."""
    name: str
    model: Model
    region: tuple[int, int]

    def ffn_names(self) -> list[str]:
        """The trainable set of "kd", "ce": every FFN weight of the region's blocks."""
        prefixes = tuple(f"model.layers.{i}." for i in range(self.region[0], self.region[1] + 1))
        return [n for n in named_weights(self.model)
                if n.startswith(prefixes) and (".mlp." in n or "post_attention_layernorm" in n)]

    def fused_names(self) -> list[str]:
        """The trainable set of "kd-fused" and "local": the fused blocks' gate, up and down projections."""
        fused = tuple(f"model.layers.{i}.mlp." for i, b in enumerate(self.model.blocks) if b.fused_from)
        return [n for n in self.ffn_names() if n.startswith(fused)]

    def trainable(self, objective: str) -> list[str]:
        return self.fused_names() if objective in ("kd-fused", "local") else self.ffn_names()


def build_variant(name: str, original: Model, choices: FusionChoices, calibration_windows) -> Variant:
    """The named starting model; `calibration_windows` feed the refit variants."""
    first, last = choices.region
    if name == "original":
        return Variant(name, original, choices.region)
    pre = drop_attention(original, choices.attention_removed)
    if name == ATTENTION_REMOVED:
        return Variant(name, pre, choices.region)
    if name in REMOVED:
        return Variant(name, drop_ffns(pre, choices.removed(REMOVED[name])), choices.region)
    if name in FUSED:
        groups = choices.plans[FUSED[name]]
        if name.endswith("refit"):
            model, _ = calibrated_fuse(pre, groups, calibration_windows, ridge=choices.ridge,
                                       weighting=choices.weighting)
        else:
            model = fuse(pre, groups)
        merged = sum(b - a for a, b in groups)     # blocks the groups take away
        return Variant(name, model, (first, last - merged))
    raise ReffuseError(f"no healing-study variant named {name!r}: use one of {', '.join(VARIANTS)}")


@dataclass(frozen=True)
class Point(FlatRecord):
    """One trained (or untrained, budget 0) model of the study."""
    variant: str
    objective: str          # one of OBJECTIVES; "start" for budget 0
    tokens: int             # the training budget
    seed: int = 0
    learning_rate: float = 0.0
    split: str = "held-out"  # where it is scored: "held-out", or "calibration" for the learning-rate choice

    @property
    def key(self) -> str:
        rate = f"-lr{self.learning_rate:g}" if self.split == "calibration" else ""
        return (f"{self.variant.replace(', ', '-').replace(' ', '-')}_{self.objective}_{self.tokens}_seed{self.seed}"
                f"{rate}" + ("_calibration" if self.split == "calibration" else ""))


@dataclass(frozen=True)
class Budgets:
    """The study's budgets and seeds (tokens of training text)."""
    kd: tuple = (16384, 65536, 262144)
    local: tuple = (16384, 65536, 262144, 1048576)
    seeds: tuple = (0, 1, 2)                  # at the largest kd budget, for the points the findings judge
    sweep_tokens: int = 16384                 # the learning-rate choice: one budget, on calibration text
    kd_rates: tuple = (3e-5, 1e-4, 3e-4, 1e-3)
    local_rates: tuple = (1e-4, 3e-4, 1e-3, 3e-3)
    finding_variants: tuple = field(default=(ATTENTION_REMOVED, "fused, 4 steps", "fused, 4 steps, refit",
                                             "3 FFNs removed", "fused, 1 step", "fused, 1 step, refit",
                                             "6 FFNs removed"))

    def seeds_of(self, variant: str, objective: str, tokens: int) -> tuple:
        """The seeds a point runs with: every seed for the points a finding judges (the finding variants distilled
        by kd at the largest kd budget; the 4-step fused model's kd-fused and local where (n) compares them), else
        seed 0."""
        judged = ((objective == "kd" and variant in self.finding_variants and tokens == max(self.kd)) or
                  (variant == "fused, 4 steps" and objective in ("kd-fused", "local") and tokens == self.compared))
        return self.seeds if judged else (0,)

    @property
    def compared(self) -> int:
        """The largest budget both kd and local run: where (n) compares them."""
        return max(set(self.kd) & set(self.local))

    def __post_init__(self):
        if not self.seeds or self.seeds[0] != 0 or len(set(self.seeds)) != len(self.seeds):
            raise ReffuseError(f"the study's seeds must start at 0 (every point runs seed 0), got {self.seeds}")
        if not set(self.kd) & set(self.local):
            raise ReffuseError(f"kd budgets {self.kd} and local budgets {self.local} share none: finding (n) "
                               "compares the two objectives at a budget both run")

    def to_json(self) -> dict:
        """The budgets as study.json records them: lists for tuples."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict) -> Budgets:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


def sweep_points(budgets: Budgets) -> list[Point]:
    """The learning-rate choice, before any held-out point: fused 4 steps healed for sweep_tokens at each
    candidate rate, scored on calibration text (kd's rate serves kd, kd-fused and ce; local's serves local)."""
    kd = [Point("fused, 4 steps", "kd", budgets.sweep_tokens, 0, r, "calibration") for r in budgets.kd_rates]
    local = [Point("fused, 4 steps", "local", budgets.sweep_tokens, 0, r, "calibration") for r in budgets.local_rates]
    return kd + local


def study_points(budgets: Budgets) -> list[Point]:
    """Every held-out point, cheapest first, so that an interrupted study has every variant at the small
    budgets before any at the large ones (learning rates are filled in from the sweep's choice)."""
    points = [Point(v, "start", 0) for v in VARIANTS if v != "original"]
    for tokens in sorted(set(budgets.kd) | set(budgets.local)):
        if tokens in budgets.kd:
            points += [Point(v, "ce" if v == "original" else "kd", tokens) for v in VARIANTS]
            points += [Point(v, "kd-fused", tokens) for v in ("fused, 4 steps",)]
        if tokens in budgets.local:
            points += [Point(v, "local", tokens) for v in ("fused, 4 steps", "fused, 1 step")]
    seeded = [p for p in points if len(budgets.seeds_of(p.variant, p.objective, p.tokens)) > 1]
    for seed in budgets.seeds[1:]:
        points += [replace(p, seed=seed) for p in seeded]
    return points
