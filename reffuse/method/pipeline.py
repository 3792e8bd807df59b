"""The steps `reffuse fuse`, `demo` and `experiments` share: text, attention removal, a fusion plan, calibration;
and `fuse_and_save`, the whole of `reffuse fuse`.

    texts = load_texts("smollm2", model, calibration_tokens=1024, held_out_tokens=512)
    removal = choose_attention_removal(model, texts.scoring(128), count=8, contiguous=True)
    removed = drop_attention(model, removal.blocks)
    plan, costs = plan_fusion(removed, texts.scoring(256), max_group_size=4)
    fused, fits = calibrated_fuse(removed, plan.groups, texts.calibration.ids)

Text. Everything fitted or chosen from data (removal scores, dependencies, calibration) reads the corpus'
calibration plays; quality is judged on the held-out play (reffuse.formats.corpus has the fixed split), and
`check_disjoint` asserts from the recorded spans that the two never share a character. The synthetic `tiny`
model has no tokenizer: it gets random token ids instead, from two different seeds, and every output says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.core.model import layout
from reffuse.formats.checkpoint import is_model_folder, save_model
from reffuse.formats.corpus import TokenWindows, WindowsRecord, calibration_windows, held_out_windows
from reffuse.errors import ReffuseError
from reffuse.options import FromArguments
from reffuse.method.metrics import block_evaluations_needed, dependency
from reffuse.core.model import Model
from reffuse.method.planning import Plan, propose_groups
from reffuse.method.predictors import PLANNER_PREDICTOR, neighbour_damage_matrix
from reffuse.evaluation.prefix import cache_prefix, kl_from_base
from reffuse.method.calibrate import (DEFAULT_RIDGE, DEFAULT_WEIGHTING, GroupCalibration, calibrated_fuse,
                                      check_calibration_tokens)
from reffuse.outputs import check_output_folder
from reffuse.progress import Progress, note
from reffuse.core.layout import (BlockLayout, attention_free_runs, attention_layers, blocks_from_json,
                                 blocks_to_json, format_layers)
from reffuse.method.removal import attention_scores, cheapest, cheapest_windows, check_layers, drop_attention
from reffuse.formats.registry import check_tokenizer, load_model, load_tokenizer

SYNTHETIC_SEEDS = {"calibration": 1, "held-out": 2, "training": 3}


def is_synthetic(model_name: str, model: Model) -> bool:
    """The synthetic tiny model (or a folder made from it): it has no tokenizer and no real text."""
    return str(model_name) in ("tiny", "synthetic-smollm2") or model.config.name.startswith(("tiny", "synthetic"))


def synthetic_windows(model: Model, split: str, window: int, n_tokens: int) -> TokenWindows:
    """Random token ids in windows, one seed per split, standing in for text on the synthetic model."""
    window = min(window, n_tokens)
    ids = np.random.default_rng(SYNTHETIC_SEEDS[split]).integers(0, model.config.vocab_size,
                                                                 (n_tokens // window, window))
    return TokenWindows(ids.astype(np.int64), (),
                        f"{split} (synthetic random token ids, seed {SYNTHETIC_SEEDS[split]})")


def check_disjoint(calibration: TokenWindows, held_out: TokenWindows) -> None:
    """Refuse calibration text that shares a character of a play with held-out text (from the recorded spans)."""
    for a in calibration.spans:
        for b in held_out.spans:
            if a.play == b.play and a.start < b.end and b.start < a.end:
                raise ReffuseError(f"calibration text ({a.play} characters {a.start}-{a.end}) overlaps held-out "
                                   f"text (characters {b.start}-{b.end}): results would be judged on fitted text")


@dataclass(frozen=True)
class TextsRecord:
    """Calibration and held-out text as a result records them (Texts.describe), and why they are disjoint."""
    synthetic: bool
    calibration: WindowsRecord
    held_out: WindowsRecord
    disjoint: str

    def to_json(self) -> dict:
        return {"synthetic": self.synthetic, "calibration": self.calibration.to_json(),
                "held_out": self.held_out.to_json(), "disjoint": self.disjoint}

    @classmethod
    def from_json(cls, raw: dict) -> TextsRecord:
        return cls(raw["synthetic"], WindowsRecord.from_json(raw["calibration"]),
                   WindowsRecord.from_json(raw["held_out"]), raw["disjoint"])


@dataclass
class Texts:
    """Calibration and held-out token windows of one model, disjoint."""
    tokenizer: object | None  # reffuse.formats.tokenizer.Tokenizer, None for the synthetic model
    model: Model
    synthetic: bool
    window: int
    calibration: TokenWindows
    held_out: TokenWindows

    def scoring(self, n_tokens: int, window: int | None = None) -> TokenWindows:
        """A few short windows of the calibration text (for removal scores and dependencies): the first `window`
        tokens of calibration windows spread evenly over it, so that they read the plays' dialogue rather than
        only the list of characters each play opens with."""
        window = min(window or self.window, n_tokens, self.calibration.window)
        count = n_tokens // window
        available = len(self.calibration)
        if count > available:
            raise ReffuseError(f"{n_tokens} scoring tokens in windows of {window} need {count} calibration windows, "
                               f"but there are {available}: ask for fewer scoring tokens or more calibration tokens")
        chosen = [int((i + 0.5) * available / count) for i in range(count)]  # evenly spread, away from the start
        ids = self.calibration.ids[chosen, :window]                          # [count, window]
        split = (f"{self.calibration.split}: the first {window} tokens of windows {', '.join(map(str, chosen))} "
                 f"of {available}")
        return TokenWindows(ids, self.calibration.spans, split)

    def calibration_tokens(self, n_tokens: int) -> TokenWindows:
        """The first n_tokens of the calibration split in windows of self.window (self.calibration is their
        beginning when n_tokens is at least as many)."""
        if self.synthetic:
            return synthetic_windows(self.model, "calibration", self.window, n_tokens)
        return calibration_windows(self.tokenizer, self.window, n_tokens)

    def describe(self) -> TextsRecord:
        return TextsRecord(self.synthetic, self.calibration.describe(), self.held_out.describe(),
                           "synthetic ids from different seeds" if self.synthetic else
                           "different plays of the fixed split (reffuse.formats.corpus), checked from the spans")


@dataclass(frozen=True)
class RemovalChoice:
    """The attention removed and why (choose_attention_removal): single-removal scores (None where the blocks were
    given), their sum over the choice, and its KL measured jointly; only the blocks and the rule where nothing was
    scored (blocks given without text)."""
    blocks: tuple[int, ...]
    blocks_text: str
    rule: str
    score: str | None = None                   # what a score measures
    scores: dict[int, float] | None = None     # block -> KL of removing its attention alone
    summed_score: float | None = None
    joint_kl: float | None = None              # KL of removing them all at once, nats
    scoring_tokens: int | None = None
    scoring_text: str | None = None

    def to_json(self) -> dict:
        raw = {"blocks": list(self.blocks), "blocks_text": self.blocks_text, "rule": self.rule}
        if self.joint_kl is None:
            return raw
        return raw | {"score": self.score,
                      "scores": None if self.scores is None else {str(b): kl for b, kl in self.scores.items()},
                      "summed_score": self.summed_score, "joint_kl": self.joint_kl,
                      "scoring_tokens": self.scoring_tokens, "scoring_text": self.scoring_text}

    @classmethod
    def from_json(cls, raw: dict) -> RemovalChoice:
        scores = raw.get("scores")
        return cls(tuple(raw["blocks"]), raw["blocks_text"], raw["rule"], raw.get("score"),
                   None if scores is None else {int(b): kl for b, kl in scores.items()}, raw.get("summed_score"),
                   raw.get("joint_kl"), raw.get("scoring_tokens"), raw.get("scoring_text"))


def load_texts(model_name: str, model: Model, calibration_tokens: int, held_out_tokens: int, window: int = 256,
               tokenizer=None) -> Texts:
    """Calibration and held-out windows for `model`, tokenised by its own tokenizer (or `tokenizer`); windows of
    `window` tokens, or of the model's context length where that is shorter (past it, RoPE still computes, but
    not what the model knows)."""
    window = min(window, model.config.max_positions or window)
    if is_synthetic(model_name, model):
        return Texts(None, model, True, window, synthetic_windows(model, "calibration", window, calibration_tokens),
                     synthetic_windows(model, "held-out", window, held_out_tokens))
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name)
    check_tokenizer(tokenizer, model, model_name)
    calibration = calibration_windows(tokenizer, window, calibration_tokens)
    held_out = held_out_windows(tokenizer, window, held_out_tokens)
    check_disjoint(calibration, held_out)
    return Texts(tokenizer, model, False, window, calibration, held_out)


def choose_attention_removal(model: Model, windows, blocks=None, count: int | None = None,
                             contiguous: bool = False, rank: int = 1) -> RemovalChoice:
    """Which attentions to remove: `blocks` as given, or the `count` cheapest by single-removal KL score
    (reffuse.method.removal), as a contiguous window of least summed score when `contiguous` (the rank-th least
    with `rank`: 1 the cheapest, 2 the next, ...).

    Returns the blocks, every score, the summed score of the choice, and its KL measured jointly (all removed at
    once) on the same windows, which shows how far the sum of single scores is from the real damage.
    """
    if (blocks is None) == (count is None):
        raise ReffuseError("give either the blocks whose attention to remove or how many to remove (not both)")
    text = windows.split if isinstance(windows, TokenWindows) else "token ids given"
    windows = list(windows)
    prefix = cache_prefix(model, windows)
    scores = None
    if blocks is None:
        candidates = attention_layers(model)
        with Progress("scoring attention removal", len(candidates), "blocks") as bar:
            scores = attention_scores(model, windows, prefix=prefix, progress=bar.update)
        if contiguous:
            blocks = cheapest_windows(scores, count, rank)[rank - 1]
            rule = (f"the {count} consecutive blocks with the least summed single-removal score" if rank == 1 else
                    f"the {count} consecutive blocks with the {ordinal(rank)} least summed single-removal score")
        else:
            blocks = cheapest(scores, count)
            rule = f"the {count} blocks with the lowest single-removal scores"
    else:
        blocks = check_layers(model, blocks, "attention to remove")
        rule = "given"
    removed = drop_attention(model, blocks)
    return RemovalChoice(tuple(blocks), format_layers(blocks), rule,
                         "mean KL(base || base without this block's attention) over calibration predictions, nats",
                         dict(scores) if scores else None, sum(scores[b] for b in blocks) if scores else None,
                         kl_from_base(prefix, removed, min(blocks)), int(sum(len(w) for w in windows)), text)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


SCORING_WINDOW = 128      # tokens per window of the attention-removal scores
DEPENDENCY_WINDOW = 64    # tokens per window of the dependency matrices


def remove_attention(model: Model, texts: Texts | None, blocks=None, count: int | None = None,
                     scoring_tokens: int = 256) -> tuple[Model, RemovalChoice | None]:
    """The attention removal `fuse` and `demo` share: `blocks` as given, or the `count` consecutive blocks whose
    single removals cost least in sum, scored on `scoring_tokens` of calibration text; neither: nothing removed.
    Returns the model and what was removed and why (None for nothing)."""
    if blocks is None and count is None:
        return model, None
    if texts is None:  # blocks as given, nothing to score them on
        blocks = check_layers(model, blocks, "attention to remove")
        return drop_attention(model, blocks), RemovalChoice(tuple(blocks), format_layers(blocks), "given")
    removal = choose_attention_removal(model, texts.scoring(scoring_tokens, SCORING_WINDOW), blocks=blocks,
                                       count=count, contiguous=True)
    return drop_attention(model, removal.blocks), removal


def ffn_dependency(model: Model, windows, up_to: int | None = None, sink_only: bool = False) -> np.ndarray:
    """The FFN-level dependency matrix M [m, m] (reffuse.method.metrics), measured on blocks 0..up_to only.

    Skipping block i changes nothing before it, and a plan only needs M inside the attention-free runs, so the
    blocks after the last run's end (`up_to`) need not run: M is measured on the truncated model and the rows
    and columns beyond it are NaN. sink_only: on the first token of each window alone (reffuse.method.metrics).
    """
    m = len(model.blocks)
    up_to = m - 1 if up_to is None else up_to
    truncated = dataclasses.replace(model, blocks=model.blocks[:up_to + 1])
    windows = list(windows)
    total = block_evaluations_needed(truncated, len(windows), ("ffn",))
    with Progress("measuring FFN dependencies", total, "block evaluations") as bar:
        measured = dependency(truncated, windows, granularities=("ffn",), progress=bar.update, sink_only=sink_only)
    M = np.full((m, m), np.nan)
    M[:up_to + 1, :up_to + 1] = measured.matrices["ffn"]
    return M


def plan_fusion(model: Model, windows, max_group_size: int | None = 4, leave_out_last: bool = True):
    """Fusion groups inside the model's attention-free runs, cut where the neighbour damage (each adjacent pair's
    KL when fused alone, measured on `windows`) is least (reffuse.method.planning); returns the Plan and its cost
    matrix."""
    runs = attention_free_runs(model)
    if not runs:
        raise ReffuseError("the model has no run of 2 or more attention-free blocks to fuse: remove attention first "
                           "(--drop-attention or --drop-attention-count)")
    spans = [(first, last - 1 if leave_out_last else last) for first, last in runs]  # what the plan may fuse
    prefix = cache_prefix(model, windows)
    note(f"the plan: each of {sum(last - first for first, last in spans)} adjacent FFN pairs fused alone, scored on "
         f"{prefix.predictions} calibration predictions")
    C = neighbour_damage_matrix(model, prefix, spans)
    return propose_groups(model, C, max_group_size=max_group_size, leave_out_last=leave_out_last,
                          predictor=PLANNER_PREDICTOR), C


PROVENANCE_FILE = "fuse.json"  # beside a fused model: every choice, score and text span that made it


@dataclass
class FuseOptions(FromArguments):
    """What `reffuse fuse` takes (its --help says what each means)."""
    model: str
    out: str
    groups: list | None = None
    plan: str | None = None
    drop_attention: list | None = None
    drop_attention_count: int | None = None
    max_group_size: int = 4
    include_last: bool = False
    norm: str = "fold"
    calibrate: bool = False
    weighting: str = DEFAULT_WEIGHTING
    ridge: float = DEFAULT_RIDGE
    calibration_tokens: int = 2048
    scoring_tokens: int = 256
    overwrite: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class FuseRecord:
    """What fuse.json records beside a fused model (fuse_and_save): every choice, score and text span that made
    it. Each step left out is None (and a plan absent unless --plan)."""
    model: str                                     # as given (--model)
    model_name: str                                # its config name
    norm: str                                      # how norm gains were fused (reffuse.core.fusion.NORM_MODES)
    texts: TextsRecord | None                      # None where no text was needed
    attention_removal: RemovalChoice | None
    groups: tuple[tuple[int, int], ...]            # the runs fused, (first, last) before fusion
    calibration: tuple[GroupCalibration, ...] | None
    layout: tuple[BlockLayout, ...]                # the fused model's blocks
    plan: Plan | None = None                       # --plan auto: how the groups were chosen

    def to_json(self) -> dict:
        raw = {"model": self.model, "model_name": self.model_name, "norm": self.norm,
               "texts": None if self.texts is None else self.texts.to_json(),
               "attention_removal": None if self.attention_removal is None else self.attention_removal.to_json()}
        if self.plan is not None:
            raw["plan"] = self.plan.to_json()
        return raw | {"groups": [list(g) for g in self.groups],
                      "calibration": None if self.calibration is None else [f.as_dict() for f in self.calibration],
                      "layout": blocks_to_json(self.layout)}

    @classmethod
    def from_json(cls, raw: dict) -> FuseRecord:
        texts, removal, fits, plan = raw["texts"], raw["attention_removal"], raw["calibration"], raw.get("plan")
        return cls(raw["model"], raw["model_name"], raw["norm"],
                   None if texts is None else TextsRecord.from_json(texts),
                   None if removal is None else RemovalChoice.from_json(removal), tuple(map(tuple, raw["groups"])),
                   None if fits is None else tuple(GroupCalibration.from_dict(f) for f in fits),
                   blocks_from_json(raw["layout"], PROVENANCE_FILE), None if plan is None else Plan.from_json(plan))


def fuse_and_save(options: FuseOptions) -> FuseRecord:
    """Every step of `reffuse fuse` (its --help lists them), the model saved to `options.out` with its tokenizer
    and fuse.json; returns what fuse.json records."""
    out = check_output_folder(options.out, options.overwrite, is_model_folder, "model")  # before any long work
    model = load_model(options.model, device=options.device)
    needs_text = options.drop_attention_count is not None or options.plan or options.calibrate
    texts = load_texts(options.model, model, options.calibration_tokens, 256) if needs_text else None
    if options.calibrate:
        check_calibration_tokens(texts.calibration.ids.size)
    model, removal = remove_attention(model, texts, options.drop_attention, options.drop_attention_count,
                                      options.scoring_tokens)

    plan = None
    if options.plan:
        plan, _ = plan_fusion(model, texts.scoring(options.scoring_tokens, SCORING_WINDOW), options.max_group_size,
                              leave_out_last=not options.include_last)
        if not plan.groups:
            raise ReffuseError("the plan has no group to fuse (runs too short): remove more attention")
    groups = plan.groups if plan is not None else options.groups

    fits = None
    if options.calibrate:
        with Progress("calibrating fused groups", len(groups), "groups") as bar:
            fused, fits = calibrated_fuse(model, groups, texts.calibration.ids, norm=options.norm, ridge=options.ridge,
                                          progress=bar.update, weighting=options.weighting)
    else:
        fused = fuse(model, groups, norm=options.norm)

    tokenizer = texts.tokenizer if texts is not None else None
    if tokenizer is None and not is_synthetic(options.model, model):
        try:
            tokenizer = load_tokenizer(options.model)
        except ReffuseError as e:
            note(f"no tokenizer saved beside the model: {e}")
    record = FuseRecord(options.model, model.config.name, options.norm, texts.describe() if texts else None, removal,
                        tuple(tuple(g) for g in groups), None if fits is None else tuple(fits), layout(fused).blocks,
                        plan)
    save_model(fused, out, options.overwrite, tokenizer,
               {PROVENANCE_FILE: json.dumps(record.to_json(), indent=1) + "\n"})
    note(f"saved {out} ({len(fused.blocks)} blocks)")
    return record
