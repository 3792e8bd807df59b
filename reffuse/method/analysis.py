"""The dependency analysis of one model, as `reffuse analyze` runs it (its --help says what is measured):
optionally removing attention first, then the dependency matrices, per-block metrics, window statistics, the
paper's greedy selection and a fusion plan, all on calibration text (or random ids for a synthetic model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from reffuse.core.layout import attention_free_runs, full_blocks
from reffuse.core.model import layout
from reffuse.errors import ReffuseError
from reffuse.options import FromArguments, as_recorded
from reffuse.formats.corpus import calibration_windows
from reffuse.formats.registry import check_tokenizer, load_model, load_tokenizer
from reffuse.method.metrics import (DEFINITIONS, GRANULARITIES, TIE_TOLERANCE, block_evaluations_needed, check_window,
                                    dependency, greedy_windows, matrix_to_json, window_statistics)
from reffuse.method.pipeline import choose_attention_removal, is_synthetic
from reffuse.method.planning import propose_groups
from reffuse.method.removal import drop_attention
from reffuse.progress import Progress

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


def analysis_tokens(options, model) -> tuple[np.ndarray, dict]:
    """Token ids [n_sequences, sequence_length] and where they came from: calibration text, or random ids for a
    synthetic model (which has no tokenizer and no notion of text)."""
    tokens = options.dependency_tokens
    length = options.sequence_length or tokens
    if tokens < 2 or length < 2:
        raise ReffuseError(f"--dependency-tokens {tokens} and --sequence-length {length} must be at least 2")
    if length > tokens:
        raise ReffuseError(f"--sequence-length {length} is longer than --dependency-tokens {tokens}")
    if is_synthetic(options.model, model) and options.tokenizer is None:
        rng = np.random.default_rng(options.seed)
        ids = rng.integers(0, model.config.vocab_size, (tokens // length, length))
        return ids, {"split": f"random token ids (seed {options.seed}): {options.model} is synthetic", "spans": []}
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    check_tokenizer(tokenizer, model, options.model)
    windows = calibration_windows(tokenizer, length, tokens)
    described = windows.describe()
    return windows.ids, {"split": described["split"], "spans": described["spans"],
                         "tokenizer": as_recorded(options.tokenizer or options.model)}


def remove_attention(options, model, sequences) -> tuple:
    """The model with attention removed as asked, the removed blocks, and how they were chosen
    (reffuse.method.pipeline.choose_attention_removal, scored on the analysis tokens)."""
    if options.drop_attention is None and options.drop_attention_count is None:
        return model, [], {"how": "none", "blocks": "-"}
    choice = choose_attention_removal(model, list(sequences), blocks=options.drop_attention,
                                      count=options.drop_attention_count, contiguous=True)
    how = {"how": choice["rule"] + ("" if choice["scores"] is None else ", by KL of removing each attention alone "
                                                                        "on the analysis tokens"),
           "blocks": choice["blocks_text"], "joint_kl": choice["joint_kl"]}
    if choice["scores"] is not None:
        how["kl_scores"] = choice["scores"]
    return drop_attention(model, choice["blocks"]), choice["blocks"], how


def analyze(options: AnalysisOptions) -> dict:
    """Everything analysis.json holds (see the module docstring)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model = load_model(options.model, dtype=options.dtype, device=options.device)
    check_window(options.window_blocks, len(model.blocks))
    ids, source = analysis_tokens(options, model)
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
    tokens = {**source, "sequences": len(sequences), "sequence_length": int(ids.shape[1]),
              "total": int(ids.size), "measured": measured.tokens_measured,
              "attention_sink_excluded": not options.include_sink, "ids": ids.tolist()}
    return {
        "model": {"name": as_recorded(options.model), "config_name": model.config.name, "dtype": options.dtype,
                  "blocks": len(model.blocks), "layout": layout(model).rows()},
        "attention_removed": removed,
        "attention_removal": removal,
        "attention_free_runs": [list(r) for r in attention_free_runs(model)],
        "tokens": tokens,
        "definitions": DEFINITIONS,
        "dependency": {g: matrix_to_json(measured.matrices[g]) for g in GRANULARITIES},
        "per_block": {k: [float(v) for v in values] for k, values in measured.per_block.items()},
        "windows": {"length": options.window_blocks, "granularity": "block",
                    "rows": window_statistics(block_matrix, options.window_blocks)},
        "greedy": {"granularity": "block", "blocks": options.greedy_blocks, "tie_tolerance": TIE_TOLERANCE,
                   "steps": steps},
        "plan": plan.to_json(),
        "block_evaluations": measured.block_evaluations,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
