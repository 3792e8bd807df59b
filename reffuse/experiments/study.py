"""What every finding of `reffuse experiments` starts from: the pre-fusion model, its attention-free run, the
held-out references, the FFN-level dependencies and the fusion plans; and the vocabulary the findings share
(definitions, number formats, the names of the decode-timed models).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.layout import attention_free_runs, original_layers
from reffuse.core.model import Model, forward
from reffuse.errors import ReffuseError
from reffuse.evaluation.prefix import Prefix, cache_prefix, score_variant, sink_restored
from reffuse.evaluation.scoring import PerToken
from reffuse.method.metrics import matrix_to_json
from reffuse.method.pipeline import RemovalChoice, Texts, choose_attention_removal, ffn_dependency
from reffuse.method.planning import propose_groups
from reffuse.method.predictors import PLANNER_PREDICTOR, neighbour_damage_matrix
from reffuse.method.removal import drop_attention
from reffuse.progress import note
from reffuse.records import FlatRecord, present_fields

WINDOW = 4        # full-block windows (the paper's hardware choice)
MAX_STEPS = 4     # greedy full-block steps, as the paper's Table 7

# The steps `run_experiments` reports as it goes, in their order: step(title) numbers each by its place here.
STEPS = ("attention removal",
         "held-out references: the original and the pre-fusion model",
         "FFN-level dependencies in the run; the plans from the neighbour damage",
         "(a, f) fusion intensity",
         "(g) calibrated fusion",
         "(j) calibration",
         "(b, i) FFN removal at equal depth reduction; every removal count, plain and refitted",
         "(c) last FFN, (d) reversed order, (e) full-block parallelization",
         "(h) predictors of fusion damage against every group of the span",
         "decode latency")

DEFINITIONS = {
    "kl": "mean over held-out predictions of KL(reference || variant) of the next-token distributions, nats",
    "reference": "the pre-fusion model (attention removed, nothing fused) unless marked 'vs original'",
    "perplexity": "exp of the mean next-token negative log-likelihood on the held-out windows",
    "per_token": "each held-out prediction's KL, negative log-likelihood (nats) and top-1 agreement with the "
                 "reference (0/1), one list per window, in window order",
    "sink_restored": "the variant's KL with the first token's stream put back to the pre-fusion model's where the "
                     "changed blocks end (the run's end; a full-block variant's last window's end): its damage "
                     "without the change it made to the attention sink",
    "first_token_matrix": "the FFN-level dependency matrix measured on the first token of each window alone, "
                          "which the matrix beside it leaves out",
    "intervals": "a comparison x - y: the mean over predictions, a 95% percentile-bootstrap interval over windows "
                 "and one over blocks of 32 consecutive predictions, and in how many windows x is lower; resolved "
                 "when both intervals exclude 0",
    "steps": "sequential FFN steps left in the fused span (a fused group is one step)",
    "full_block_rule": "[INF] a window of whole blocks [s, e] runs as x + Σ_{j=s..e} (f_j(x) - x), the analogue of "
                       "eq. 5; the paper does not write its rule down",
    "decode": "greedy decode with the KV cache after a 32-token prompt, median over repeats, models timed in "
              "alternation in one run; float32, BLAS pinned to the process's cores",
}


def format_kl(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.2e}"


def format_perplexity(x: float) -> str:
    return f"{x:.2f}" if x < 1e6 else f"{x:.3e}"


def format_correlation(rho: float | None) -> str:
    """A rank correlation to two decimals with its sign; "undefined" for None (reffuse.stats.spearman)."""
    return "undefined" if rho is None else f"{rho:+.2f}"


def format_interval(interval) -> str:
    """A rank correlation's interval as [low, high] with signs; "no interval" for None."""
    return "no interval" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


SCORE_COLUMNS = "| KL | perplexity | top-1 | KL vs original | sink norm |"  # the report's header of score_cells


def score_cells(s: ScoredVariant) -> str:
    """A scored variant (Study.scores) as the report's table cells under SCORE_COLUMNS."""
    return (f"{format_kl(s.kl)} | {format_perplexity(s.perplexity)} | {100 * s.top1:.1f}% | "
            f"{format_kl(s.kl_vs_original)} | {s.sink_norm:.0f}")


def fused_name(steps: int) -> str:
    """The name under which the span fused into `steps` groups is decode-timed."""
    return f"fused, {steps} steps"


def removed_name(depth_reduction: int) -> str:
    """The name under which the span with `depth_reduction` FFNs removed is decode-timed."""
    return f"{depth_reduction} FFNs removed"


def step(title: str, detail: str = "") -> None:
    """Say on stderr that the step `title` of STEPS begins, numbered by its place there."""
    note(f"[{STEPS.index(title) + 1}/{len(STEPS)}] {title}{detail}")


# ---------------------------------------------------------------------------------------------------------------
# What is measured on a variant, and on the reference models


@dataclass(frozen=True)
class ScoredVariant:
    """A variant of the pre-fusion model on the held-out windows (Study.scores): KL(pre-fusion || variant) in nats,
    perplexity and top-1 agreement (0..1), and the same against the original model. A row of a finding records
    it beside its own fields, in one JSON object."""
    kl: float
    perplexity: float
    top1: float
    kl_vs_original: float
    top1_vs_original: float | None = None   # None where a finding did not record it (full-block rows)
    sink_norm: float | None = None          # ||x|| of the first token's stream leaving the run (sink_norm)
    per_token: PerToken | None = None       # each prediction's values (DEFINITIONS["per_token"])
    sink_restored: float | None = None      # the KL with the first token's stream restored (DEFINITIONS)

    def to_json(self) -> dict:
        raw = present_fields(self)
        if self.sink_restored is not None:
            raw["sink_restored"] = {"kl_from_base": self.sink_restored}
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> ScoredVariant:
        """The scores of a JSON object that may hold a row's other fields too."""
        per_token, restored = raw.get("per_token"), raw.get("sink_restored")
        return cls(raw["kl"], raw["perplexity"], raw["top1"], raw["kl_vs_original"], raw.get("top1_vs_original"),
                   raw.get("sink_norm"), None if per_token is None else PerToken.from_json(per_token),
                   None if restored is None else restored["kl_from_base"])


@dataclass(frozen=True)
class ReferenceScores:
    """The original or the pre-fusion model on the held-out windows: perplexity, and for the pre-fusion model its
    KL to the original (nats) and top-1 agreement with it."""
    perplexity: float
    kl_vs_original: float | None = None
    top1_vs_original: float | None = None

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> ReferenceScores:
        return cls(raw["perplexity"], raw.get("kl_vs_original"), raw.get("top1_vs_original"))


@dataclass(frozen=True)
class Sink(FlatRecord):
    """The attention sink: the first held-out token and its stream's norm entering each block of the pre-fusion
    model (and leaving the last), with the layer where the stream leaves the run."""
    token: int
    layer: int                      # the block after the run
    pre_fusion_norms: list[float]   # one per block boundary, 0 .. len(blocks)

    @property
    def norm_leaving_run(self) -> float:
        return self.pre_fusion_norms[self.layer]


@dataclass(frozen=True)
class DependencyInRun:
    """The FFN-level dependency matrix M inside the run (reffuse.method.metrics.matrix_to_json: null undefined),
    on every token but the first, and on the first token alone (None in runs that did not measure it)."""
    matrix: list[list[float | None]]
    blocks: tuple[int, int]         # the run [a, b]: row and column i are block a + i
    tokens: int                     # calibration tokens measured
    first_token_matrix: list[list[float | None]] | None = None

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> DependencyInRun:
        return cls(raw["matrix"], tuple(raw["blocks"]), raw["tokens"], raw.get("first_token_matrix"))


@dataclass(frozen=True)
class PlanCosts:
    """The planner's cost matrix inside the run: what `predictor` says of each pair (reffuse.method.predictors)."""
    predictor: str
    matrix: list[list[float | None]]
    blocks: tuple[int, int]         # the run [a, b]: row and column i are block a + i
    tokens: int                     # calibration tokens measured

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> PlanCosts:
        return cls(raw["predictor"], raw["matrix"], tuple(raw["blocks"]), raw["tokens"])


@dataclass(frozen=True)
class Preparation:
    """What steps 1-3 measured, as the result records it (reffuse.experiments.findings.StudyResult)."""
    attention_removal: RemovalChoice
    original: ReferenceScores
    pre_fusion: ReferenceScores
    sink: Sink
    ffn_dependency: DependencyInRun
    plan_costs: PlanCosts


# ---------------------------------------------------------------------------------------------------------------
# Variants of a model and what is measured on each


def reversed_run(model: Model, first: int, last: int) -> Model:
    """Blocks first..last in reverse order (attention-free blocks hold no position-dependent state)."""
    blocks = list(model.blocks)
    blocks[first:last + 1] = blocks[first:last + 1][::-1]
    return dataclasses.replace(model, blocks=blocks)


def sink_norm(model: Model, token: int, layer: int) -> float:
    """||x|| of the first token's stream entering the block that stands for `layer` of the unfused model.

    The first token of a sequence is the attention sink: trained Llamas give its stream a huge norm in one early
    FFN ("massive activations"), and later attention leans on it. Causality makes its stream independent of the
    tokens after it, so a one-token forward gives it exactly.
    """
    hidden = []
    forward(model, [token], hidden_states=hidden)       # hidden[i]: the stream entering block i
    starts = [span[0] for span in original_layers(model)]
    return float(np.linalg.norm(to_numpy(hidden[starts.index(layer)] if layer in starts else hidden[-1])))


# ---------------------------------------------------------------------------------------------------------------
# The study


@dataclass
class Study:
    """The pre-fusion model and everything measured once for all findings."""
    original: Model
    pre: Model                   # attention removed: the paper's PreFusion, the reference of every finding
    texts: Texts
    region: tuple[int, int]      # the longest attention-free run [a, b]
    prefix: Prefix               # the pre-fusion model's held-out stream, cached
    original_prefix: Prefix      # the original model's
    ffn_dependency: np.ndarray   # M at FFN level, [m, m], NaN outside blocks 0..b
    first_token_dependency: np.ndarray  # the same on the first token of each window alone
    plans: dict                  # steps k -> the span's groups, for every k of finding (a), cut by the planner
    scoring_tokens: int
    dependency_tokens: int
    window: int
    cosine_plans: dict           # the same cut by cosine-M, the paper's metric, to test the planner's choice
    prepared: Preparation        # what steps 1-3 measured, for the result

    @property
    def span(self) -> tuple[int, int]:
        """The span fused: the run without its last block, as in the paper."""
        return self.region[0], self.region[1] - 1

    @property
    def length(self) -> int:
        return self.span[1] - self.span[0] + 1

    @property
    def counts(self) -> list[int]:
        """The step counts of finding (a), most first."""
        return sorted(self.plans, reverse=True)

    def scores(self, variant: Model, first: int) -> ScoredVariant:
        """A variant (blocks before `first` unchanged) against the pre-fusion model and the original."""
        s = score_variant(self.prefix, variant, first, reference=self.original_prefix, per_token=True)
        return ScoredVariant(s.kl_from_base, s.perplexity, s.top1_agreement, s.kl_from_reference,
                             s.top1_agreement_reference,
                             sink_norm(variant, int(self.prefix.windows[0][0]), self.region[1] + 1), s.per_token,
                             sink_restored(self.prefix, variant, first, self.region[1] + 1).kl_from_base)


def prepare_study(original: Model, texts: Texts, drop_count: int, scoring_tokens: int, dependency_tokens: int,
                  window: int, region_rank: int = 1) -> Study:
    """Steps 1-3: attention removal (the region_rank-th cheapest window of drop_count blocks), the held-out
    references, the FFN-level dependencies in the run and the plans; what they find is the Study's `prepared`."""
    step("attention removal")
    removal = choose_attention_removal(original, texts.scoring(scoring_tokens, min(window, 128)), count=drop_count,
                                       contiguous=True, rank=region_rank)
    pre = drop_attention(original, removal.blocks)
    a, b = max(attention_free_runs(pre), key=lambda run: (run[1] - run[0], -run[0]))  # the longest run
    if b - a < 2:
        raise ReffuseError(f"the longest attention-free run, {a}-{b}, leaves fewer than 2 FFNs to fuse once its "
                           "last block is left out: remove more attention (--drop-attention-count)")

    step("held-out references: the original and the pre-fusion model")
    original_prefix = cache_prefix(original, texts.held_out.ids)
    prefix = cache_prefix(pre, texts.held_out.ids)
    removed = score_variant(original_prefix, pre, removal.blocks[0])
    sink = int(texts.held_out.ids[0][0])
    sink_norms = [sink_norm(pre, sink, layer) for layer in range(len(pre.blocks) + 1)]

    step("FFN-level dependencies in the run; the plans from the neighbour damage")
    M = ffn_dependency(pre, texts.scoring(dependency_tokens, min(window, 64)), up_to=b)
    first_token = ffn_dependency(pre, texts.scoring(dependency_tokens, min(window, 64)), up_to=b, sink_only=True)
    costs = neighbour_damage_matrix(pre, cache_prefix(pre, texts.scoring(scoring_tokens, min(window, 128))), [(a, b)])
    length = b - a
    counts = sorted({math.ceil(length / 2), *range(1, math.ceil(length / 2) + 1)}, reverse=True)
    plans = {k: propose_groups(pre, costs, groups_per_run=k, runs=[(a, b)], predictor=PLANNER_PREDICTOR).groups
             for k in counts}
    cosine_plans = {k: propose_groups(pre, M, groups_per_run=k, runs=[(a, b)]).groups for k in counts}
    prepared = Preparation(
        attention_removal=removal, original=ReferenceScores(removed.base_perplexity),
        pre_fusion=ReferenceScores(removed.perplexity, removed.kl_from_base, removed.top1_agreement),
        sink=Sink(sink, b + 1, sink_norms),
        ffn_dependency=DependencyInRun(matrix_to_json(M[a:b + 1, a:b + 1]), (a, b), dependency_tokens,
                                       matrix_to_json(first_token[a:b + 1, a:b + 1])),
        plan_costs=PlanCosts(PLANNER_PREDICTOR, matrix_to_json(costs[a:b + 1, a:b + 1]), (a, b), scoring_tokens))
    return Study(original, pre, texts, (a, b), prefix, original_prefix, M, first_token, plans, scoring_tokens,
                 dependency_tokens, window, cosine_plans, prepared)
