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
    every model in the same run, in alternation (reffuse.speed.bench.decode_samples);
(c) the last FFN: fusing [a, b-1] vs [a+1, b] vs [a, b] (one group each);
(d) reversed order: the blocks of a span run sequentially in reverse order, against fusing them;
(e) full-block parallelization: the paper's greedy selection (reffuse.method.metrics.greedy_windows) of windows of 4
    blocks that have both attention and an FFN, on the block-level dependency matrix of the pre-fusion model,
    1 to 4 steps, each window run as x + Σ_j h_j(x) with h_j(x) = f_j(x) - x the whole block's update. This
    combination rule is [INF]: the paper does not write it down (its App. B); it is eq. 5 for whole blocks;
(f) norm "fold" (exact, each block's gain folded in) vs "last" (the paper's), at every k of (a);
(g) calibrated vs plain fusion at every k of (a) (reffuse.method.calibrate), the token weighting and ridge chosen by
    a sweep judged on a validation part of the calibration text (never on held-out text), then refitted on all
    of it;
(h) which predictor ranks fusion damage: every contiguous group of the span fused alone, its KL on calibration
    text against the predictors of reffuse.method.predictors (cosine-M with and without the sink, neighbour
    damage, block influence, angular distance, the first-order error term), by rank correlation;
(i) FFN removal vs fusion at equal latency, as the paper compares them: every count of the span's FFNs removed,
    plain and refitted as calibrated fusion is (reffuse.method.calibrate.calibrated_removal); each fused model
    against the removal whose decode latency is nearest, modelled on a GPU by reffuse.speed.costmodel at the
    largest tensor-parallel degree up to 8 the heads allow, and measured on this CPU (15 repeats, quartiles);
(j) calibration at scale: the most-steps and the one-step plans calibrated on 2k, 8k and 32k calibration
    tokens, with each group's residual on its own tokens and on held-out text;
(k) the planner's predictor: where the neighbour damage and cosine-M cut the span differently, both plans on
    held-out text.

The plans of (a) come from reffuse's planner (reffuse.method.planning), which cuts the span where the neighbour
damage is least; the held-out text is 16384 tokens by default, dealt over eight plays and the Sonnets
(reffuse.formats.corpus), and the report gives the main variants' KL on each kind of text.

Variants are scored from cached prefix streams (reffuse.evaluation.prefix): the blocks before the first change never run
twice. Each finding is measured by its function in `findings`, beside the rule that gives its verdict against the
paper's observation; `study` holds what they all start from.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone

import numpy as np

from reffuse.experiments.findings import (calibration, calibration_scale, decode_latency, decoded_models, ffn_removal,
                                          full_block, fusion_intensity, last_ffn, modelled_latency,
                                          predictor_comparison, predictors_against_size, removal_counts,
                                          reversed_order, verdicts)
from reffuse.experiments.provenance import changes_since, provenance
from reffuse.experiments.study import DEFINITIONS, prepare_study, step
from reffuse.formats.registry import load_model
from reffuse.method.pipeline import load_texts
from reffuse.speed.timing import blas_threads


# The code that turns the numbers into verdicts: the report names the commit these files come from.
RULE_FILES = ("reffuse/experiments/findings.py", "reffuse/evaluation/intervals.py", "reffuse/stats.py")


# The code that shapes the numbers the rules judge: the corpus split, the attention removal, the planner, the
# predictors, calibration, scoring and fusion, and the measurements themselves. A run records their commit.
SETUP_FILES = ("reffuse/experiments/run.py", "reffuse/experiments/study.py", "reffuse/experiments/findings.py",
               "reffuse/formats/corpus.py", "reffuse/method/pipeline.py", "reffuse/method/removal.py",
               "reffuse/method/metrics.py", "reffuse/method/planning.py", "reffuse/method/predictors.py",
               "reffuse/method/calibrate.py", "reffuse/evaluation/prefix.py", "reffuse/core/fusion.py")


def rules_provenance() -> dict:
    """The commit that last changed the verdict rules (reffuse.experiments.provenance)."""
    return provenance(RULE_FILES)


def rejudge(result: dict, command: str) -> dict:
    """A run made earlier, judged again by the current rules: "verdicts" by them, "verdicts_as_run" the verdicts
    the run recorded (kept from the first judging), and "revision": when, by which command, under which commit
    of the rules, and which setup files changed after the commit the run recorded (its setup files' where it
    recorded them, else its rules')."""
    recorded = result.get("setup") or result["rules"]
    return result | {"verdicts_as_run": result.get("verdicts_as_run", result["verdicts"]), "verdicts": verdicts(result),
                     "revision": {"date": datetime.now(timezone.utc).date().isoformat(), "command": command,
                                  "rules": rules_provenance(),
                                  "setup_changes": changes_since(recorded["commit"], SETUP_FILES)
                                  if recorded.get("commit") else None}}


SCALE_TOKENS = (2048, 8192, 32768)   # calibration text of finding (j)


def run_experiments(model_name: str = "smollm2", drop_count: int = 8, held_out_tokens: int = 16384,
                    calibration_tokens: int = 2048, scoring_tokens: int = 256, dependency_tokens: int = 128,
                    window: int = 256, decode_tokens: int = 32, repeats: int = 15, threads: int | None = None,
                    region_rank: int = 1, scale_tokens=SCALE_TOKENS) -> dict:
    """Every experiment of the module docstring; a JSON-ready dict. region_rank: which attention-removal region,
    1 the cheapest window of drop_count blocks, 2 the next, ... (the study again on other regions, which overlap
    this one: not independent replications); scale_tokens:
    the calibration text sizes of finding (j)."""
    started = time.perf_counter()
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    result = {"model": model_name, "definitions": DEFINITIONS, "rules": rules_provenance(),
              "setup": provenance(SETUP_FILES),
              "environment": {"machine": platform.machine(), "cores": os.cpu_count(), "threads": threads,
                              "python": platform.python_version(), "numpy": np.__version__,
                              "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
              "settings": {"drop_count": drop_count, "held_out_tokens": held_out_tokens,
                           "calibration_tokens": calibration_tokens, "scoring_tokens": scoring_tokens,
                           "dependency_tokens": dependency_tokens, "window": window, "decode_tokens": decode_tokens,
                           "repeats": repeats, "region_rank": region_rank,
                           "scale_tokens": [int(n) for n in scale_tokens]}}
    with blas_threads(threads):
        original = load_model(model_name)
        result["model_name"] = original.config.name
        texts = load_texts(model_name, original, calibration_tokens, held_out_tokens, window)
        result["texts"] = texts.describe()
        study = prepare_study(original, texts, drop_count, scoring_tokens, dependency_tokens, window, result,
                              region_rank)

        step(4, f"(a, f) fusion intensity: span {study.span[0]}-{study.span[1]} into "
                f"{', '.join(map(str, study.counts))} steps, fold and last")
        intensity = fusion_intensity(study)
        step(5, "(g) calibrated fusion: weighting and ridge chosen on validation calibration text, then every k")
        result["calibration"] = calibration(study, intensity)
        result["intensity"] = intensity
        chosen = {"ridge": result["calibration"]["ridge"], "weighting": result["calibration"]["weighting"]}
        step(6, f"(j) calibration on {', '.join(map(str, scale_tokens))} tokens")
        result["calibration_scale"] = calibration_scale(study, chosen, scale_tokens)
        step(7, "(b, i) FFN removal at equal depth reduction; every removal count, plain and refitted")
        result["removal"] = ffn_removal(study, intensity)
        counts = removal_counts(study, result["removal"], chosen)
        result["equal_latency"] = {"removal": counts}
        step(8, "(c) last FFN, (d) reversed order, (e) full-block parallelization")
        result["last_ffn"] = last_ffn(study)
        result["reversed"] = reversed_order(study)
        result["full_block"] = full_block(study)
        step(9, "(h) predictors of fusion damage against every group of the span")
        result["predictors"] = predictor_comparison(study)
        step(10, f"decode latency of {2 + len(study.counts) + len(counts)} models, in alternation; the same "
                 "modelled on a GPU")
        result["decode"] = decode_latency(study, intensity, result["removal"]["rows"], decode_tokens, repeats,
                                          counts)
        result["equal_latency"]["modelled"] = modelled_latency(decoded_models(study, counts))
    result["environment"]["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["seconds"] = time.perf_counter() - started
    result["verdicts"] = verdicts(result)
    return result


def region_summary(results: list[dict]) -> dict:
    """The findings across the regions: each region's removed blocks, span and verdicts, and for each finding how
    many regions gave each verdict."""
    regions = [{"rank": r["settings"]["region_rank"], "attention_removed": r["attention_removal"]["blocks_text"],
                "blocks": r["attention_removal"]["blocks"], "summed_score": r["attention_removal"]["summed_score"],
                "span": r["span"], "verdicts": {v["finding"]: v["verdict"] for v in r["verdicts"]}}
               | ({"verdicts_as_run": {v["finding"]: v["verdict"] for v in r["verdicts_as_run"]}}
                  if "verdicts_as_run" in r else {})
               | ({"predictors": r["predictors"]["correlations"],
                   "predictors_against_size": predictors_against_size(r["predictors"])} if "predictors" in r else {})
               for r in results]
    findings = []
    for v in results[0]["verdicts"]:
        counts = {}
        for region in regions:
            verdict = region["verdicts"][v["finding"]]
            counts[verdict] = counts.get(verdict, 0) + 1
        findings.append({"finding": v["finding"], "title": v["title"], "counts": counts})
    return {"regions": regions, "findings": findings, "rules": results[0]["rules"]} | (
        {"revision": results[0]["revision"]} if "revision" in results[0] else {})

