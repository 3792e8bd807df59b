"""The verdict rules of `reffuse experiments`: for each finding (a)-(g), the paper's observation, what was
measured here, the rule that decides, and the verdict ("held", "partly held", "did not hold", "not measured").

The rules read only the run's JSON result, so they can be re-applied to a committed result.
"""

from __future__ import annotations

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


def format_kl(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.2e}"


def format_perplexity(x: float) -> str:
    return f"{x:.2f}" if x < 1e6 else f"{x:.3e}"


def groups_text(groups) -> str:
    return ",".join(f"{a}-{b}" for a, b in groups) or "-"


def _prediction_note(full: dict) -> str:
    single = full["single_windows"]
    if not single:
        return ""
    best, worst = min(single, key=lambda w: w["kl"]), max(single, key=lambda w: w["kl"])
    rho = full["rank_correlation_max_kl"]
    return (f"each of the {len(single)} eligible windows alone: KL from {format_kl(best['kl'])} ({best['first']}-"
            f"{best['last']}) to {format_kl(worst['kl'])} ({worst['first']}-{worst['last']}); rank correlation of M_max "
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
                "here": "KL to the pre-fusion model " + ", ".join(f"{row['steps']} steps {format_kl(row['fold']['kl'])}"
                                                               for row in rows)
                        + "; perplexity " + ", ".join(format_perplexity(row["fold"]["perplexity"]) for row in rows)
                        + f" (pre-fusion {format_perplexity(r['pre_fusion']['perplexity'])}); the first token's norm leaving the "
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
        pairs.append(f"depth -{row['depth_reduction']}: fusion KL {format_kl(row['fold']['kl'])} (calibrated "
                     f"{format_kl(row['calibrated']['kl'])}), {100 * (fused_ms / base_ms - 1):+.1f}% decode latency; "
                     f"removal KL {format_kl(removal['kl'])}, {100 * (removed_ms / base_ms - 1):+.1f}%")
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
                "here": "; ".join(f"{row['label']} ({row['group'][0]}-{row['group'][1]}) KL {format_kl(row['kl'])}"
                                  for row in r["last_ffn"]),
                "rule": "held if leaving out the last FFN gives the lowest KL and including it (the whole run) "
                        "is worse than leaving it out",
                "verdict": verdict(left_out <= min(others) and whole > left_out, whole > left_out)})

    close = [max(row["fused"]["kl"], row["reversed"]["kl"]) <= 2 * min(row["fused"]["kl"], row["reversed"]["kl"])
             for row in r["reversed"]]
    out.append({"finding": "d", "title": "reversed order vs fusion",
                "paper": "running a span's FFNs in reverse order costs about as much as fusing them (combined "
                         "accuracy within 0.25 points, e.g. [42,49] 83.74 fused vs 83.52 reversed)",
                "here": "; ".join(f"{row['span'][0]}-{row['span'][1]}: fused KL {format_kl(row['fused']['kl'])}, reversed "
                                  f"{format_kl(row['reversed']['kl'])}" for row in r["reversed"]),
                "rule": "held if, for every span, the two KLs are within a factor 2 of each other",
                "verdict": verdict(all(close), any(close))})

    full = r["full_block"]["rows"]
    if full:
        ffn_four = next((row["fused"]["kl"] for row in r["reversed"]
                         if row["span"][1] - row["span"][0] + 1 == WINDOW), None)
        cheap_start = len(full) >= 2 and full[1]["kl"] < 0.5 * full[-1]["kl"]
        harder = ffn_four is not None and full[0]["kl"] > ffn_four
        here = "; ".join(f"step {row['steps']} (+{row['windows_text'].split(',')[-1]}, M_max {step['max']:.3f}) KL "
                         f"{format_kl(row['kl'])}" for row, step in zip(full, r["full_block"]["greedy"]))
        if ffn_four is not None:
            here += f"; for comparison, fusing {WINDOW} attention-free FFNs: KL {format_kl(ffn_four)}"
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
        out.append({"finding": "e", "title": "full-block parallelization", "paper": "see the paper's App. B, Table 7",
                    "here": "no window of 4 consecutive blocks with attention and FFN exists", "rule": "-",
                    "verdict": "not measured"})

    fold_better = [row["fold"]["kl"] <= row["last"]["kl"] for row in rows]
    out.append({"finding": "f", "title": "fold vs last norm",
                "paper": "the paper feeds every fused FFN the last block's norm (its §3) and does not ablate it; "
                         "folding each block's gain into its weights is exact for the parallel form [INF]",
                "here": "; ".join(f"{row['steps']} steps: fold KL {format_kl(row['fold']['kl'])}, last "
                                  f"{format_kl(row['last']['kl'])}" for row in rows),
                "rule": "not a test of the paper: 'held' means fold is at least as good as last at every k",
                "verdict": verdict(all(fold_better), any(fold_better))})

    closed = [1 - row["calibrated"]["kl"] / row["fold"]["kl"] for row in rows]
    out.append({"finding": "g", "title": "calibrated vs plain fusion",
                "paper": "not in the paper: it recovers fused models by knowledge distillation on billions of "
                         "tokens (Step 3 + KD beats the baseline: 85.28 vs 84.71)",
                "here": "; ".join(f"{row['steps']} steps: plain KL {format_kl(row['fold']['kl'])} -> calibrated "
                                  f"{format_kl(row['calibrated']['kl'])} ({100 * c:.0f}% of the gap closed), perplexity "
                                  f"{format_perplexity(row['fold']['perplexity'])} -> {format_perplexity(row['calibrated']['perplexity'])}"
                                  for row, c in zip(rows, closed))
                        + f"; weighting {r['calibration']['weighting']}, ridge {r['calibration']['ridge']:g}, "
                          "chosen on validation calibration text",
                "rule": "our addition: 'held' means calibration lowers the held-out KL at every k",
                "verdict": verdict(all(c > 0 for c in closed), any(c > 0 for c in closed))})
    return out
