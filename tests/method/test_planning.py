"""Fusion planning on hand-made dependency matrices: where runs are cut, what is left out, and bad input."""

import numpy as np
import pytest

import reffuse
from reffuse.errors import ReffuseError
from reffuse.method.planning import inside_dependency, propose_groups, split_run
from reffuse.method.removal import drop_attention


def flat_matrix(m=12, value=0.01):
    M = np.full((m, m), value)
    M[np.tril_indices(m)] = np.nan
    return M


def test_one_group_per_run_without_its_last_ffn(tiny32):
    plan = propose_groups(tiny32, flat_matrix())  # tiny's attention-free run is 4-9
    assert plan.groups == [(4, 8)]
    assert plan.runs[0]["run"] == [4, 9] and plan.runs[0]["span"] == [4, 8]
    assert propose_groups(tiny32, flat_matrix(), leave_out_last=False).groups == [(4, 9)]
    fused = reffuse.fuse(tiny32, plan.groups)  # the plan is what fuse takes
    assert len(fused.blocks) == 12 - 4


def test_cut_falls_where_dependency_crosses(tiny32):
    M = flat_matrix()
    M[6, 7] = 0.5  # block 7 depends strongly on block 6: they must not share a group
    plan = propose_groups(tiny32, M, max_group_size=3)
    assert plan.groups == [(4, 6), (7, 8)]
    assert plan.runs[0]["across"] == [pytest.approx(0.01 * 5 + 0.5)]  # pairs (4..6) x (7..8)
    M[6, 7], M[5, 6] = 0.01, 0.5
    assert propose_groups(tiny32, M, max_group_size=3).groups == [(4, 5), (6, 8)]


def test_size_cap_and_groups_per_run(tiny32):
    # 5 blocks (4-8), cap 2 -> 3 pieces: two pairs and one single block, which is not a group
    plan = propose_groups(tiny32, flat_matrix(), max_group_size=2)
    assert [tuple(p) for p in plan.runs[0]["pieces"]] == [(4, 5), (6, 7), (8, 8)]
    assert plan.groups == [(4, 5), (6, 7)]
    # equal dependency everywhere: 3+2 and 2+3 leave 4 pairs inside each; the tie goes to the later cut
    assert propose_groups(tiny32, flat_matrix(), groups_per_run=2).groups == [(4, 6), (7, 8)]
    # 4+1 would leave 6 pairs inside: balanced pieces win
    assert propose_groups(tiny32, flat_matrix(), max_group_size=4).groups == [(4, 6), (7, 8)]
    assert propose_groups(tiny32, flat_matrix(), leave_out_last=False, groups_per_run=3).groups == \
        [(4, 5), (6, 7), (8, 9)]
    for first, last in propose_groups(tiny32, flat_matrix(), max_group_size=3).groups:
        assert last - first + 1 <= 3


def test_split_run_is_optimal_by_brute_force():
    rng = np.random.default_rng(0)
    M = rng.random((9, 9))
    M[np.tril_indices(9)] = np.nan
    pieces = split_run(M, 1, 8, 3, 4)

    def cost(cuts):
        bounds = [1, *cuts, 9]
        return sum(inside_dependency(M, a, b - 1) for a, b in zip(bounds, bounds[1:]))

    best = min(cost((a, b)) for a in range(2, 9) for b in range(a + 1, 9)
               if max(a - 1, b - a, 9 - b) <= 4)
    assert sum(inside_dependency(M, a, b) for a, b in pieces) == pytest.approx(best)


def test_runs_made_by_attention_removal(tiny32):
    model = drop_attention(tiny32, [1, 2])  # runs 1-2 (two blocks, the last left out -> nothing) and 4-9
    plan = propose_groups(model, flat_matrix())
    assert plan.groups == [(4, 8)]
    assert plan.runs[0]["note"] == "fewer than 2 blocks to fuse"
    assert propose_groups(model, flat_matrix(), leave_out_last=False).groups == [(1, 2), (4, 9)]


def test_no_attention_free_runs_gives_no_groups(tiny32):
    blocks = [reffuse.core.model.Block(b.attention or tiny32.blocks[0].attention, b.ffn) for b in tiny32.blocks]
    model = reffuse.Model(tiny32.config, tiny32.embed, blocks, tiny32.norm_gain, tiny32.lm_head)
    assert propose_groups(model, flat_matrix()).groups == []


def test_bad_input(tiny32):
    with pytest.raises(ReffuseError, match="out of range"):
        propose_groups(tiny32, flat_matrix(), runs=[(8, 12)])
    with pytest.raises(ReffuseError, match="has attention"):
        propose_groups(tiny32, flat_matrix(), runs=[(2, 6)])
    with pytest.raises(ReffuseError, match="model has 12 blocks"):
        propose_groups(tiny32, flat_matrix(10))
    with pytest.raises(ReffuseError, match="at least 2"):
        propose_groups(tiny32, flat_matrix(), max_group_size=1)
    with pytest.raises(ReffuseError, match="at least 1"):
        propose_groups(tiny32, flat_matrix(), groups_per_run=0)
    M = flat_matrix()
    M[5, 7] = np.nan
    with pytest.raises(ReffuseError, match="no entry"):
        propose_groups(tiny32, M)
    with pytest.raises(ReffuseError, match="square"):
        propose_groups(tiny32, np.zeros((12, 3)))
