"""Local distillation against the closed-form refit, on the study's first region, scored on held-out text.

    python -m reffuse.experiments.distillation --out reports/distillation/smollm2

The setup is `reffuse experiments`' first region (reffuse.experiments.study.prepare_study, the same settings):
attention removed from the cheapest window of 8 blocks, the span fused the run without its last block, held-out and
calibration text from the fixed corpus split. For the span fused into k groups (k = 1, 2: the plans of finding
(a)), three versions of the fused model:

- plain fusion (Theorem 3.1's weights, norm "fold");
- the closed-form refit of each fused down projection (reffuse.method.calibrate, its default ridge and weighting);
- local distillation (reffuse.method.distill): gate, up and down trained by Adam, DISTILL_STEPS full-batch steps
  at DISTILL_LEARNING_RATE from the plain weights, on the same calibration tokens and the same local objective.

Each is scored on the held-out text against the pre-fusion model, and every comparison is a paired difference with
its intervals (reffuse.stats.paired_difference). The step count and learning rate are fixed here, before the run, and
never chosen on held-out text. Pre-fusion and plain KL are the references: "share removed" is 1 - KL / plain KL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reffuse.core.fusion import fuse
from reffuse.core.layout import format_groups
from reffuse.evaluation.intervals import describe
from reffuse.evaluation.prefix import score_variant
from reffuse.experiments.study import prepare_study
from reffuse.outputs import write_json_atomic, write_text_atomic
from reffuse.formats.registry import load_model
from reffuse.method.calibrate import calibrated_fuse
from reffuse.method.distill import distilled_fuse
from reffuse.method.pipeline import load_texts
from reffuse.progress import note
from reffuse.speed.timing import blas_threads
from reffuse.stats import paired_difference

DISTILL_STEPS = 200
DISTILL_LEARNING_RATE = 1e-4
STEP_COUNTS = (1, 2)


def run_distillation(model_name: str = "smollm2", drop_count: int = 8, held_out_tokens: int = 2048,
                     calibration_tokens: int = 2048, scoring_tokens: int = 256, dependency_tokens: int = 128,
                     window: int = 256, threads: int | None = None) -> dict:
    started = time.perf_counter()
    with blas_threads(threads):
        original = load_model(model_name)
        texts = load_texts(model_name, original, calibration_tokens, held_out_tokens, window)
        setup: dict = {}
        study = prepare_study(original, texts, drop_count, scoring_tokens, dependency_tokens, window, setup)
        windows = list(texts.calibration.ids)
        rows = []
        for k in STEP_COUNTS:
            groups = study.plans[k]
            note(f"{k} step(s): {format_groups(groups)}: plain, refit, distilled")
            refit, _ = calibrated_fuse(study.pre, groups, windows)
            distilled, reports = distilled_fuse(study.pre, groups, windows, DISTILL_STEPS, DISTILL_LEARNING_RATE)
            scores = {name: score_variant(study.prefix, model, study.span[0], per_token=True)
                      for name, model in (("plain", fuse(study.pre, groups)), ("refit", refit),
                                          ("distilled", distilled))}
            rows.append({"steps": k, "groups": [list(g) for g in groups],
                         "scores": {name: {key: s[key] for key in ("kl_from_base", "perplexity", "per_token")}
                                    for name, s in scores.items()},
                         "distillation": [r.as_dict() for r in reports]})
    return {"model": model_name, "attention_removed": setup["attention_removal"]["blocks_text"],
            "region": list(study.region),
            "settings": {"drop_count": drop_count, "held_out_tokens": held_out_tokens,
                         "calibration_tokens": calibration_tokens, "window": window, "steps": DISTILL_STEPS,
                         "learning_rate": DISTILL_LEARNING_RATE},
            "texts": texts.describe(), "pre_fusion_perplexity": setup["pre_fusion"]["perplexity"],
            "rows": rows, "seconds": time.perf_counter() - started}


def comparisons(row: dict) -> dict:
    """The paired differences of a row: distilled - plain, refit - plain, distilled - refit (KL)."""
    s = {name: v["per_token"]["kl"] for name, v in row["scores"].items()}
    return {label: paired_difference(s[x], s[y]) for label, x, y in
            (("distilled - plain", "distilled", "plain"), ("refit - plain", "refit", "plain"),
             ("distilled - refit", "distilled", "refit"))}


def markdown(r: dict, command: str) -> str:
    settings = r["settings"]
    lines = ["# Local distillation against the closed-form refit", "", "Produced by:", "", f"    {command}", "",
             f"{r['seconds'] / 60:.1f} minutes. {r['model']} with the attention of blocks {r['attention_removed']} "
             f"removed; the run {r['region'][0]}-{r['region'][1]}, its span fused without the last block. "
             f"{settings['calibration_tokens']} calibration tokens fit both the refit and the distillation "
             f"({settings['steps']} Adam steps at learning rate {settings['learning_rate']:g}, fixed before the run); "
             f"{settings['held_out_tokens']} held-out tokens score them against the pre-fusion model (perplexity "
             f"{r['pre_fusion_perplexity']:.2f}).", "",
             "| steps | groups | plain KL | refit KL | distilled KL | share removed, refit | share removed, "
             "distilled | perplexity plain / refit / distilled | local loss before / after training |",
             "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for row in r["rows"]:
        kl = {name: s["kl_from_base"] for name, s in row["scores"].items()}
        ppl = " / ".join(f"{row['scores'][n]['perplexity']:.2f}" for n in ("plain", "refit", "distilled"))
        loss = "; ".join(f"{d['losses'][0]:.3f} -> {d['losses'][-1]:.3f}" for d in row["distillation"])
        lines.append(f"| {row['steps']} | {format_groups([tuple(g) for g in row['groups']])} | {kl['plain']:.4f} | "
                     f"{kl['refit']:.4f} | {kl['distilled']:.4f} | {1 - kl['refit'] / kl['plain']:.0%} | "
                     f"{1 - kl['distilled'] / kl['plain']:.0%} | {ppl} | {loss} |")
    lines += ["", "Paired differences of the held-out KL (95% intervals over windows and over token blocks):", ""]
    for row in r["rows"]:
        for label, d in comparisons(row).items():
            lines.append(f"- {row['steps']} step(s), {label}: {describe(d)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model name (default smollm2)")
    parser.add_argument("--out", type=Path, required=True, help="folder for distillation.json and README.md")
    args = parser.parse_args(argv)
    command = " ".join(["python -m reffuse.experiments.distillation"] + sys.argv[1:])
    result = run_distillation(args.model) | {"command": command}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "distillation.json", result)
    write_text_atomic(args.out / "README.md", markdown(result, command))
    print(json.dumps({row["steps"]: {n: s["kl_from_base"] for n, s in row["scores"].items()} for row in result["rows"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
