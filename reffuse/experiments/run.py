"""The paper's experiments (its §4-5, App. B) at small scale, on one model with an attention-removed region.

Setup. The region: attention is removed from the `drop_count` consecutive blocks whose single removals cost
least (reffuse.method.removal, scored on calibration text); the longest attention-free run of the result, [a, b], is
the run studied (on SmolLM2, whose blocks all have attention, it is exactly the removed region). The model with
that attention removed is the "pre-fusion" model, the paper's PreFusion: every fusion experiment below is
judged against it, by KL(pre-fusion || variant) of the next-token distributions on held-out text, by
perplexity, and by top-1 agreement; the same against the original model is recorded too. The paper's
accuracy benchmarks (MMLU, MT-Bench) have no counterpart at 135M parameters: KL and perplexity are the proxy
(KL of the logits is reffuse's choice of proxy). The span fused is the run without its last block, [a, b-1], as
in the paper.

The findings (a)-(k) are the modules of reffuse.experiments.findings, one each, named by letter and subject
(a_intensity: fusion intensity, b_removal: FFN removal vs fusion, ... k_planner: the planner's predictor): each
module's docstring says what it measures, and the module holds that measurement, the rule that gives its verdict
against the paper's observation, and its section of the report.

The plans of (a) come from reffuse's planner (reffuse.method.planning), which cuts the span where the neighbour
damage is least; the held-out text is 16384 tokens by default, dealt over eight plays and the Sonnets
(reffuse.formats.corpus), and the report gives the main variants' KL on each kind of text.

Variants are scored from cached prefix streams (reffuse.evaluation.prefix): the blocks before the first change never run
twice. `study` holds what every finding starts from.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone

import numpy as np

from reffuse.experiments.findings import verdicts
from reffuse.experiments.findings.a_intensity import fusion_intensity
from reffuse.experiments.findings.b_removal import decode_latency, ffn_removal
from reffuse.experiments.findings.c_last_ffn import last_ffn
from reffuse.experiments.findings.d_reversed import reversed_order
from reffuse.experiments.findings.e_full_block import full_block
from reffuse.experiments.findings.g_calibrated import calibration
from reffuse.experiments.findings.h_predictors import predictor_comparison, predictors_against_size
from reffuse.experiments.findings.i_equal_latency import decoded_models, modelled_latency, removal_counts
from reffuse.experiments.findings.j_calibration_scale import calibration_scale
from reffuse.experiments.provenance import changes_since, provenance
from reffuse.experiments.study import DEFINITIONS, prepare_study, step
from reffuse.formats.registry import load_model
from reffuse.method.pipeline import load_texts
from reffuse.speed.timing import blas_threads


# The code that turns the numbers into verdicts: the report names the commit these files come from.
RULE_FILES = ("reffuse/experiments/findings", "reffuse/evaluation/intervals.py", "reffuse/stats.py")


# The code that shapes the numbers the rules judge: the corpus split, the attention removal, the planner, the
# predictors, calibration, scoring and fusion, and the measurements themselves. A run records their commit.
SETUP_FILES = ("reffuse/experiments/run.py", "reffuse/experiments/study.py", "reffuse/experiments/findings",
               "reffuse/formats/corpus.py", "reffuse/method/pipeline.py", "reffuse/method/removal.py",
               "reffuse/method/metrics.py", "reffuse/method/planning.py", "reffuse/method/predictors.py",
               "reffuse/method/calibrate.py", "reffuse/evaluation/prefix.py", "reffuse/core/fusion.py")


def rejudge(result: dict, command: str) -> dict:
    """A run made earlier, judged again by the current rules: "verdicts" by them, "verdicts_as_run" the verdicts
    the run recorded (kept from the first judging), and "revision": when, by which command, under which commit
    of the rules, and which setup files changed after the commit the run recorded (its setup files' where it
    recorded them, else its rules')."""
    recorded = result.get("setup") or result["rules"]
    return result | {"verdicts_as_run": result.get("verdicts_as_run", result["verdicts"]), "verdicts": verdicts(result),
                     "revision": {"date": datetime.now(timezone.utc).date().isoformat(), "command": command,
                                  "rules": provenance(RULE_FILES),
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
    result = {"model": model_name, "definitions": DEFINITIONS, "rules": provenance(RULE_FILES),
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

