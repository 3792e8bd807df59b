"""The dependency analysis of one model, as `reffuse analyze` runs it (its --help says what is measured):
optionally removing attention first, then the dependency matrices, per-block metrics, window statistics, the
paper's greedy selection and a fusion plan, all on calibration text (or random ids for a synthetic model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from reffuse.core.layout import BlockLayout, attention_free_runs, blocks_from_json, blocks_to_json, full_blocks
from reffuse.core.model import layout
from reffuse.errors import ReffuseError
from reffuse.options import FromArguments, as_recorded
from reffuse.formats.corpus import Span, calibration_windows
from reffuse.formats.registry import check_tokenizer, load_model, load_tokenizer
from reffuse.method.metrics import (DEFINITIONS, GRANULARITIES, TIE_TOLERANCE, GreedyStep, WindowRow,
                                    block_evaluations_needed, check_window, dependency, greedy_windows,
                                    matrix_from_json, matrix_to_json, window_statistics)
from reffuse.method.pipeline import choose_attention_removal, is_synthetic
from reffuse.method.planning import Plan, propose_groups
from reffuse.method.removal import drop_attention
from reffuse.progress import Progress
from reffuse.records import FlatRecord

DEFAULT_TOKENS = 512


@dataclass
class AnalysisOptions(FromArguments):
    """What `reffuse analyze` takes (its --help says what each means)."""
    model: str = "smollm2"
    tokenizer: str | None = None
    drop_attention: list | None = None
    drop_attention_count: int | None = None
    dependency_tokens: int = DEFAULT_TOKENS
    sequence_length: int | None = None
    include_sink: bool = False
    window_blocks: int = 4
    greedy_blocks: str = "full"
    max_group_size: int | None = 4
    groups_per_run: int | None = None
    include_last: bool = False
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"


@dataclass
class AnalyzedModel:
    """The model as measured, after any attention removal."""
    name: str                  # as given (--model): a path is recorded relative to the working folder
    config_name: str
    dtype: str
    blocks: int
    layout: tuple[BlockLayout, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "config_name": self.config_name, "dtype": self.dtype, "blocks": self.blocks,
                "layout": blocks_to_json(self.layout)}

    @classmethod
    def from_json(cls, raw: dict) -> AnalyzedModel:
        return cls(raw["name"], raw["config_name"], raw["dtype"], raw["blocks"],
                   blocks_from_json(raw["layout"], "analysis.json: model layout"))


@dataclass
class AttentionRemoval:
    """How the blocks that lost their attention were chosen (reffuse.method.pipeline.choose_attention_removal)."""
    how: str
    blocks: str                            # as text ("14-21"; "-" for none)
    joint_kl: float | None = None          # KL of removing them all; None for none (and in analyses recorded before it)
    kl_scores: dict[int, float] | None = None  # block -> KL of removing its attention alone, where that chose them

    def to_json(self) -> dict:
        raw = {"how": self.how, "blocks": self.blocks}
        if self.joint_kl is not None:
            raw["joint_kl"] = self.joint_kl
        if self.kl_scores is not None:
            raw["kl_scores"] = {str(block): kl for block, kl in self.kl_scores.items()}
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> AttentionRemoval:
        scores = raw.get("kl_scores")
        return cls(raw["how"], raw["blocks"], raw.get("joint_kl"),
                   None if scores is None else {int(block): kl for block, kl in scores.items()})


@dataclass
class AnalysisTokens:
    """The token ids measured on, and where they came from, so that the analysis can be rerun on the same ids."""
    split: str
    spans: tuple[Span, ...]           # the text's spans; none for random ids
    tokenizer: str | None             # None for random ids
    sequences: int
    sequence_length: int
    total: int
    measured: int                     # the positions measured: the attention sink left out unless included
    attention_sink_excluded: bool
    ids: list[list[int]]
    span_kinds: bool = True           # False in analyses recorded before spans named their kind (drama or verse)

    def to_json(self) -> dict:
        spans = [s.as_dict() if self.span_kinds else {k: v for k, v in s.as_dict().items() if k != "kind"}
                 for s in self.spans]
        raw = {"split": self.split, "spans": spans, "tokenizer": self.tokenizer, "sequences": self.sequences,
               "sequence_length": self.sequence_length, "total": self.total, "measured": self.measured,
               "attention_sink_excluded": self.attention_sink_excluded, "ids": self.ids}
        return raw if self.tokenizer is not None else {k: v for k, v in raw.items() if k != "tokenizer"}

    @classmethod
    def from_json(cls, raw: dict) -> AnalysisTokens:
        return cls(raw["split"], tuple(Span(**s) for s in raw["spans"]), raw.get("tokenizer"), raw["sequences"],
                   raw["sequence_length"], raw["total"], raw["measured"], raw["attention_sink_excluded"], raw["ids"],
                   all("kind" in s for s in raw["spans"]))


@dataclass(frozen=True, eq=False)  # arrays: compare them with numpy
class DependencyMatrices:
    """M[i, j], how much block j's contribution turns when block i is skipped (reffuse.method.metrics), between
    whole blocks and between FFN sub-blocks; NaN where undefined (j <= i, or a sub-block missing)."""
    block: np.ndarray   # [m, m]
    ffn: np.ndarray     # [m, m]

    def by_granularity(self) -> dict[str, np.ndarray]:
        return {"block": self.block, "ffn": self.ffn}

    def to_json(self) -> dict:
        return {granularity: matrix_to_json(M) for granularity, M in self.by_granularity().items()}

    @classmethod
    def from_json(cls, raw: dict) -> DependencyMatrices:
        return cls(matrix_from_json(raw["block"]), matrix_from_json(raw["ffn"]))


@dataclass
class BlockMetrics(FlatRecord):
    """The paper's per-block metrics (§5.5), each a mean over the measured tokens, one value per block."""
    cos_dist_x_fx: list[float]   # cosdist(X, f(X)): how much the block turns the stream
    norm_ratio: list[float]      # ||h(X)|| / ||X||: how large its update is next to the stream
    cos_dist_h_x: list[float]    # cosdist(h(X), X): the angle between update and stream


@dataclass
class WindowStatistics:
    """M_max and M_sum of every window of `length` blocks."""
    length: int
    granularity: str
    rows: tuple[WindowRow, ...]

    def to_json(self) -> dict:
        return {"length": self.length, "granularity": self.granularity, "rows": [r.to_json() for r in self.rows]}

    @classmethod
    def from_json(cls, raw: dict) -> WindowStatistics:
        return cls(raw["length"], raw["granularity"], tuple(WindowRow.from_json(r) for r in raw["rows"]))


@dataclass
class GreedySelection:
    """The paper's greedy choice of windows."""
    granularity: str
    blocks: str                       # the windows it may take: "full" blocks only (the paper) or "all"
    tie_tolerance: float
    steps: tuple[GreedyStep, ...]

    def to_json(self) -> dict:
        return {"granularity": self.granularity, "blocks": self.blocks, "tie_tolerance": self.tie_tolerance,
                "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, raw: dict) -> GreedySelection:
        return cls(raw["granularity"], raw["blocks"], raw["tie_tolerance"],
                   tuple(GreedyStep.from_json(s) for s in raw["steps"]))


@dataclass
class Analysis:
    """What `reffuse analyze` measured: what analysis.json holds, and the figures are drawn from."""
    model: AnalyzedModel
    attention_removed: list[int]
    attention_removal: AttentionRemoval
    attention_free_runs: list[list[int]]
    tokens: AnalysisTokens
    definitions: dict[str, str]       # term -> what it means (reffuse.method.metrics.DEFINITIONS)
    dependency: DependencyMatrices
    per_block: BlockMetrics
    windows: WindowStatistics
    greedy: GreedySelection
    plan: Plan
    block_evaluations: int
    seconds: float
    cpu_seconds: float

    def attention_free_blocks(self) -> list[int]:
        return [i for i, block in enumerate(self.model.layout) if not block.attention]

    def to_json(self) -> dict:
        return {"model": self.model.to_json(), "attention_removed": self.attention_removed,
                "attention_removal": self.attention_removal.to_json(), "attention_free_runs": self.attention_free_runs,
                "tokens": self.tokens.to_json(), "definitions": self.definitions,
                "dependency": self.dependency.to_json(), "per_block": self.per_block.to_json(),
                "windows": self.windows.to_json(), "greedy": self.greedy.to_json(), "plan": self.plan.to_json(),
                "block_evaluations": self.block_evaluations, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds}

    @classmethod
    def from_json(cls, raw: dict) -> Analysis:
        return cls(AnalyzedModel.from_json(raw["model"]), raw["attention_removed"],
                   AttentionRemoval.from_json(raw["attention_removal"]), raw["attention_free_runs"],
                   AnalysisTokens.from_json(raw["tokens"]), raw["definitions"],
                   DependencyMatrices.from_json(raw["dependency"]), BlockMetrics.from_json(raw["per_block"]),
                   WindowStatistics.from_json(raw["windows"]), GreedySelection.from_json(raw["greedy"]),
                   Plan.from_json(raw["plan"]), raw["block_evaluations"], raw["seconds"], raw["cpu_seconds"])


def analysis_tokens(options: AnalysisOptions, model) -> tuple[np.ndarray, str, tuple[Span, ...], str | None]:
    """Token ids [n_sequences, sequence_length] and where they came from (the split, its spans and the
    tokenizer): calibration text, or random ids for a synthetic model (which has no tokenizer and no notion of
    text; then no spans and no tokenizer)."""
    tokens = options.dependency_tokens
    length = options.sequence_length or tokens
    if tokens < 2 or length < 2:
        raise ReffuseError(f"--dependency-tokens {tokens} and --sequence-length {length} must be at least 2")
    if length > tokens:
        raise ReffuseError(f"--sequence-length {length} is longer than --dependency-tokens {tokens}")
    if is_synthetic(options.model, model) and options.tokenizer is None:
        rng = np.random.default_rng(options.seed)
        ids = rng.integers(0, model.config.vocab_size, (tokens // length, length))
        return ids, f"random token ids (seed {options.seed}): {options.model} is synthetic", (), None
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    check_tokenizer(tokenizer, model, options.model)
    windows = calibration_windows(tokenizer, length, tokens)
    described = windows.describe()
    return windows.ids, described.split, described.spans, as_recorded(options.tokenizer or options.model)


def remove_attention(options: AnalysisOptions, model, sequences) -> tuple:
    """The model with attention removed as asked, the removed blocks, and how they were chosen
    (reffuse.method.pipeline.choose_attention_removal, scored on the analysis tokens)."""
    if options.drop_attention is None and options.drop_attention_count is None:
        return model, [], AttentionRemoval("none", "-")
    choice = choose_attention_removal(model, list(sequences), blocks=options.drop_attention,
                                      count=options.drop_attention_count, contiguous=True)
    how = choice.rule + ("" if choice.scores is None else ", by KL of removing each attention alone on the "
                                                          "analysis tokens")
    removal = AttentionRemoval(how, choice.blocks_text, choice.joint_kl, choice.scores)
    return drop_attention(model, choice.blocks), list(choice.blocks), removal


def analyze(options: AnalysisOptions) -> Analysis:
    """Everything analysis.json holds (see the module docstring)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model = load_model(options.model, dtype=options.dtype, device=options.device)
    check_window(options.window_blocks, len(model.blocks))
    ids, split, spans, tokenizer = analysis_tokens(options, model)
    model, removed, removal = remove_attention(options, model, ids)
    sequences = list(ids)

    total = block_evaluations_needed(model, len(sequences), GRANULARITIES)
    with Progress(f"measuring dependencies of {options.model}", total, "blocks") as bar:
        measured = dependency(model, sequences, exclude_sink=not options.include_sink, progress=bar.update)

    block_matrix = measured.matrices["block"]
    eligible = full_blocks(model) if options.greedy_blocks == "full" else None
    steps = greedy_windows(block_matrix, options.window_blocks, eligible=eligible)
    plan = propose_groups(model, measured.matrices["ffn"], options.max_group_size,
                          leave_out_last=not options.include_last, groups_per_run=options.groups_per_run)
    tokens = AnalysisTokens(split, spans, tokenizer, len(sequences), int(ids.shape[1]), int(ids.size),
                            measured.tokens_measured, not options.include_sink, ids.tolist())
    windows = window_statistics(block_matrix, options.window_blocks)
    return Analysis(
        AnalyzedModel(as_recorded(options.model), model.config.name, options.dtype, len(model.blocks),
                      layout(model).blocks),
        removed, removal, [list(r) for r in attention_free_runs(model)], tokens, DEFINITIONS,
        DependencyMatrices(measured.matrices["block"], measured.matrices["ffn"]),
        BlockMetrics(*([float(v) for v in values] for values in
                       (measured.cos_dist_x_fx, measured.norm_ratio, measured.cos_dist_h_x))),
        WindowStatistics(options.window_blocks, "block", tuple(windows)),
        GreedySelection("block", options.greedy_blocks, TIE_TOLERANCE, tuple(steps)),
        plan, measured.block_evaluations, time.perf_counter() - start, time.process_time() - cpu_start)
