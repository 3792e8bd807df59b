"""Dependency metrics on models whose answers are known, against straightforward re-runs, and on bad input."""

import json
import math

import numpy as np
import pytest

import reffuse
from reffuse.cli import main
from reffuse.errors import ReffuseError
from reffuse.core.layout import full_blocks
from reffuse.method.metrics import (block_evaluations_needed, cosine_distance, dependency,
                             greedy_windows, matrix_from_json, matrix_to_json, residual_stream, window_statistics)
from reffuse.core.config import Config
from reffuse.core.model import FFN, Block, Model, rms_norm
from reffuse.method.removal import drop_attention
from reffuse.speed.timing import blas_threads

# Float64 rounding of a cosine distance computed from unit vectors is ~1e-32 for identical directions; anything
# below 1e-15 is zero for these constructions, and a real dependency in them is above 1e-4.
ZERO = 1e-15


def sequences():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, 20), rng.integers(0, 256, 13)]


def without(model, layer, part):
    """`model` with block `layer` removed ("block") or with its FFN removed ("ffn"), by plain list surgery."""
    blocks = list(model.blocks)
    if part == "block":
        del blocks[layer]
    else:
        blocks[layer] = Block(blocks[layer].attention, None)
    return Model(model.config, model.embed, blocks, model.norm_gain, model.lm_head)


def rerun_entry(model, seqs, i, j, granularity):
    """M[i, j] by re-running the whole model without block (or FFN) i on every sequence, sink excluded."""
    distances = []
    for ids in seqs:
        if granularity == "block":
            base, skipped = [], []
            reffuse.forward(model, ids, hidden_states=base)
            reffuse.forward(without(model, i, "block"), ids, hidden_states=skipped)
            h, h_skipped = base[j + 1] - base[j], skipped[j] - skipped[j - 1]  # block j is block j-1 without i
        else:
            base, skipped = residual_stream(model, ids), residual_stream(without(model, i, "ffn"), ids)
            h, h_skipped = base.inputs[j + 1] - base.mids[j], skipped.inputs[j + 1] - skipped.mids[j]
        distances.append(cosine_distance(h[1:], h_skipped[1:]))
    return float(np.concatenate(distances).mean())


def test_cosine_distance_definition():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    b = np.array([[0.0, 3.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(cosine_distance(a, b), [1.0, 0.0, 0.0, 1.0, 2.0], atol=1e-15)


def test_cached_matrix_equals_full_reruns(tiny64):
    seqs = sequences()
    counted = []
    result = dependency(tiny64, seqs, progress=counted.append)
    assert sum(counted) == result.block_evaluations == block_evaluations_needed(tiny64, len(seqs))
    assert result.tokens_measured == 19 + 12  # the first token of each sequence is the sink, not measured
    for granularity, i, j in [("block", 0, 1), ("block", 2, 9), ("block", 6, 11), ("ffn", 1, 3), ("ffn", 5, 7)]:
        assert result.matrices[granularity][i, j] == pytest.approx(rerun_entry(tiny64, seqs, i, j, granularity),
                                                                   abs=1e-12)
    for M in result.matrices.values():
        assert np.all(np.isnan(M[np.tril_indices(12)]))  # j <= i: nothing to measure
        assert np.all(np.isfinite(M[np.triu_indices(12, k=1)]))
    # in attention-free blocks the block is its FFN: the two granularities agree
    run = slice(4, 10)
    np.testing.assert_array_equal(result.matrices["block"][run, run], result.matrices["ffn"][run, run])


def test_per_block_metrics_and_sink(tiny64):
    seqs = sequences()
    with_sink = dependency(tiny64, seqs, exclude_sink=False, granularities=["block"])
    assert with_sink.tokens_measured == 33
    assert with_sink.sequence_lengths == [20, 13] and with_sink.exclude_sink is False
    stream = residual_stream(tiny64, seqs[1])
    x, fx = stream.inputs[3][1:], stream.inputs[4][1:]
    measured = dependency(tiny64, seqs[1:], granularities=["block"])
    assert measured.cos_dist_x_fx[3] == pytest.approx(cosine_distance(x, fx).mean(), abs=1e-12)
    ratio = np.linalg.norm(fx - x, axis=-1) / np.linalg.norm(x, axis=-1)
    assert measured.norm_ratio[3] == pytest.approx(ratio.mean(), abs=1e-12)
    assert measured.cos_dist_h_x[3] == pytest.approx(cosine_distance(fx - x, x).mean(), abs=1e-12)


def zeroed_ffn(model, layer):
    blocks = list(model.blocks)
    ffn = blocks[layer].ffn
    blocks[layer] = Block(blocks[layer].attention, FFN(ffn.norm_gain, ffn.gate, ffn.up, np.zeros_like(ffn.down)))
    return Model(model.config, model.embed, blocks, model.norm_gain, model.lm_head)


def test_zero_ffn_contributes_nothing_and_nothing_depends_on_it(tiny64):
    model = zeroed_ffn(zeroed_ffn(tiny64, 6), 2)  # 6 is attention-free, 2 has attention
    result = dependency(model, sequences())
    block, ffn = result.matrices["block"], result.matrices["ffn"]
    assert result.norm_ratio[6] == 0.0 and result.cos_dist_x_fx[6] == 0.0
    for M in (block, ffn):  # block 6 is only its (zero) FFN
        assert np.all(np.abs(M[6, 7:]) <= ZERO)
        assert np.all(np.abs(M[:6, 6]) <= ZERO)
    assert np.all(np.abs(ffn[2, 3:]) <= ZERO) and np.all(np.abs(ffn[:2, 2]) <= ZERO)
    assert np.all(block[2, 3:6] > 1e-4) and np.all(block[2, 7:] > 1e-4)  # block 2's attention still matters


def subspace_model(reads, writes, d=12, eps=1e-5, gate_scale=100.0, down_scale=0.002, seed=0):
    """Attention-free blocks, FFN k reading coordinates reads[k] and writing writes[k] (width 4 each).

    Coordinate 0 of every embedding is a constant 1 that no block writes, and every gate reads only it, scaled so
    that its pre-activation is far above 40: there silu(z) = z / (1 + e^-z) equals z exactly in float64, so each
    FFN is homogeneous of degree 2 in its normalised input (the updates are kept small, so that the stream's norm,
    which divides the gate's input, stays near 1). RMSNorm couples disjoint coordinates only through one
    scalar per token (the norm of the whole stream), which then scales an FFN's output without turning it.
    """
    rng = np.random.default_rng(seed)
    cfg = Config(vocab_size=32, dim=d, n_heads=1, n_kv_heads=1, head_dim=2, norm_eps=eps, name="subspaces")
    blocks = []
    for read, write in zip(reads, writes):
        gate = np.zeros((4, d))
        gate[:, 0] = gate_scale * (1 + rng.random(4))
        up, down = np.zeros((4, d)), np.zeros((d, 4))
        up[:, read] = rng.standard_normal((4, len(read)))
        down[write, :] = down_scale * rng.standard_normal((len(write), 4))
        blocks.append(Block(None, FFN(1 + 0.1 * rng.random(d), gate, up, down)))
    embed = rng.standard_normal((32, d))
    embed[:, 0] = 1.0
    return Model(cfg, embed, blocks, np.ones(d), embed)


def test_disjoint_subspaces_have_zero_dependency():
    sets = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]]
    ids = [np.arange(32), np.arange(31, -1, -1)[:20]]
    model = subspace_model(sets, sets)
    stream = residual_stream(model, ids[0])
    for block, x in zip(model.blocks, stream.inputs):  # the construction's premise: silu in its exact-linear range
        assert np.min(rms_norm(x, block.ffn.norm_gain, 1e-5) @ block.ffn.gate.T) > 40
    result = dependency(model, ids)
    for M in result.matrices.values():
        assert np.nanmax(M) <= ZERO
    # the control: block 1 also reads what block 0 writes, and then it depends on it
    coupled = dependency(subspace_model(reads=sets[:1] + sets[:1] + sets[2:], writes=sets), ids)
    assert coupled.matrices["block"][0, 1] > 1e-4


def linear_toy(reads, writes, d=10, seed=1):
    """Attention-free blocks that are exactly linear maps h_k = A_k x, with A_k returned explicitly.

    With norm_eps = 1e30, mean(x²) + eps rounds to eps, so RMSNorm is x · 1e-15 ⊙ gain: linear. Each gate reads
    only the constant coordinate 0 with a pre-activation far above 40, where silu is the identity in float64, so
    the gate is a constant per hidden unit and the FFN is linear in x.
    """
    model = subspace_model(reads, writes, d=d, eps=1e30, gate_scale=1e17, down_scale=1e12, seed=seed)
    maps = []
    for block in model.blocks:
        f = block.ffn
        z = f.gate[:, 0] * 1e-15 * f.norm_gain[0]       # the constant gate pre-activation (and silu's output)
        maps.append(f.down @ np.diag(z) @ f.up @ np.diag(1e-15 * f.norm_gain))  # [d, d]
    return model, maps


def test_linear_toy_with_disjoint_reads_and_writes_is_parallel():
    model, _ = linear_toy(reads=[[1, 2, 3]] * 3, writes=[[4, 5], [6, 7], [8, 9]])
    ids = np.arange(32)
    sequential = reffuse.forward(model, ids)
    parallel = reffuse.forward(model, ids, parallel_groups=[(0, 2)])
    np.testing.assert_allclose(parallel, sequential, rtol=0, atol=1e-12 * np.abs(sequential).max())
    assert np.nanmax(dependency(model, [ids]).matrices["block"]) <= ZERO


def test_linear_toy_dependency_has_its_closed_form():
    model, (A0, A1) = linear_toy(reads=[[1, 2, 3], [4, 5, 6]], writes=[[4, 5, 6], [7, 8, 9]])
    ids = np.arange(1, 32)
    x = model.embed[ids]
    h1, h1_without_0 = (x + x @ A0.T) @ A1.T, x @ A1.T  # block 1 reads what block 0 writes
    expected = cosine_distance(h1, h1_without_0).mean()
    measured = dependency(model, [ids], exclude_sink=False).matrices["block"][0, 1]
    assert expected > 1e-3
    assert measured == pytest.approx(expected, rel=1e-9)


def brute_windows(M, w):
    rows = []
    for s in range(len(M) - w + 1):
        pairs = [M[i, j] for i in range(s, s + w) for j in range(i + 1, s + w) if not math.isnan(M[i, j])]
        rows.append((max(pairs), sum(pairs)))
    return rows


def test_window_statistics_match_brute_force():
    M = np.random.default_rng(0).random((9, 9))
    M[np.tril_indices(9)] = np.nan
    for w in (2, 4, 9):
        rows = window_statistics(M, w)
        assert [(r.first, r.last) for r in rows] == [(s, s + w - 1) for s in range(10 - w)]
        np.testing.assert_allclose([(r.max, r.sum) for r in rows], brute_windows(M, w), rtol=1e-14)


def hand_made_matrix():
    """10 blocks, every pair at 0.5 except three cheap places. Windows of 3 (starts 0..7):
    start 6 (blocks 6-8): pairs 0.01, 0.01, 0.01          -> M_max 0.01,   M_sum 0.03
    start 1 (blocks 1-3): pairs 0.0102, 0.0102, 0.0001    -> M_max 0.0102, M_sum 0.0205 (within 5% of 0.01)
    start 4 (blocks 4-6): pairs 0.3, 0.3, 0.3             -> M_max 0.3,    M_sum 0.9
    every other window holds a 0.5 pair.
    """
    M = np.full((10, 10), 0.5)
    M[np.tril_indices(10)] = np.nan
    M[6, 7] = M[6, 8] = M[7, 8] = 0.01
    M[1, 2], M[1, 3], M[2, 3] = 0.0102, 0.0102, 0.0001
    M[4, 5] = M[4, 6] = M[5, 6] = 0.3
    return M


def chosen(steps):
    return [(s.first, s.last) for s in steps]


def test_greedy_selection_on_a_hand_made_matrix():
    # 1-3 ties with 6-8 on M_max and wins on M_sum; it removes windows 0-3; then 6-8 removes windows 4-7.
    steps = greedy_windows(hand_made_matrix(), window=3)
    assert chosen(steps) == [(1, 3), (6, 8)]
    assert steps[0].tied == (1, 6) and steps[0].candidates == 8 and steps[1].candidates == 4
    assert (steps[0].max, steps[0].sum) == pytest.approx((0.0102, 0.0205))
    # without a tolerance the lowest M_max comes first
    assert chosen(greedy_windows(hand_made_matrix(), window=3, tie_tolerance=0.0)) == [(6, 8), (1, 3)]
    # block 7 not eligible (as attention-free blocks are for the paper's full-block greedy): windows 5-7 are out,
    # so after 1-3 the best left is 4-6
    eligible = [True] * 10
    eligible[7] = False
    assert chosen(greedy_windows(hand_made_matrix(), window=3, eligible=eligible)) == [(1, 3), (4, 6)]
    assert chosen(greedy_windows(hand_made_matrix(), window=3, max_steps=1)) == [(1, 3)]


def test_greedy_exact_ties_go_to_the_earlier_window():
    M = np.full((6, 6), 0.1)
    M[np.tril_indices(6)] = np.nan
    assert chosen(greedy_windows(M, window=2)) == [(0, 1), (2, 3), (4, 5)]


def test_full_blocks(tiny32):
    assert full_blocks(tiny32) == [True] * 4 + [False] * 6 + [True] * 2


def test_matrix_json_round_trip():
    M = hand_made_matrix()
    rows = matrix_to_json(M)
    assert rows[0][0] is None and rows[1][2] == 0.0102
    np.testing.assert_array_equal(matrix_from_json(rows), M)


def test_bad_input(tiny32):
    M = hand_made_matrix()
    with pytest.raises(ReffuseError, match="longer than the model's 10 blocks"):
        window_statistics(M, 11)
    with pytest.raises(ReffuseError, match="longer than"):
        greedy_windows(M, 12)
    with pytest.raises(ReffuseError, match=">= 2"):
        window_statistics(M, 1)
    with pytest.raises(ReffuseError, match="square"):
        window_statistics(M[:4], 2)
    with pytest.raises(ReffuseError, match="eligible"):
        greedy_windows(M, 3, eligible=[True] * 4)
    with pytest.raises(ReffuseError, match="attention sink"):
        dependency(tiny32, [np.array([5])])
    with pytest.raises(ReffuseError, match="no token sequences"):
        dependency(tiny32, [])
    with pytest.raises(ReffuseError, match="granularity"):
        dependency(tiny32, sequences(), granularities=["layer"])
    with pytest.raises(ReffuseError, match="out of range"):
        dependency(tiny32, [np.array([1, 2, 999])])


# ---------------------------------------------------------------------------------------------------------------
# reffuse analyze, on the synthetic tiny model (random token ids)


def test_analyze_command_writes_what_it_measured(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", "tiny", "--dependency-tokens", "48", "--sequence-length", "24", "--drop-attention", "1-2",
                 "--max-group-size", "3", "--greedy-blocks", "all", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "analysis.json").read_text())
    assert printed["dependency"] == written["dependency"]
    from reffuse.method.analysis import Analysis
    assert Analysis.from_json(written).to_json() == written
    assert sorted(p.name for p in out.glob("*.png")) == ["block_metrics.png", "dependency_block.png",
                                                         "dependency_ffn.png", "layout.png", "windows.png"]
    tokens = written["tokens"]
    assert (tokens["sequences"], tokens["sequence_length"], tokens["measured"]) == (2, 24, 46)
    assert tokens["attention_sink_excluded"] is True
    assert written["attention_removed"] == [1, 2] and written["attention_free_runs"] == [[1, 2], [4, 9]]
    assert written["plan"]["groups"] == [[4, 5], [6, 8]] and written["plan"]["leave_out_last"] is True
    assert [r["first"] for r in written["windows"]["rows"]] == list(range(9))
    assert written["greedy"]["steps"][0]["step"] == 1
    # the recorded ids reproduce the recorded matrices, bit for bit on the command's BLAS threads (1 by default):
    # a product split over threads may round differently
    model = drop_attention(reffuse.load_model("tiny"), [1, 2])  # as the command loads it: on the same kernels
    with blas_threads(1):
        again = dependency(model, [np.array(ids) for ids in tokens["ids"]])
    for granularity, M in again.matrices.items():
        np.testing.assert_array_equal(matrix_from_json(written["dependency"][granularity]), M)
    assert written["dependency"]["block"][3][2] is None  # j < i: null in JSON


@pytest.mark.parametrize("argv, message", [
    (["--window-blocks", "13"], "longer than the model's 12 blocks"),
    (["--drop-attention", "10-12"], "out of range"),
    (["--drop-attention", "5"], "has no attention"),
    (["--dependency-tokens", "1"], "at least 2"),
    (["--max-group-size", "1"], "at least 2"),
])
def test_analyze_bad_input(tmp_path, capsys, argv, message):
    assert main(["analyze", "--model", "tiny", "--dependency-tokens", "16", "--no-figures", "--out", str(tmp_path)] + argv) == 2
    assert message in capsys.readouterr().err
