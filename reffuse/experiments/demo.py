"""The whole FFN Fusion pipeline on one model, as `reffuse demo` runs it (see that command's help for the steps).

1. text: calibration and held-out windows from disjoint plays (reffuse.method.pipeline.load_texts);
2. attention removal, standing in for Puzzle (reffuse.method.removal);
3. the FFN-level dependencies in the attention-free run, and a fusion plan from the damage of fusing each adjacent
   pair of FFNs (reffuse.method.planning);
4. fusion (Theorem 3.1) and its exactness; the approximation it makes, sequential vs parallel;
5. calibration of the fused down-projections (reffuse.method.calibrate);
6. healing: a short knowledge distillation of the fused blocks from the original (reffuse.training; `reffuse heal`
   runs it at a larger budget);
7. quality on held-out text (left out for a synthetic model, whose random weights read random ids: there it
   would measure nothing); 8. speed, all models in one run, and a greedy sample from each.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from reffuse.core.fusion import fuse, with_last_norm
from reffuse.core.generate import generate
from reffuse.core.layout import attention_free_runs, original_layers
from reffuse.core.model import Model, cast, forward, layout
from reffuse.core.names import named_weights
from reffuse.errors import ReffuseError
from reffuse.options import FromArguments
from reffuse.evaluation.prefix import cache_prefix, score_variant
from reffuse.experiments.demo_result import (CALIBRATED, FUSED, HEALED, ORIGINAL, REMOVED, DecodeSpeed, DemoResult,
                                             Exactness, FfnDependency, GapClosed, Healing, HeldOutQuality,
                                             LayoutChange, ModelQuality, RegionRow, RegionTime, Samples,
                                             SequentialVsParallel, Speed)
from reffuse.formats.corpus import training_windows
from reffuse.formats.registry import load_model
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, calibrated_fuse, check_calibration_tokens
from reffuse.method.metrics import matrix_to_json
from reffuse.method.pipeline import (DEPENDENCY_WINDOW, SCORING_WINDOW, ffn_dependency, is_synthetic, load_texts,
                                     plan_fusion, remove_attention, synthetic_windows)
from reffuse.progress import Progress, note
from reffuse.records import as_tuple
from reffuse.training.trainer import TrainingOptions, train, trainable_names
from reffuse.speed.bench import decode_samples, reffuse_decode
from reffuse.speed.timing import blas_threads, time_region
from reffuse.stats import paired_ratio

DEFAULT_DROP = {"smollm2": 8, "tiny": 2}
EXACTNESS_TOKENS = 64  # of the first held-out window: fused vs parallel compared on them
PROMPT = "The capital of France is"
STEPS = 8
# The demo's healing budget: short windows and few steps, a couple of minutes at most on 2 cores with SmolLM2.
HEALING_WINDOW = 64
HEALING_LEARNING_RATE = 3e-4
ONE_BLAS_THREAD_BELOW = 256  # model width (features) under which the demo runs BLAS on one thread


@dataclass
class DemoOptions(FromArguments):
    """What `reffuse demo` takes (its --help says what each means)."""
    model: str = "smollm2"
    drop_attention: list | None = None
    drop_attention_count: int | None = None
    groups: list | None = None
    max_group_size: int = 4
    norm: str = "fold"
    weighting: str = DEFAULT_WEIGHTING
    ridge: float = DEFAULT_RIDGE
    held_out_tokens: int = 2048
    calibration_tokens: int = 2048
    training_tokens: int = 4096
    scoring_tokens: int = 256
    dependency_tokens: int = 128
    decode_tokens: int = 16
    repeats: int = 7
    sample_tokens: int = 12
    prompt: str = PROMPT
    device: str = "cpu"


def relative_error(a, b) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def step(number: int, text: str) -> None:
    note(f"[{number}/{STEPS}] {text}")


def exactness(removed: Model, groups, norm: str, ids) -> Exactness:
    """Fused vs the parallel form (Theorem 3.1: equal) in float32 and float64, on the token ids `ids`."""
    errors = []
    for model in (removed, cast(removed, "float64")):
        reference = model if norm == "fold" else with_last_norm(model, groups)
        parallel = forward(reference, ids, parallel_groups=groups)
        errors.append(relative_error(forward(fuse(model, groups, norm=norm), ids), parallel))
    return Exactness(*errors, int(len(ids)))


def timed(original, seconds) -> tuple[float, float, tuple | None]:
    """A model's timed runs against the original's, repeat by repeat: the median time, and the speedup original /
    model, the ratio of the two medians with the 95% interval of the paired repeats (reffuse.stats.paired_ratio;
    > 1: faster than the original)."""
    speedup = paired_ratio(original, seconds)
    return statistics.median(seconds), speedup.median, as_tuple(speedup.interval_95)


def decode_speed(original, seconds, tokens_per_run: int) -> DecodeSpeed:
    median, speedup, interval = timed(original, seconds)
    return DecodeSpeed(tokens_per_run / median, 1e3 * median / tokens_per_run, speedup, interval)


def region_time(original, seconds) -> RegionTime:
    median, speedup, interval = timed(original, seconds)
    return RegionTime(1e3 * median, speedup, interval)


def layout_changes(original: Model, fused: Model) -> list[LayoutChange]:
    """The blocks of the fused model that differ from the layers they stand for in the original: fused, or their
    attention removed. Each with the original layers, their attention and FFN widths, and its own."""
    before = layout(original).blocks
    changes = []
    for index, (block, layers) in enumerate(zip(layout(fused).blocks, original_layers(fused))):
        was = [before[i] for i in layers]
        if len(layers) > 1 or any(b.attention != block.attention or b.ffn_width != block.ffn_width for b in was):
            changes.append(LayoutChange(index, tuple(layers), block.attention, block.ffn_width,
                                        tuple(b.attention for b in was), tuple(b.ffn_width for b in was)))
    return changes


def gap_closed(plain: float, better: float, reference: float) -> float | None:
    """The share of the gap from `reference` up to `plain` that `better` closes, (plain - better) / (plain -
    reference); None without a gap."""
    return (plain - better) / (plain - reference) if plain != reference else None


def samples(models: dict, tokenizer, prompt: str, tokens: int, vocab: int) -> Samples:
    """A greedy continuation of the prompt from each model (token ids for the synthetic model)."""
    ids = tokenizer.encode(prompt) if tokenizer else list(np.random.default_rng(3).integers(0, vocab, 8))
    continuations = {}
    for name, model in models.items():
        new = generate(model, ids, tokens)
        continuations[name] = tokenizer.decode(new) if tokenizer else [int(i) for i in new]
    return Samples(prompt if tokenizer else [int(i) for i in ids], continuations)


def heal_fused_blocks(original: Model, fused: Model, texts, options: DemoOptions) -> tuple[Model, Healing]:
    """The fused blocks trained by distillation from the original on --training-tokens of training text, in
    windows of HEALING_WINDOW tokens, one per step."""
    if texts.synthetic:
        windows = synthetic_windows(original, "training", HEALING_WINDOW, options.training_tokens)
    else:
        windows = training_windows(texts.tokenizer, HEALING_WINDOW, options.training_tokens)
    names = trainable_names(fused, "fused")
    steps = len(windows)
    training = TrainingOptions(steps=steps, learning_rate=HEALING_LEARNING_RATE, warmup=steps // 10)
    healed, log = train(fused, windows.ids, names, training, teacher=original, progress=False)
    weights = int(sum(named_weights(fused)[n].size for n in names))
    return healed, Healing(log.tokens, HEALING_WINDOW, steps, "fused blocks", weights, training, log.losses,
                           log.seconds, windows.describe())


def run_demo(options: DemoOptions) -> DemoResult:
    """Every step of the module docstring (the figures left to the command)."""
    started = time.perf_counter()
    count = options.drop_attention_count
    if options.drop_attention is None and count is None and options.groups is None:
        count = DEFAULT_DROP.get(options.model, DEFAULT_DROP["smollm2"])
    if count is not None and count < 1:
        raise ReffuseError(f"--drop-attention-count {count} must be at least 1")
    original = load_model(options.model, device=options.device)
    synthetic = is_synthetic(options.model, original)
    # In a model as narrow as tiny, a second BLAS thread only adds waiting, which on a busy machine grows to most of
    # the run; wider models keep the BLAS library's own choice.
    with blas_threads(1 if original.config.dim < ONE_BLAS_THREAD_BELOW else None):
        step(1, "text: calibration and held-out windows")
        texts = load_texts(options.model, original, options.calibration_tokens, options.held_out_tokens)
        check_calibration_tokens(texts.calibration.ids.size)

        step(2, "attention removal")
        removed, removal = remove_attention(original, texts, options.drop_attention, count, options.scoring_tokens)

        step(3, "dependencies and the fusion plan")
        if options.groups is not None:
            plan, groups = None, options.groups
        else:
            scoring = texts.scoring(options.scoring_tokens, SCORING_WINDOW)
            plan, _ = plan_fusion(removed, scoring, options.max_group_size)
            groups = plan.groups
            if not groups:
                raise ReffuseError("the plan has no group to fuse (the attention-free runs are too short): remove more "
                                   "attention (--drop-attention-count)")
        fused = fuse(removed, groups, norm=options.norm)  # checks the groups: clear errors before any long work
        region = next(r for r in attention_free_runs(removed) if r[0] <= groups[0][0] <= r[1])
        M = ffn_dependency(removed, texts.scoring(options.dependency_tokens, DEPENDENCY_WINDOW), up_to=region[1])
        dependency = FfnDependency(matrix_to_json(M), options.dependency_tokens)

        step(4, "fusion and its exactness")
        exact = exactness(removed, groups, options.norm, texts.held_out.ids[0][:EXACTNESS_TOKENS])

        step(5, "calibration of the fused down-projections")
        with Progress("calibrating fused groups", len(groups), "groups") as bar:
            calibrated, fits = calibrated_fuse(removed, groups, texts.calibration.ids, norm=options.norm,
                                               ridge=options.ridge, progress=bar.update, weighting=options.weighting)

        step(6, "healing: distillation of the fused blocks")
        healed, healing = heal_fused_blocks(original, fused, texts, options)

        models = {REMOVED: removed, FUSED: fused, CALIBRATED: calibrated, HEALED: healed}
        if synthetic:
            step(7, "quality on held-out text: left out (a synthetic model reads random ids)")
            quality, gap = None, None
        else:
            step(7, "quality on held-out text")
            first = min(removal.blocks[0], groups[0][0]) if removal else groups[0][0]
            quality, gap = held_out_quality(original, removed, models, texts, first)

        step(8, "speed (one run, in alternation) and greedy samples")
        speed_models = {ORIGINAL: original, REMOVED: removed, CALIBRATED: calibrated}
        prompt = texts.held_out.ids[0][:32]
        with Progress("timing decode", options.repeats * len(speed_models), "decodes") as bar:
            seconds, _ = decode_samples({name: (lambda p, n, m=m: reffuse_decode(m, p, n))
                                         for name, m in speed_models.items()}, prompt, options.decode_tokens,
                                        options.repeats, progress=bar.update)
        decode = {name: decode_speed(seconds[ORIGINAL], s, options.decode_tokens) for name, s in seconds.items()}
        region_rows = []
        for tokens in (1, 128):
            times = time_region(speed_models, region, tokens, options.repeats)
            region_rows.append(RegionRow(tokens, {name: region_time(times[ORIGINAL], t)
                                                  for name, t in times.items()}))
        speed = Speed(decode, options.decode_tokens, len(prompt),
                      os.getloadavg()[0] if hasattr(os, "getloadavg") else None, tuple(region), tuple(region_rows),
                      options.repeats)
        greedy = samples({ORIGINAL: original, **models}, texts.tokenizer, options.prompt, options.sample_tokens,
                         original.config.vocab_size)

    return DemoResult(model=options.model, model_name=original.config.name, synthetic=synthetic, norm=options.norm,
                      texts=texts.describe(), attention_removal=removal, plan=plan,
                      groups=tuple(tuple(g) for g in groups), region=tuple(region), ffn_dependency=dependency,
                      exactness=exact, layout_before=layout(original).rows(), layout_removed=layout(removed).rows(),
                      layout_after=layout(fused).rows(), layout_changes=tuple(layout_changes(original, fused)),
                      calibration=tuple(fits), healing=healing, quality=quality, sequential_vs_parallel=gap,
                      speed=speed, samples=greedy, seconds=time.perf_counter() - started)


def held_out_quality(original: Model, removed: Model, models: dict, texts,
                     first: int) -> tuple[HeldOutQuality, SequentialVsParallel]:
    """Perplexity, KL to the original and top-1 agreement of every model on the held-out text, the blocks before
    `first` run once (reffuse.evaluation.prefix); the share of the fusion gap that calibration and healing close;
    and the approximation that fusion makes, sequential vs parallel."""
    with Progress("scoring on held-out text", 2 + len(models), "models") as bar:
        judge = cache_prefix(original, texts.held_out.ids)
        bar.update()
        before_fusion = cache_prefix(removed, texts.held_out.ids)
        bar.update()
        quality = {ORIGINAL: ModelQuality(score_variant(judge, original, len(original.blocks)).perplexity)}
        for name, model in models.items():
            s = score_variant(judge, model, first, reference=before_fusion)
            quality[name] = ModelQuality(s.perplexity, s.kl_from_base, s.top1_agreement,
                                         s.kl_from_reference if model is not removed else 0.0,
                                         s.top1_agreement_reference if model is not removed else 1.0)
            bar.update()
    plain, unfused = quality[FUSED], quality[REMOVED]

    def closes(name: str) -> GapClosed:
        return GapClosed(gap_closed(plain.kl_vs_attention_removed, quality[name].kl_vs_attention_removed, 0.0),
                         gap_closed(plain.perplexity, quality[name].perplexity, unfused.perplexity))

    beats = quality[CALIBRATED].kl_vs_original < plain.kl_vs_original
    # The fused model is the parallel form exactly, so its distance from the model it was fused from (attention
    # removed, blocks sequential) is what running the blocks in parallel costs.
    return (HeldOutQuality(quality, judge.predictions, closes(CALIBRATED), closes(HEALED), beats),
            SequentialVsParallel(plain.kl_vs_attention_removed, plain.top1_vs_attention_removed, judge.predictions))
