"""`reffuse analyze` on SmolLM2, checked by an independent implementation from the tokens it recorded.

The independent side shares nothing with reffuse.method.metrics: for M[i, j] it re-runs the whole model with block i
deleted (plain `reffuse.forward` with `hidden_states`, no cached prefix, no skip passes), takes block j's
contribution in both runs from the residual streams, and averages 1 - a·b / (|a| |b|) in float64 over the
positions analyze measured (all but the first, the attention sink). The acceptance criterion is agreement to 1e-3;
both sides run the same float32 arithmetic in a different order, so they differ by float32 rounding (~1e-6).
"""

import dataclasses
import json

import numpy as np
import pytest

import reffuse
from reffuse.cli import main

PAIRS = [(3, 4), (9, 22)]  # a neighbour and a distant pair


def independent_entry(model, sequences, i, j, exclude_sink=True) -> float:
    """M[i, j] from two full forward passes per sequence: the model as it is, and without block i."""
    without_i = dataclasses.replace(model, blocks=model.blocks[:i] + model.blocks[i + 1:])
    first = 1 if exclude_sink else 0
    distances = []
    for ids in sequences:
        base, skipped = [], []
        reffuse.forward(model, ids, hidden_states=base)        # base[k]: the stream entering block k
        reffuse.forward(without_i, ids, hidden_states=skipped)
        h = np.asarray(base[j + 1] - base[j], dtype=np.float64)[first:]            # block j's contribution
        h_skipped = np.asarray(skipped[j] - skipped[j - 1], dtype=np.float64)[first:]  # block j sits at j - 1
        cos = np.sum(h * h_skipped, axis=-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(h_skipped, axis=-1))
        distances.append(1.0 - cos)
    return float(np.concatenate(distances).mean())


def test_analyze_entries_agree_with_full_reruns(smollm2, tmp_path, capsys):
    assert main(["analyze", "--model", "smollm2", "--dependency-tokens", "48", "--out", str(tmp_path), "--no-figures"]) == 0
    capsys.readouterr()
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    tokens = analysis["tokens"]
    assert tokens["split"] == "calibration" and tokens["spans"][0]["play"] == "macbeth_gut"
    assert tokens["attention_sink_excluded"] and tokens["measured"] == 47
    sequences = [np.array(ids) for ids in tokens["ids"]]
    for i, j in PAIRS:
        recorded = analysis["dependency"]["block"][i][j]
        assert recorded == pytest.approx(independent_entry(smollm2, sequences, i, j), abs=1e-3)
        assert recorded > 1e-3  # a real dependency, not two zeros agreeing
