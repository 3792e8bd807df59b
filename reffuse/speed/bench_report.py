"""A benchmark's verdicts and its report: the speed and training targets, the rule that turns measured ratios into
met, not met or unresolved (by reffuse.stats.verdict), and the Markdown of benchmarks/results/*.md."""

from __future__ import annotations

import math

from reffuse.records import NOT_RECORDED
from reffuse.speed.bench_result import BenchResult, Target
from reffuse.speed.environment import Environment, describe_blas
from reffuse.speed.timing import ratio_text
from reffuse.speed.train_result import TrainResult
from reffuse.stats import verdict

# The targets this benchmark checks, on 2 cores in float32 (reffuse's speed goals).
TARGETS = {
    "prefill": "prefill time <= 0.8x transformers' at every length",
    "decode": "decode tokens/s >= 2.5x transformers'",
    "decode_llamacpp": "decode tokens/s >= 0.5x llama.cpp's on the same F32 weights",
    "ffn_run_1": "fused FFN run >= 1.3x faster than sequential at 1 token",
    "ffn_run_large": "fused FFN run never slower than sequential at 128 and 512 tokens",
}


def target_side(higher_is_better: bool) -> str:
    """The side of its threshold a target asks for, the threshold itself included: ">=" or "<="."""
    return ">=" if higher_is_better else "<="


def target_verdict(intervals, threshold: float, higher_is_better: bool) -> str:
    """The rule that turns measured ratios into a verdict on a target: "met" when every 95% interval lies on the
    target's side of `threshold` (or on it), "not met" when some interval lies wholly on the other side,
    "unresolved" otherwise (an interval holds the threshold, or a ratio has none): reffuse.stats.verdict of each
    interval, "met" only when all are."""
    verdicts = [verdict(interval, threshold, target_side(higher_is_better)) for interval in intervals]
    if not verdicts:
        return "not measured"
    return "met" if all(v == "met" for v in verdicts) else "not met" if "not met" in verdicts else "unresolved"


def measured_ratios(ratios) -> list[tuple]:
    """(ratio, its 95% interval) of each (ratio, interval) that was measured (the ratio not None): a ratio
    recorded without an interval (NOT_RECORDED) is its own interval; one whose interval is None (too few repeats)
    has none."""
    return [(value, (value, value) if interval == NOT_RECORDED else interval) for value, interval in ratios
            if value is not None]


def judge_target(target: str, unit: str, measured, threshold: float, higher_is_better: bool) -> Target:
    """A target (its words) with the measured ratio that decides it, where it is checked at several lengths
    (measured: measured_ratios), that ratio's 95% interval and the verdict of target_verdict over all of them."""
    sign = 1 if higher_is_better else -1

    def deciding(m):  # one wholly on the wrong side first, else the one reaching furthest towards it
        reach = -math.inf if m[1] is None else min(sign * bound for bound in m[1])
        return (verdict(m[1], threshold, target_side(higher_is_better)) != "not met", reach)

    value, interval = min(measured, key=deciding) if measured else (None, None)
    return Target(target, value, None if interval is None else tuple(interval), unit,
                  target_verdict([m[1] for m in measured], threshold, higher_is_better))


def check_targets(result: BenchResult) -> tuple[Target, ...]:
    """Each speed target with the measured ratio (where it is checked at several lengths, the one that decides),
    its 95% interval and the verdict of target_verdict (judge_target). A ratio whose interval is None (too few
    repeats) leaves the target unresolved."""
    def check(name, unit, measured, threshold, higher_is_better):
        return judge_target(TARGETS[name], unit, measured, threshold, higher_is_better)

    ffn_rows, decode = result.ffn_run.rows, result.decode
    return (
        check("prefill", "reffuse/transformers time ratio, deciding length",
              measured_ratios((r.time_ratio, r.time_ratio_interval_95) for r in result.prefill), 0.8, False),
        check("decode", "reffuse/transformers tokens/s",
              measured_ratios([(decode.speedup, decode.speedup_interval_95)]), 2.5, True),
        check("decode_llamacpp", "reffuse/llama.cpp tokens/s",
              measured_ratios([(decode.fraction_of_llamacpp, decode.fraction_of_llamacpp_interval_95)]), 0.5, True),
        check("ffn_run_1", "sequential/fused time",
              measured_ratios((r.speedup, r.speedup_interval_95) for r in ffn_rows if r.tokens == 1), 1.3, True),
        check("ffn_run_large", "sequential/fused time, deciding length",
              measured_ratios((r.speedup, r.speedup_interval_95) for r in ffn_rows if r.tokens in (128, 512)), 1.0,
              True),
    )


# What a ratio is (reffuse.stats.paired_ratio); results made before it was recorded used the median of the
# repeats' paired ratios.
RATIO = "ratio of the medians"
EARLIER_RATIO = "median of the repeats' paired ratios"


def ratio_definition(result) -> str:
    """What a ratio of `result` (a BenchResult or a TrainResult) is."""
    return result.ratio or EARLIER_RATIO


def interval_definition(result) -> str:
    return ("its 95% bootstrap interval" if result.ratio is None
            else "the 95% bootstrap interval of the paired repeats")


def markdown(result: BenchResult, command: str | None = None) -> str:
    """The result as Markdown tables (benchmarks/results/*.md)."""
    env = result.environment
    blas = describe_blas(env)
    lines = [f"# reffuse bench: {result.model} ({result.model_name}), float32, {env.threads} "
             f"thread{'s' if env.threads != 1 else ''}", ""]
    if command:
        lines += ["Produced by:", "", f"    {command}", ""]
    lines += [f"Medians of {result.repeats} repeats after warm-up, timed in alternation; a ratio is the "
              + ratio_definition(result) + ", with " + interval_definition(result) + " in brackets. numpy "
              + env.numpy
              + (f", BLAS {blas}" if blas else "")
              + (f", torch {env.torch}, transformers {env.transformers}" if env.torch else "")
              + load_and_machine(env)]
    if not result.transformers.used:
        lines += ["", f"transformers not measured: {result.transformers.reason}"]
    lines += ["", "| prefill tokens | reffuse ms | transformers ms | reffuse / transformers time (95% interval) |",
              "|---:|---:|---:|---:|"]
    for r in result.prefill:
        hf = r.transformers_seconds
        lines.append(f"| {r.tokens} | {1e3 * r.reffuse_seconds:.1f} | "
                     + (f"{1e3 * hf:.1f} | {ratio_text(r.time_ratio, r.time_ratio_interval_95)} |" if hf else
                        "- | - |"))
    d = result.decode
    lines += ["", f"| decode ({d.new_tokens} tokens after {d.prompt_tokens}) | reffuse tokens/s | "
                  "transformers tokens/s | reffuse / transformers (95% interval) |", "|---|---:|---:|---:|"]
    hf = d.transformers_tokens_per_second
    lines.append(f"| greedy, KV cache | {d.reffuse_tokens_per_second:.1f} | "
                 + (f"{hf:.1f} | {ratio_text(d.speedup, d.speedup_interval_95)} |" if hf else "- | - |"))
    if d.same_greedy_tokens is not None:
        lines += ["", f"Same greedy tokens from both: {'yes' if d.same_greedy_tokens else 'no'}."]
    if result.llama_cpp is not None and result.llama_cpp.used:
        lines += ["", f"llama.cpp (llama-cpp-python {env.llama_cpp_python or '?'}) on the same weights as an F32 "
                      "GGUF, F32 KV cache, the same threads, in the same alternation:", "",
                  "| | reffuse | llama.cpp | reffuse / llama.cpp (95% interval) |", "|---|---:|---:|---:|"]
        for r in result.prefill:
            lines.append(f"| prefill {r.tokens} tokens, ms | {1e3 * r.reffuse_seconds:.1f} | "
                         f"{1e3 * r.llamacpp_seconds:.1f} | "
                         f"{ratio_text(r.llamacpp_time_ratio, r.llamacpp_time_ratio_interval_95)} the time |")
        lines.append(f"| decode, tokens/s | {d.reffuse_tokens_per_second:.1f} | "
                     f"{d.llamacpp_tokens_per_second:.1f} | "
                     f"{ratio_text(d.fraction_of_llamacpp, d.fraction_of_llamacpp_interval_95)} the speed |")
        fusion = result.llama_cpp.fusion
        paired = fusion.fused_speedup_paired
        lines += ["", f"Fusion in llama.cpp: decode of the model with attention removed in "
                      f"{list(fusion.attention_removed) or 'no block (it has an attention-free run)'} "
                      f"({fusion.removed_tokens_per_second:.1f} tokens/s) against the same with "
                      f"{', '.join(f'{a}-{b}' for a, b in fusion.groups)} fused ({fusion.fused_tokens_per_second:.1f} "
                      f"tokens/s): {fusion.fused_speedup:.3f}x, 95% interval {paired.interval_95[0]:.3f}-"
                      f"{paired.interval_95[1]:.3f} over {paired.repeats} paired repeats: "
                      + ("resolved." if paired.resolved else "not resolved (the interval holds 1).")]
    if result.bound is not None:
        b, bw = result.bound, result.bound.bandwidth
        lines += ["", f"The bound on decode: a step reads every weight once, {b.weight_bytes / 1e6:.0f} MB; NumPy "
                      f"streams {bw.gemv_out_in_bytes_per_second / 1e9:.1f} GB/s here in a GEMV over weights stored "
                      f"(out, in), as reffuse stores them ({bw.gemv_in_out_bytes_per_second / 1e9:.1f} GB/s stored "
                      f"(in, out)), and {bw.copy_bytes_per_second / 1e9:.1f} GB/s in a copy: at most "
                      f"{b.tokens_per_second:.1f} tokens/s.", "",
                  "| engine | decode tokens/s | fraction of the bound |", "|---|---:|---:|"]
        for engine, fraction in b.fractions.items():
            lines.append(f"| {engine} | {fraction * b.tokens_per_second:.1f} | {fraction:.0%} |")
    f = result.ffn_run
    lines += ["", f"Fused-FFN microbenchmark: a run of {f.blocks} FFNs (d={f.dim}, widths "
                  f"{'/'.join(map(str, sorted(set(f.widths))))}), fused into one of width {f.fused_width}.", "",
              "| tokens | sequential ms | fused ms | sequential / fused (95% interval) |", "|---:|---:|---:|---:|"]
    for r in f.rows:
        lines.append(f"| {r.tokens} | {1e3 * r.sequential:.2f} | {1e3 * r.fused:.2f} | "
                     f"{ratio_text(r.speedup, r.speedup_interval_95)} |")
    lines += ["", "Each ratio is the " + ratio_definition(result) + "; a target is met when the 95% interval of "
                  "every ratio it checks lies on its side, not met when one lies wholly on the other, and unresolved "
                  "otherwise.", "", "| target | measured | 95% interval | verdict |", "|---|---:|---:|:---:|"]
    return "\n".join(lines + target_rows(result.targets)) + "\n"


def load_and_machine(env: Environment) -> str:
    """The sentence of a report on the load while it ran and the machine it ran on."""
    def load(value):
        return float("nan") if value is None else value

    return (f". Load average (1 min) {load(env.load_average_1min_at_start):.1f} at the start, "
            f"{load(env.load_average_1min_at_end):.1f} at the end, this run included (on a {env.cores}-core "
            "machine" + (f", {env.processor}" if env.processor else "") + ").")


def target_rows(targets) -> list[str]:
    """The rows of a Markdown table | target | measured | 95% interval | verdict |, one per Target."""
    rows = []
    for t in targets:
        value = "-" if t.measured is None else f"{t.measured:.2f} ({t.unit})"
        # three decimals: an interval that stops just short of a threshold must not print as reaching it
        interval = "-" if t.interval_95 is None else f"{t.interval_95[0]:.3f}-{t.interval_95[1]:.3f}"
        shown = t.verdict if t.verdict in ("met", "not measured") else f"**{t.verdict}**"
        rows.append(f"| {t.target} | {value} | {interval} | {shown} |")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# `reffuse bench --train` (speed.train_bench): its targets and its Markdown record

# The targets, on 2 threads in float32 at 512 tokens (reffuse's training goals).
TARGET_THREADS, TARGET_TOKENS = 2, 512
SPEED_RATIO = 1.0                  # reffuse tokens/s over PyTorch's, --train all
PEAK_RSS_BYTES = 3 * 2 ** 30       # reffuse's peak resident memory in a training step
TRAIN_TARGETS = {"train_speed": "training tokens/s >= 1.0x PyTorch's (--train all, 512 tokens, 2 threads)",
                 "train_memory": "reffuse's peak resident memory < 3 GiB (every trainable set, 512 tokens)"}


def check_train_targets(result: TrainResult) -> tuple[Target, Target]:
    """The two training targets with what was measured and the verdict: the speed target from the 95% interval
    of the --train all ratio (target_verdict), only when measured at TARGET_TOKENS tokens on TARGET_THREADS
    threads; the memory target from reffuse's largest peak over the rows at TARGET_TOKENS tokens, strictly
    under PEAK_RSS_BYTES."""
    rows = [r for r in result.rows if r.tokens == TARGET_TOKENS]
    speed = [r for r in rows if r.train == "all" and r.speed_ratio is not None
             and result.environment.threads == TARGET_THREADS]
    peak = max((r.reffuse.peak_rss_bytes for r in rows), default=None)
    return (Target(TRAIN_TARGETS["train_speed"], speed[0].speed_ratio if speed else None,
                   speed[0].speed_ratio_interval_95 if speed else None, "reffuse/PyTorch tokens/s",
                   target_verdict([r.speed_ratio_interval_95 for r in speed], SPEED_RATIO, True)),
            Target(TRAIN_TARGETS["train_memory"], None if peak is None else peak / 2 ** 30, None,
                   "GiB, largest reffuse peak",
                   "not measured" if peak is None else verdict([peak, peak], PEAK_RSS_BYTES, "<")))


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def train_markdown(result: TrainResult, command: str | None = None) -> str:
    """The result as Markdown (for benchmarks/results/*.md)."""
    env = result.environment
    blas = describe_blas(env)
    h = result.hyperparameters
    lines = [f"# reffuse bench --train: {result.model} ({result.model_name}), float32, {env.threads} "
             f"thread{'s' if env.threads != 1 else ''}", ""]
    if command:
        lines += ["Produced by:", "", f"    {command}", ""]
    libraries = next((r.pytorch.libraries for r in result.rows if r.pytorch and r.pytorch.libraries), None)
    torch_blas, kernels = (libraries.torch_blas, libraries.cpu_capability) if libraries else (None, None)
    lines += [f"One training step on {result.text}: forward, mean next-token cross-entropy, backward to every "
              f"trainable weight, clipping by global norm ({h.clip}) and one AdamW step (lr {h.learning_rate}, "
              f"betas {h.betas}, eps {h.eps}, weight decay {h.weight_decay} on matrices). Each engine "
              f"runs in a worker process of its own (its peak resident memory is its own); the two take steps in "
              f"turns, the order swapped every round, {result.repeats} timed steps each after one untimed warm-up "
              "step; tokens/s are the window's tokens over the median step; a ratio is the " +
              ratio_definition(result).replace("repeats'", "rounds'") + " with "
              + interval_definition(result).replace("repeats", "rounds") + " in brackets. numpy " + env.numpy
              + (f", BLAS {blas}" if blas else "")
              + (f"; torch {env.torch} ({torch_blas or '?'}, {kernels or '?'} kernels), transformers "
                 f"{env.transformers}" if env.torch else "")
              + load_and_machine(env)]
    if not result.pytorch_used:
        lines += ["", "PyTorch not measured (--no-transformers)."]
    lines += ["", "| trainable | tensors (parameters) | tokens | reffuse tokens/s | PyTorch tokens/s | "
                  "reffuse / PyTorch tokens/s (95% interval) | reffuse peak RSS | PyTorch peak RSS |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        ours, theirs = r.reffuse, r.pytorch
        lines.append(f"| {r.train} | {r.trainable_tensors} ({r.trainable_parameters / 1e6:.1f}M) | "
                     f"{r.tokens} | {ours.tokens_per_second:.1f} | "
                     + (f"{theirs.tokens_per_second:.1f} | "
                        f"{ratio_text(r.speed_ratio, r.speed_ratio_interval_95)} | " if theirs else "- | - | ")
                     + f"{gib(ours.peak_rss_bytes)} | "
                     + (f"{gib(theirs.peak_rss_bytes)} |" if theirs else "- |"))
    lines.append("")
    for r in result.rows:
        ours, theirs = r.reffuse, r.pytorch
        lines.append(f"- --train {r.train}: reffuse {ours.median_step_seconds:.2f} s a step, "
                     f"{gib(ours.rss_after_setup_bytes)} resident before the first step"
                     + (f"; PyTorch ({theirs.implementation}) {theirs.median_step_seconds:.2f} s, "
                        f"{gib(theirs.rss_after_setup_bytes)} before the first step; loss at the loaded weights "
                        f"{ours.losses[0]:.5f} (reffuse) and {theirs.losses[0]:.5f} (PyTorch), relative "
                        f"difference {r.first_loss_relative_difference:.1e}, at most "
                        f"{r.worst_loss_relative_difference:.1e} over all {len(ours.losses)} steps"
                        if theirs else "") + ".")
    lines += ["", "A target is met when its 95% interval lies on its side, not met when it lies wholly on the other, "
                  "unresolved otherwise; the memory target is one measurement.", "",
              "| target | measured | 95% interval | verdict |", "|---|---:|---:|:---:|"]
    return "\n".join(lines + target_rows(result.targets)) + "\n"
