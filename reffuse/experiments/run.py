"""The paper's experiments (its §4-5, App. B) at small scale, on one model with an attention-removed region.

Setup. The region: attention is removed from the `drop_count` consecutive blocks whose single removals cost
least (reffuse.method.removal, scored on calibration text); the longest attention-free run of the result, [a, b], is
the run studied (on SmolLM2, whose blocks all have attention, it is exactly the removed region). The model with
that attention removed is the "pre-fusion" model, the paper's PreFusion: every fusion experiment below is
judged against it, by KL(pre-fusion || variant) of the next-token distributions on held-out text, by
perplexity, and by top-1 agreement; the same against the original model is recorded too. The paper's
accuracy benchmarks (MMLU, MT-Bench) have no counterpart at 135M parameters: KL and perplexity are the proxy
(KL of the logits is reffuse's choice of proxy). The span fused is the run without its last block, [a, b-1], as in the paper.

(a) fusion intensity: the span as k sequential FFN steps, k = ceil(L/2) .. 1 (L = b - a blocks), cut where
    the least FFN-level dependency is left inside the groups (reffuse.method.planning), plain fusion, norm "fold";
(b) FFN removal vs fusion at equal depth reduction: removing the L - k least important FFNs of the span (by the
    KL of removing each alone, on calibration text) against fusing the span into k steps; decode latency of
    every model in the same run, in alternation (reffuse.speed.bench.time_decode);
(c) the last FFN: fusing [a, b-1] vs [a+1, b] vs [a, b] (one group each);
(d) reversed order: the blocks of a span run sequentially in reverse order, against fusing them;
(e) full-block parallelization: the paper's greedy selection (reffuse.method.metrics.greedy_windows) of windows of 4
    blocks that have both attention and an FFN, on the block-level dependency matrix of the pre-fusion model,
    1 to 4 steps, each window run as x + Σ_j h_j(x) with h_j(x) = f_j(x) - x the whole block's update. This
    combination rule is [INF]: the paper does not write it down (its App. B); it is eq. 5 for whole blocks;
(f) norm "fold" (exact, each block's gain folded in) vs "last" (the paper's), at every k of (a);
(g) calibrated vs plain fusion at every k of (a) (reffuse.method.calibrate), the token weighting and ridge chosen by
    a sweep judged on a validation part of the calibration text (never on held-out text), then refitted on all
    of it.

Variants are scored from cached prefix streams (reffuse.evaluation.prefix): the blocks before the first change never run
twice. Each finding gets a verdict against the paper's observation, by a rule stated in `verdicts`.
"""

from __future__ import annotations

import math
import os
import platform
import time

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.fusion import fuse
from reffuse.core.layout import attention_free_runs, full_blocks, original_layers
from reffuse.core.model import Model, forward, layout
from reffuse.errors import ReffuseError
from reffuse.evaluation.prefix import cache_prefix, score_variant
from reffuse.experiments.verdicts import DEFINITIONS, MAX_STEPS, WINDOW, groups_text, verdicts
from reffuse.formats.registry import load_model
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS, calibrated_fuse
from reffuse.method.metrics import (block_evaluations_needed, dependency, greedy_windows, matrix_to_json,
                                    window_statistics)
from reffuse.method.pipeline import choose_attention_removal, ffn_dependency, load_texts
from reffuse.method.planning import propose_groups
from reffuse.method.removal import cheapest, drop_attention, drop_ffns, ffn_scores
from reffuse.progress import Progress, note
from reffuse.speed.bench import prompt_ids, reffuse_decode, time_decode
from reffuse.speed.timing import blas_threads

RIDGE_SWEEP = (0.1, 1.0, 10.0)


# ---------------------------------------------------------------------------------------------------------------
# Variants of a model


def reversed_run(model: Model, first: int, last: int) -> Model:
    """Blocks first..last in reverse order (attention-free blocks hold no position-dependent state)."""
    blocks = list(model.blocks)
    blocks[first:last + 1] = blocks[first:last + 1][::-1]
    return Model(model.config, model.embed, blocks, model.norm_gain, model.lm_head)


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


def _scores(prefix, variant, first, reference, sink_layer):
    s = score_variant(prefix, variant, first, reference=reference)
    return {"kl": s["kl_from_base"], "perplexity": s["perplexity"], "top1": s["top1_agreement"],
            "kl_vs_original": s["kl_from_reference"], "top1_vs_original": s["top1_agreement_reference"],
            "sink_norm": sink_norm(variant, int(prefix.windows[0][0]), sink_layer)}


def rank_correlation(a, b) -> float | None:
    """Spearman's rank correlation of two equally long sequences (None for fewer than 3 values)."""
    if len(a) < 3:
        return None
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_experiments(model_name: str = "smollm2", drop_count: int = 8, held_out_tokens: int = 2048,
                    calibration_tokens: int = 2048, scoring_tokens: int = 256, dependency_tokens: int = 128,
                    window: int = 256, decode_tokens: int = 32, repeats: int = 5, threads: int | None = None) -> dict:
    """Every experiment of the module docstring; a JSON-ready dict."""
    started = time.perf_counter()
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    result = {"model": model_name, "definitions": DEFINITIONS,
              "environment": {"machine": platform.machine(), "cores": os.cpu_count(), "threads": threads,
                              "python": platform.python_version(), "numpy": np.__version__,
                              "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
              "settings": {"drop_count": drop_count, "held_out_tokens": held_out_tokens,
                           "calibration_tokens": calibration_tokens, "scoring_tokens": scoring_tokens,
                           "dependency_tokens": dependency_tokens, "window": window, "decode_tokens": decode_tokens,
                           "repeats": repeats}}
    with blas_threads(threads):
        original = load_model(model_name)
        result["model_name"] = original.config.name
        texts = load_texts(model_name, original, calibration_tokens, held_out_tokens, window)
        result["texts"] = texts.describe()

        note("[1/8] attention removal")
        removal = choose_attention_removal(original, texts.scoring(scoring_tokens, min(window, 128)), count=drop_count,
                                           contiguous=True)
        pre = drop_attention(original, removal["blocks"])
        runs = attention_free_runs(pre)
        a, b = max(runs, key=lambda run: (run[1] - run[0], -run[0]))  # the longest run (the removed region)
        span = (a, b - 1)
        length = span[1] - span[0] + 1
        if length < 2:
            raise ReffuseError(f"the longest attention-free run, {a}-{b}, leaves fewer than 2 FFNs to fuse once its "
                               "last block is left out: remove more attention (--drop-attention-count)")
        result.update(attention_removal=removal, region=[a, b], span=list(span),
                      layouts={"original": layout(original).rows(), "pre_fusion": layout(pre).rows()})

        note("[2/8] held-out references: the original and the pre-fusion model")
        original_prefix = cache_prefix(original, texts.held_out.ids)
        prefix = cache_prefix(pre, texts.held_out.ids)
        removed = score_variant(original_prefix, pre, removal["blocks"][0])
        result["original"] = {"perplexity": removed["base_perplexity"]}
        sink = int(texts.held_out.ids[0][0])
        result["sink"] = {"token": sink, "layer": b + 1,
                          "pre_fusion_norms": [sink_norm(pre, sink, layer) for layer in range(len(pre.blocks) + 1)]}
        result["pre_fusion"] = {"perplexity": removed["perplexity"], "kl_vs_original": removed["kl_from_base"],
                                "top1_vs_original": removed["top1_agreement"]}

        note("[3/8] FFN-level dependencies in the run")
        M = ffn_dependency(pre, texts.scoring(dependency_tokens, min(window, 64)), up_to=b)
        result["ffn_dependency"] = {"matrix": matrix_to_json(M[a:b + 1, a:b + 1]), "blocks": [a, b],
                                    "tokens": dependency_tokens}

        counts = sorted({math.ceil(length / 2), *range(1, math.ceil(length / 2) + 1)}, reverse=True)
        plans = {k: propose_groups(pre, M, groups_per_run=k, runs=[(a, b)]).groups for k in counts}
        note(f"[4/8] (a, f) fusion intensity: span {span[0]}-{span[1]} into {', '.join(map(str, counts))} steps, "
             "fold and last")
        intensity = []
        with Progress("fusion variants", 2 * len(counts), "models") as bar:
            for k in counts:
                row = {"steps": k, "groups": [list(g) for g in plans[k]], "groups_text": groups_text(plans[k]),
                       "depth_reduction": length - k}
                for norm in ("fold", "last"):
                    row[norm] = _scores(prefix, fuse(pre, plans[k], norm=norm), a, original_prefix, b + 1)
                    bar.update()
                intensity.append(row)

        note("[5/8] (g) calibrated fusion: weighting and ridge chosen on validation calibration text, then every k")
        fit_windows, validation_windows = texts.calibration.ids[:-2], texts.calibration.ids[-2:]
        validation = cache_prefix(pre, validation_windows)
        plain_validation = {k: score_variant(validation, fuse(pre, plans[k]), a, kl_only=True)["kl_from_base"]
                            for k in counts}
        sweep = []
        with Progress("calibration sweep", len(WEIGHTINGS) * len(RIDGE_SWEEP) * len(counts), "fits") as bar:
            for weighting in WEIGHTINGS:
                for ridge in RIDGE_SWEEP:
                    ratios = {}
                    for k in counts:
                        calibrated, _ = calibrated_fuse(pre, plans[k], fit_windows, ridge=ridge, weighting=weighting)
                        kl = score_variant(validation, calibrated, a, kl_only=True)["kl_from_base"]
                        ratios[k] = kl / plain_validation[k]
                        bar.update()
                    sweep.append({"weighting": weighting, "ridge": ridge, "kl_ratio": {str(k): v for k, v in
                                                                                        ratios.items()},
                                  "geometric_mean_ratio": float(np.exp(np.mean(np.log(list(ratios.values())))))})
        best = min(sweep, key=lambda r: r["geometric_mean_ratio"])
        ridge, weighting = best["ridge"], best["weighting"]
        with Progress("calibrated variants", len(counts), "models") as bar:
            for row in intensity:
                calibrated, fits = calibrated_fuse(pre, [tuple(g) for g in row["groups"]], texts.calibration.ids,
                                                   ridge=ridge, weighting=weighting)
                row["calibrated"] = _scores(prefix, calibrated, a, original_prefix, b + 1)
                row["calibration_fits"] = [f.as_dict() for f in fits]
                bar.update()
        result["calibration"] = {"sweep": sweep, "plain_validation_kl": {str(k): v for k, v in
                                                                          plain_validation.items()},
                                 "ridge": ridge, "weighting": weighting, "default_ridge": DEFAULT_RIDGE,
                                 "default_weighting": DEFAULT_WEIGHTING, "fit_tokens": int(fit_windows.size),
                                 "validation_tokens": int(validation_windows.size),
                                 "tokens": int(texts.calibration.ids.size)}
        result["intensity"] = intensity

        note("[6/8] (b) FFN removal at equal depth reduction")
        importance = ffn_scores(pre, texts.scoring(scoring_tokens, min(window, 128)),
                                layers=range(span[0], span[1] + 1))
        removal_rows = []
        for row in intensity:
            dropped = cheapest(importance, row["depth_reduction"])
            variant = drop_ffns(pre, dropped)
            removal_rows.append({"depth_reduction": row["depth_reduction"], "removed": dropped,
                                 **_scores(prefix, variant, a, original_prefix, b + 1)})
        result["removal"] = {"ffn_scores": {str(k): v for k, v in importance.items()}, "rows": removal_rows}

        note("[7/8] (c) last FFN, (d) reversed order, (e) full-block parallelization")
        last_rows = []
        for label, group in [("leave out the last FFN", (a, b - 1)), ("leave out the first FFN", (a + 1, b)),
                             ("the whole run, last FFN included", (a, b))]:
            last_rows.append({"label": label, "group": list(group),
                              **_scores(prefix, fuse(pre, [group]), a, original_prefix, b + 1)})
        result["last_ffn"] = last_rows

        half = min(4, length)
        reverse_spans = sorted({(span[0], span[0] + half - 1), (span[1] - half + 1, span[1]), span})
        reverse_rows = []
        for first, last in reverse_spans:
            reverse_rows.append({"span": [first, last],
                                 "fused": _scores(prefix, fuse(pre, [(first, last)]), first, original_prefix, b + 1),
                                 "reversed": _scores(prefix, reversed_run(pre, first, last), first, original_prefix,
                                                     b + 1)})
        result["reversed"] = reverse_rows

        eligible = full_blocks(pre)
        block_windows = texts.scoring(dependency_tokens, min(window, 64))
        with Progress("block-level dependencies", block_evaluations_needed(pre, len(block_windows), ("block",)),
                      "block evaluations") as bar:
            block_M = dependency(pre, list(block_windows), granularities=("block",),
                                 progress=bar.update).matrices["block"]
        steps = greedy_windows(block_M, WINDOW, eligible=eligible, max_steps=MAX_STEPS)
        full_rows = []
        for n in range(1, len(steps) + 1):
            chosen = [(s["first"], s["last"]) for s in steps[:n]]
            first = min(s for s, _ in chosen)
            scores = score_variant(prefix, pre, first, reference=original_prefix, parallel=chosen, whole_blocks=True)
            full_rows.append({"steps": n, "windows": [list(w) for w in chosen], "windows_text": groups_text(chosen),
                              "kl": scores["kl_from_base"], "perplexity": scores["perplexity"],
                              "top1": scores["top1_agreement"], "kl_vs_original": scores["kl_from_reference"]})
        # Does M predict the damage? Every eligible window alone, on the first two held-out windows.
        scan = cache_prefix(pre, texts.held_out.ids[:2])
        candidates = [w for w in window_statistics(block_M, WINDOW)
                      if math.isfinite(w["max"]) and all(eligible[w["first"]:w["last"] + 1])]
        single = []
        with Progress("full-block windows one at a time", len(candidates), "windows") as bar:
            for w in candidates:
                s0, e0 = w["first"], w["last"]
                kl = score_variant(scan, pre, s0, kl_only=True, parallel=[(s0, e0)], whole_blocks=True)["kl_from_base"]
                single.append({"first": s0, "last": e0, "max": w["max"], "sum": w["sum"], "kl": kl})
                bar.update()
        result["full_block"] = {"window": WINDOW, "greedy": steps, "rows": full_rows,
                                "matrix": matrix_to_json(block_M), "tokens": dependency_tokens,
                                "eligible_blocks": [i for i, e in enumerate(eligible) if e],
                                "single_windows": single, "single_window_tokens": int(texts.held_out.ids[:2].size),
                                "rank_correlation_max_kl": rank_correlation([w["max"] for w in single],
                                                                            [w["kl"] for w in single])}

        note(f"[8/8] decode latency of {2 + 2 * len(counts)} models, in alternation")
        models = {"original": original, "pre-fusion": pre}
        for row in intensity:
            models[f"fused, {row['steps']} steps"] = fuse(pre, [tuple(g) for g in row["groups"]])
        for row in removal_rows:
            models[f"{row['depth_reduction']} FFNs removed"] = drop_ffns(pre, row["removed"])
        prompt = prompt_ids(original, 32)
        seconds, _ = time_decode({name: (lambda p, n, m=m: reffuse_decode(m, p, n)) for name, m in models.items()},
                                 prompt, decode_tokens, repeats)
        result["decode"] = {name: {"ms_per_token": 1e3 * s / decode_tokens, "tokens_per_second": decode_tokens / s}
                            for name, s in seconds.items()}
    result["environment"]["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["seconds"] = time.perf_counter() - started
    result["verdicts"] = verdicts(result)
    return result
