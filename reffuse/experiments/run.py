"""The paper's experiments (PAPER.md §3-4) at small scale, on one model with an attention-removed region.

Setup. The region: attention is removed from the `drop_count` consecutive blocks whose single removals cost
least (reffuse.method.removal, scored on calibration text); the longest attention-free run of the result, [a, b], is
the run studied (on SmolLM2, whose blocks all have attention, it is exactly the removed region). The model with
that attention removed is the "pre-fusion" model, the paper's PreFusion: every fusion experiment below is
judged against it, by KL(pre-fusion || variant) of the next-token distributions on held-out text, by
perplexity, and by top-1 agreement; the same against the original model is recorded too. The paper's
accuracy benchmarks (MMLU, MT-Bench) have no counterpart at 135M parameters: KL and perplexity are the proxy
(PAPER.md §7 suggests logit KL). The span fused is the run without its last block, [a, b-1], as in the paper.

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
    combination rule is [INF]: the paper does not write it down (PAPER.md §3); it is eq. 5 for whole blocks;
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
from reffuse.speed.bench import prompt_ids, reffuse_decode, time_decode
from reffuse.method.calibrate import DEFAULT_RIDGE, DEFAULT_WEIGHTING, WEIGHTINGS, calibrated_fuse
from reffuse.errors import ReffuseError
from reffuse.core.fusion import fuse
from reffuse.formats.registry import load_model
from reffuse.method.metrics import (block_evaluations_needed, dependency, full_blocks, greedy_windows, matrix_to_json,
                      window_statistics)
from reffuse.core.model import Model, block_forward, forward, layout, original_layers, rms_norm, rope_tables
from reffuse.method.pipeline import choose_attention_removal, ffn_dependency, load_texts
from reffuse.method.planning import propose_groups
from reffuse.evaluation.prefix import cache_prefix, score_logits, score_variant
from reffuse.progress import Progress, note
from reffuse.method.removal import attention_free_runs, cheapest, drop_attention, drop_ffns, ffn_scores
from reffuse.speed.timing import blas_threads

RIDGE_SWEEP = (0.1, 1.0, 10.0)
WINDOW = 4        # full-block windows (the paper's hardware choice)
MAX_STEPS = 4     # greedy full-block steps, as the paper's Table 7

DEFINITIONS = {
    "kl": "mean over held-out predictions of KL(reference || variant) of the next-token distributions, nats",
    "reference": "the pre-fusion model (attention removed, nothing fused) unless marked 'vs original'",
    "perplexity": "exp of the mean next-token negative log-likelihood on the held-out windows",
    "steps": "sequential FFN steps left in the fused span (a fused group is one step)",
    "full_block_rule": "[INF] a window of whole blocks [s, e] runs as x + Σ_{j=s..e} (f_j(x) - x), the analogue of "
                       "eq. 5; the paper does not write its rule down",
    "decode": "greedy decode with the KV cache after a 32-token prompt, median over repeats, models timed in "
              "alternation in one run; float32, BLAS pinned to the process's cores",
}


# ---------------------------------------------------------------------------------------------------------------
# Variants of a model


def reversed_run(model: Model, first: int, last: int) -> Model:
    """Blocks first..last in reverse order (attention-free blocks hold no position-dependent state)."""
    blocks = list(model.blocks)
    blocks[first:last + 1] = blocks[first:last + 1][::-1]
    return Model(model.config, model.embed, blocks, model.norm, model.lm_head)


def block_parallel_logits(model: Model, first: int, x, windows) -> np.ndarray:
    """Blocks first.. on the stream x [T, d] entering block `first`, each window (s, e) of whole blocks run in
    parallel as x + Σ_j (f_j(x) - x) ([INF] rule, see DEFINITIONS); logits [T, vocab]."""
    cfg = model.config
    cos, sin = rope_tables(np.arange(x.shape[0]), cfg.head_dim, cfg.rope_theta, model.dtype)
    ends = dict(windows)
    layer = first
    while layer < len(model.blocks):
        if layer in ends:
            x = x + sum(block_forward(model, j, x, cos, sin) - x for j in range(layer, ends[layer] + 1))
            layer = ends[layer] + 1
        else:
            x = block_forward(model, layer, x, cos, sin)
            layer += 1
    return rms_norm(x, model.norm, cfg.norm_eps) @ model.lm_head.T  # [T, d] -> [T, vocab]


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


def _kl(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.2e}"


def _ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e6 else f"{x:.3e}"


def _text(groups) -> str:
    return ",".join(f"{a}-{b}" for a, b in groups) or "-"


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
                      layouts={"original": layout(original), "pre_fusion": layout(pre)})

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
                row = {"steps": k, "groups": [list(g) for g in plans[k]], "groups_text": _text(plans[k]),
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
            scores = score_logits(prefix, lambda w: block_parallel_logits(pre, first, prefix.streams[w][first],
                                                                          chosen), reference=original_prefix)
            full_rows.append({"steps": n, "windows": [list(w) for w in chosen], "windows_text": _text(chosen),
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
                kl = score_logits(scan, lambda i: block_parallel_logits(pre, s0, scan.streams[i][s0], [(s0, e0)]),
                                  kl_only=True)["kl_from_base"]
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


# ---------------------------------------------------------------------------------------------------------------
# Verdicts: the paper's observation, what was measured here, and whether it held


def _prediction_note(full: dict) -> str:
    single = full["single_windows"]
    if not single:
        return ""
    best, worst = min(single, key=lambda w: w["kl"]), max(single, key=lambda w: w["kl"])
    rho = full["rank_correlation_max_kl"]
    return (f"each of the {len(single)} eligible windows alone: KL from {_kl(best['kl'])} ({best['first']}-"
            f"{best['last']}) to {_kl(worst['kl'])} ({worst['first']}-{worst['last']}); rank correlation of M_max "
            f"with that KL {rho:.2f}" if rho is not None else "")


def verdicts(r: dict) -> list[dict]:
    """One entry per finding (a)-(g): the paper's observation, the numbers here, the rule that decides, and the
    verdict ("held", "partly held", "did not hold", "not measured")."""
    rows = sorted(r["intensity"], key=lambda row: -row["steps"])
    latency = r["decode"]
    base_ms = latency["pre-fusion"]["ms_per_token"]
    sink = r["sink"]["pre_fusion_norms"][r["sink"]["layer"]]
    out = []

    def verdict(ok, partly=False):
        return "held" if ok else "partly held" if partly else "did not hold"

    kls = [row["fold"]["kl"] for row in rows]
    rises = [y >= x * 0.95 for x, y in zip(kls, kls[1:])]
    out.append({"finding": "a", "title": "fusion intensity",
                "paper": "Puzzle-49B, 26 FFNs fused into 12/6/3/2: accuracy falls gradually, about 1% at 12 and "
                         "about 4% at 2 (84.71 -> 83.92 -> 82.84 -> 81.69 -> 81.24)",
                "here": "KL to the pre-fusion model " + ", ".join(f"{row['steps']} steps {_kl(row['fold']['kl'])}"
                                                               for row in rows)
                        + "; perplexity " + ", ".join(_ppl(row["fold"]["perplexity"]) for row in rows)
                        + f" (pre-fusion {_ppl(r['pre_fusion']['perplexity'])}); the first token's norm leaving the "
                          f"run " + ", ".join(f"{row['fold']['sink_norm']:.0f}" for row in rows)
                        + f" (pre-fusion {sink:.0f})",
                "rule": "held if the damage grows as the groups get fewer (each KL at least 95% of the one before); "
                        "partly if the fewest groups still cost more than the most, but not step by step",
                "verdict": verdict(all(rises), kls[-1] > kls[0])})

    plain = [row["fold"]["kl"] < removal["kl"] for row, removal in zip(r["intensity"], r["removal"]["rows"])]
    calibrated = [row["calibrated"]["kl"] < removal["kl"]
                  for row, removal in zip(r["intensity"], r["removal"]["rows"])]
    pairs = []
    for row, removal in zip(r["intensity"], r["removal"]["rows"]):
        fused_ms = latency[f"fused, {row['steps']} steps"]["ms_per_token"]
        removed_ms = latency[f"{removal['depth_reduction']} FFNs removed"]["ms_per_token"]
        pairs.append(f"depth -{row['depth_reduction']}: fusion KL {_kl(row['fold']['kl'])} (calibrated "
                     f"{_kl(row['calibrated']['kl'])}), {100 * (fused_ms / base_ms - 1):+.1f}% decode latency; "
                     f"removal KL {_kl(removal['kl'])}, {100 * (removed_ms / base_ms - 1):+.1f}%")
    out.append({"finding": "b", "title": "FFN removal vs fusion",
                "paper": "at a similar latency, fusion keeps more accuracy than removal (fusion step 3: -10% latency, "
                         "-3.5% accuracy; removing 15 FFNs: -7.5% latency, -5% accuracy; 20 FFNs: -11%, -8.7%)",
                "here": "; ".join(pairs),
                "rule": "held if plain fusion has the lower KL at every equal depth reduction; partly if it wins at "
                        "some, or if only calibrated fusion wins at all. Latency is reported, not judged: a CPU "
                        "decode of a 135M model is bound by reading weights, which fusion does not reduce",
                "verdict": verdict(all(plain), any(plain) or all(calibrated)),
                "note": f"plain fusion wins at {sum(plain)} of {len(plain)} depths, calibrated fusion at "
                        f"{sum(calibrated)} of {len(calibrated)}"})

    last = {row["label"]: row for row in r["last_ffn"]}
    left_out = last["leave out the last FFN"]["kl"]
    others = [row["kl"] for label, row in last.items() if label != "leave out the last FFN"]
    whole = last["the whole run, last FFN included"]["kl"]
    out.append({"finding": "c", "title": "the last FFN of a run",
                "paper": "including the run's last FFN hurts most (MT-Bench 8.25 -> 7.30 when layers 51 and 70 are "
                         "included); shifting the group by one to include it is worse than leaving it out",
                "here": "; ".join(f"{row['label']} ({row['group'][0]}-{row['group'][1]}) KL {_kl(row['kl'])}"
                                  for row in r["last_ffn"]),
                "rule": "held if leaving out the last FFN gives the lowest KL and including it (the whole run) "
                        "is worse than leaving it out",
                "verdict": verdict(left_out <= min(others) and whole > left_out, whole > left_out)})

    close = [max(row["fused"]["kl"], row["reversed"]["kl"]) <= 2 * min(row["fused"]["kl"], row["reversed"]["kl"])
             for row in r["reversed"]]
    out.append({"finding": "d", "title": "reversed order vs fusion",
                "paper": "running a span's FFNs in reverse order costs about as much as fusing them (combined "
                         "accuracy within 0.25 points, e.g. [42,49] 83.74 fused vs 83.52 reversed)",
                "here": "; ".join(f"{row['span'][0]}-{row['span'][1]}: fused KL {_kl(row['fused']['kl'])}, reversed "
                                  f"{_kl(row['reversed']['kl'])}" for row in r["reversed"]),
                "rule": "held if, for every span, the two KLs are within a factor 2 of each other",
                "verdict": verdict(all(close), any(close))})

    full = r["full_block"]["rows"]
    if full:
        ffn_four = next((row["fused"]["kl"] for row in r["reversed"]
                         if row["span"][1] - row["span"][0] + 1 == WINDOW), None)
        cheap_start = len(full) >= 2 and full[1]["kl"] < 0.5 * full[-1]["kl"]
        harder = ffn_four is not None and full[0]["kl"] > ffn_four
        here = "; ".join(f"step {row['steps']} (+{row['windows_text'].split(',')[-1]}, M_max {step['max']:.3f}) KL "
                         f"{_kl(row['kl'])}" for row, step in zip(full, r["full_block"]["greedy"]))
        if ffn_four is not None:
            here += f"; for comparison, fusing {WINDOW} attention-free FFNs: KL {_kl(ffn_four)}"
        out.append({"finding": "e", "title": "full-block parallelization",
                    "paper": "greedy windows of 4 whole blocks: the first two steps are cheap (MMLU 80.73 -> 80.51 -> "
                             "80.04), the third and fourth collapse (77.86, 56.12); whole blocks are harder to "
                             "parallelize than FFNs",
                    "here": here,
                    "rule": f"held if the KL after step 2 is under half the KL after the last step (cheap first "
                            f"steps, then a collapse) and one window of {WINDOW} whole blocks costs more than fusing "
                            f"{WINDOW} attention-free FFNs; partly if only the second holds",
                    "verdict": verdict(cheap_start and harder, harder),
                    "note": _prediction_note(r["full_block"])})
    else:
        out.append({"finding": "e", "title": "full-block parallelization", "paper": "see PAPER.md §3",
                    "here": "no window of 4 consecutive blocks with attention and FFN exists", "rule": "-",
                    "verdict": "not measured"})

    fold_better = [row["fold"]["kl"] <= row["last"]["kl"] for row in rows]
    out.append({"finding": "f", "title": "fold vs last norm",
                "paper": "the paper feeds every fused FFN the last block's norm (its §3) and does not ablate it; "
                         "folding each block's gain into its weights is exact for the parallel form [INF]",
                "here": "; ".join(f"{row['steps']} steps: fold KL {_kl(row['fold']['kl'])}, last "
                                  f"{_kl(row['last']['kl'])}" for row in rows),
                "rule": "not a test of the paper: 'held' means fold is at least as good as last at every k",
                "verdict": verdict(all(fold_better), any(fold_better))})

    closed = [1 - row["calibrated"]["kl"] / row["fold"]["kl"] for row in rows]
    out.append({"finding": "g", "title": "calibrated vs plain fusion",
                "paper": "not in the paper: it recovers fused models by knowledge distillation on billions of "
                         "tokens (Step 3 + KD beats the baseline: 85.28 vs 84.71)",
                "here": "; ".join(f"{row['steps']} steps: plain KL {_kl(row['fold']['kl'])} -> calibrated "
                                  f"{_kl(row['calibrated']['kl'])} ({100 * c:.0f}% of the gap closed), perplexity "
                                  f"{_ppl(row['fold']['perplexity'])} -> {_ppl(row['calibrated']['perplexity'])}"
                                  for row, c in zip(rows, closed))
                        + f"; weighting {r['calibration']['weighting']}, ridge {r['calibration']['ridge']:g}, "
                          "chosen on validation calibration text",
                "rule": "our addition: 'held' means calibration lowers the held-out KL at every k",
                "verdict": verdict(all(c > 0 for c in closed), any(c > 0 for c in closed))})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The report


def markdown(r: dict, command: str) -> str:
    """The report as Markdown: setup, one section per finding with its table and verdict."""
    removal, env = r["attention_removal"], r["environment"]
    a, b = r["region"]
    span = r["span"]
    texts = r["texts"]
    cal, held = texts["calibration"], texts["held_out"]

    def spans(part):
        return "; ".join(f"{s['title']} characters {s['start']}-{s['end']} ({s['tokens']} tokens)"
                         for s in part["spans"]) or part["split"]

    def row_scores(s):
        return (f"{_kl(s['kl'])} | {_ppl(s['perplexity'])} | {100 * s['top1']:.1f}% | {_kl(s['kl_vs_original'])} | "
                f"{s['sink_norm']:.0f}")

    sink = r["sink"]
    norms = sink["pre_fusion_norms"]
    jump = max(range(1, len(norms)), key=lambda i: norms[i] / norms[i - 1])  # the block whose output jumps most

    lines = [f"# FFN Fusion experiments at small scale: {r['model_name']}", "",
             "Produced by:", "", f"    {command}", "",
             f"{r['seconds'] / 60:.1f} minutes on {env['cores']} cores ({env['threads']} BLAS threads), load average "
             f"{env['load_average_1min_at_start']:.1f} at the start and {env['load_average_1min_at_end']:.1f} at the "
             f"end. The JSON beside this file holds every number; `reffuse.plots.experiments` draws the figures "
             "from it.", "",
             "## Setup", "",
             f"- **Attention removal** (standing in for Puzzle): every block's attention scored by the KL of removing "
             f"it alone on {removal['scoring_tokens']} calibration tokens; removed: blocks **{removal['blocks_text']}**"
             f" ({removal['rule']}). Summed single scores {removal['summed_score']:.3f} nats, measured jointly "
             f"{removal['joint_kl']:.3f} nats: removals interact.",
             f"- The attention-free run is **{a}-{b}**; the span fused is **{span[0]}-{span[1]}** (the run without "
             "its last block, as in the paper).",
             f"- **Held-out text**: {spans(held)}: {held['windows']} windows of {held['window']} tokens. "
             f"**Calibration text** (scores, dependencies, calibration): {spans(cal)}. Disjoint: {texts['disjoint']}.",
             f"- Original model perplexity {_ppl(r['original']['perplexity'])}; pre-fusion (attention removed) "
             f"{_ppl(r['pre_fusion']['perplexity'])}, KL to the original {_kl(r['pre_fusion']['kl_vs_original'])}, "
             f"top-1 agreement {100 * r['pre_fusion']['top1_vs_original']:.1f}%.",
             "- Quality proxy: KL(pre-fusion || variant) in nats on held-out text (0 = the pre-fusion model), "
             "perplexity, top-1 agreement with the pre-fusion model, and KL to the original model. The paper's "
             "MMLU / MT-Bench have no counterpart at this scale.",
             f"- The attention sink: the first token's stream norm in the pre-fusion model grows from "
             f"{norms[jump - 1]:.0f} to {norms[jump]:.0f} in block {jump - 1} (massive activations; later attention "
             f"leans on it). The tables give that norm where the stream leaves the run (entering block "
             f"{sink['layer']}; pre-fusion {norms[sink['layer']]:.0f}) as 'sink norm'.", "",
             "## Verdicts", "", "| finding | paper | here | verdict |", "|---|---|---|---|"]
    for v in r["verdicts"]:
        note = f"; {v['note']}" if v.get("note") else ""
        lines.append(f"| ({v['finding']}) {v['title']} | {v['paper']} | {v['here']} | **{v['verdict']}** "
                     f"({v['rule']}{note}) |")

    header = "| KL | perplexity | top-1 | KL vs original | sink norm |"
    lines += ["", "## (a) Fusion intensity, (f) fold vs last, (g) calibrated", "",
              f"The span {span[0]}-{span[1]} ({span[1] - span[0] + 1} FFNs) as k sequential steps, cut where the "
              "least FFN-level dependency stays inside the groups.", "",
              "| steps | groups | plain fusion: KL | perplexity | top-1 | KL vs original | sink norm | norm last: KL | "
              "calibrated: KL | calibrated perplexity | gap closed |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| {span[1] - span[0] + 1} (pre-fusion) | - | 0 | {_ppl(r['pre_fusion']['perplexity'])} | 100% | "
                 f"{_kl(r['pre_fusion']['kl_vs_original'])} | {norms[sink['layer']]:.0f} | 0 | 0 | "
                 f"{_ppl(r['pre_fusion']['perplexity'])} | - |")
    for row in r["intensity"]:
        closed = 1 - row["calibrated"]["kl"] / row["fold"]["kl"]
        lines.append(f"| {row['steps']} | {row['groups_text']} | {row_scores(row['fold'])} | "
                     f"{_kl(row['last']['kl'])} | {_kl(row['calibrated']['kl'])} | "
                     f"{_ppl(row['calibrated']['perplexity'])} | {100 * closed:.0f}% |")
    c = r["calibration"]
    sweep = ", ".join(f"{s['weighting']} {s['ridge']:g}: {s['geometric_mean_ratio']:.3f}" for s in c["sweep"])
    lines += ["", "Calibration: token weighting (none or relative, see reffuse.method.calibrate) and ridge chosen together on "
                  f"{c['validation_tokens']} validation tokens of the calibration text, every plan above fitted on "
                  f"the other {c['fit_tokens']}; the score is the geometric mean over the plans of KL(calibrated) / "
                  f"KL(plain): {sweep}. Chosen: **{c['weighting']}, ridge {c['ridge']:g}** (the library defaults are "
                  f"{c['default_weighting']}, {c['default_ridge']:g}), then refitted on all {c['tokens']} calibration "
                  "tokens. Held-out text played no part in the choice."]

    lat = r["decode"]
    base_ms = lat["pre-fusion"]["ms_per_token"]
    lines += ["", "## (b) FFN removal vs fusion at equal depth reduction", "",
              "FFNs of the span scored by the KL of removing each alone (calibration text); the least important "
              "removed. Decode latency of every model measured in the same run, in alternation.", "",
              "| model | depth reduction | " + header[1:] + " decode ms/token | vs pre-fusion |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| original | - | - | {_ppl(r['original']['perplexity'])} | - | 0 | - | "
                 f"{lat['original']['ms_per_token']:.2f} "
                 f"| {100 * (lat['original']['ms_per_token'] / base_ms - 1):+.1f}% |")
    lines.append(f"| pre-fusion | 0 | 0 | {_ppl(r['pre_fusion']['perplexity'])} | 100% | "
                 f"{_kl(r['pre_fusion']['kl_vs_original'])} | {norms[sink['layer']]:.0f} | {base_ms:.2f} | 0% |")
    for row, removal_row in zip(r["intensity"], r["removal"]["rows"]):
        fused_ms = lat[f"fused, {row['steps']} steps"]["ms_per_token"]
        removed_ms = lat[f"{removal_row['depth_reduction']} FFNs removed"]["ms_per_token"]
        lines.append(f"| fused {row['groups_text']} | {row['depth_reduction']} | {row_scores(row['fold'])} | "
                     f"{fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| fused {row['groups_text']}, calibrated | {row['depth_reduction']} | "
                     f"{row_scores(row['calibrated'])} | {fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| removed FFNs {','.join(map(str, removal_row['removed']))} | {removal_row['depth_reduction']}"
                     f" | {row_scores(removal_row)} | {removed_ms:.2f} | {100 * (removed_ms / base_ms - 1):+.1f}% |")

    lines += ["", "## (c) The last FFN", "", "| group | " + header[1:], "|---|---:|---:|---:|---:|---:|"]
    for row in r["last_ffn"]:
        lines.append(f"| {row['label']}: {row['group'][0]}-{row['group'][1]} | {row_scores(row)} |")

    lines += ["", "## (d) Reversed order vs fusion", "",
              "| span | fused KL | reversed KL | fused perplexity | reversed perplexity | fused sink norm | "
              "reversed sink norm |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["reversed"]:
        lines.append(f"| {row['span'][0]}-{row['span'][1]} | {_kl(row['fused']['kl'])} | "
                     f"{_kl(row['reversed']['kl'])} | "
                     f"{_ppl(row['fused']['perplexity'])} | {_ppl(row['reversed']['perplexity'])} | "
                     f"{row['fused']['sink_norm']:.0f} | {row['reversed']['sink_norm']:.0f} |")

    full = r["full_block"]
    lines += ["", "## (e) Full-block parallelization", "",
              f"Rule: {DEFINITIONS['full_block_rule']}. Greedy selection (lowest M_max, ties by M_sum) over windows "
              f"of {full['window']} blocks that have both attention and an FFN, on the block-level dependency matrix "
              f"of the pre-fusion model ({full['tokens']} calibration tokens).", "",
              "| steps | windows in parallel | M_max of the new window | KL | perplexity | top-1 | KL vs original |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for row, step in zip(full["rows"], full["greedy"]):
        lines.append(f"| {row['steps']} | {row['windows_text']} | {step['max']:.4f} | {_kl(row['kl'])} | "
                     f"{_ppl(row['perplexity'])} | {100 * row['top1']:.1f}% | {_kl(row['kl_vs_original'])} |")
    if full["single_windows"]:
        lines += ["", f"Every eligible window alone (first {full['single_window_tokens']} held-out tokens), to see "
                      "whether M_max predicts the damage:", "", "| window | M_max | M_sum | KL |",
                  "|---|---:|---:|---:|"]
        for w in sorted(full["single_windows"], key=lambda w: w["max"]):
            lines.append(f"| {w['first']}-{w['last']} | {w['max']:.4f} | {w['sum']:.4f} | {_kl(w['kl'])} |")
        rho = full["rank_correlation_max_kl"]
        if rho is not None:
            lines += ["", f"Spearman rank correlation between M_max and KL: **{rho:.2f}**."]
    lines += ["", "## Figures", "",
              "![fusion intensity](fusion_intensity.png)", "",
              "![removal vs fusion](removal_vs_fusion.png)", "",
              "![ablations](ablations.png)", "",
              "![full-block parallelization](full_block.png)", "",
              "![attention removal scores](attention_scores.png)", ""]
    return "\n".join(lines)
