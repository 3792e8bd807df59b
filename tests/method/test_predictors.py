"""Predictors of fusion damage (reffuse.method.predictors) on the tiny model."""

import numpy as np
import pytest

from reffuse.core.model import FFN, Block, Model
from reffuse.evaluation.prefix import cache_prefix
from reffuse.method import predictors
from reffuse.method.metrics import dependency


@pytest.fixture
def setting(tiny64):
    ids = [np.random.default_rng(s).integers(0, 256, 24) for s in range(2)]
    M = dependency(tiny64, ids, granularities=("ffn",)).matrices["ffn"]
    M_sink = dependency(tiny64, ids, granularities=("ffn",), sink_only=True).matrices["ffn"]
    return tiny64, cache_prefix(tiny64, ids), M, M_sink


def test_every_contiguous_group_of_two_or_more():
    assert predictors.candidate_groups(4, 7) == [(4, 5), (4, 6), (4, 7), (5, 6), (5, 7), (6, 7)]


def test_every_predictor_for_every_group(setting):
    model, prefix, M, M_sink = setting
    groups = predictors.candidate_groups(4, 8)
    values = predictors.predictor_values(model, prefix, M, M_sink, groups)
    assert set(values) == set(groups) and all(set(v) == set(predictors.PREDICTORS) for v in values.values())
    assert all(np.isfinite(x) and x >= 0 for v in values.values() for x in v.values())
    # a wider group holds its narrower ones' dependency: cosine-M and neighbour damage only grow
    assert values[(4, 6)]["cosine-M"] >= values[(4, 5)]["cosine-M"]
    assert values[(4, 6)]["neighbour damage"] >= values[(4, 5)]["neighbour damage"]


def test_the_first_order_error_is_zero_when_the_later_ffn_is_constant(tiny64):
    """With block 5's down projection zero, FFN_5 is constant, its Jacobian zero: no first-order error."""
    blocks = list(tiny64.blocks)
    f = blocks[5].ffn
    blocks[5] = Block(None, FFN(f.norm_gain, f.gate, f.up, np.zeros_like(f.down)))
    model = Model(tiny64.config, tiny64.embed, blocks, tiny64.norm_gain, tiny64.lm_head)
    x = np.random.default_rng(0).standard_normal((6, tiny64.config.dim))
    assert predictors.first_order_error(model, (4, 5), x) == pytest.approx(0, abs=1e-12)
    assert predictors.first_order_error(tiny64, (4, 5), x) > 0


def test_compare_ranks_a_perfect_and_a_reversed_predictor():
    groups = [(0, k) for k in range(1, 9)]
    measured = {g: float(g[1]) for g in groups}
    values = {g: {name: float(g[1]) for name in predictors.PREDICTORS} for g in groups}
    values = {g: v | {"block influence": -float(g[1])} for g, v in values.items()}
    result = predictors.compare(values, measured)
    assert result["cosine-M"].spearman == pytest.approx(1.0)
    assert result["block influence"].spearman == pytest.approx(-1.0)
    low, high = result["cosine-M"].interval_95
    assert low <= 1.0 <= high + 1e-12


def test_the_neighbour_damage_matrix_holds_each_adjacent_pair_s_damage(setting):
    model, prefix, _, _ = setting
    C = predictors.neighbour_damage_matrix(model, prefix, [(4, 9)])
    pairs = predictors.damage(model, prefix, [(k, k + 1) for k in range(4, 9)])
    assert all(C[k, k + 1] == pytest.approx(kl) for (k, _), kl in pairs.items())
    assert C[4, 6] == 0 and np.isnan(C[3, 4]) and np.isnan(C[9, 10])
    # the planner sums it inside a group: a group's cost is its adjacent pairs' damage
    assert predictors.inside_dependency(C, 4, 7) == pytest.approx(sum(pairs[(k, k + 1)] for k in range(4, 7)))


@pytest.mark.slow
def test_the_planner_s_predictor_is_the_rule_s_choice_on_the_committed_regions():
    import json
    from pathlib import Path
    from reffuse.experiments.findings import StudyResult
    report = Path(__file__).resolve().parents[2] / "reports" / "experiments" / "smollm2_regions"
    regions = [StudyResult.from_json(json.loads((report / f"region-{k}" / "experiments.json").read_text()))
               .predictors.groups for k in range(1, 5)]
    choice = predictors.choose_predictor(regions)
    assert choice.chosen == predictors.PLANNER_PREDICTOR == "neighbour damage"
    lead = choice.predictors["neighbour damage"]
    assert lead.lead_over_cosine_m == pytest.approx(0.105, abs=5e-4) and lead.interval_95[0] > 0
    # the numbers the docstring quotes
    assert f"+{lead.lead_over_cosine_m:.3f} [+{lead.interval_95[0]:.3f}, +{lead.interval_95[1]:.3f}]" \
        in predictors.__doc__.replace("\n", " ")
    # without the adjacent pairs, whose neighbour damage is their damage, the lead is not resolved
    without = predictors.choose_predictor([[g for g in groups if g.group[1] - g.group[0] > 1] for groups in regions])
    lead = without.predictors["neighbour damage"]
    assert without.chosen == "angular distance" and lead.interval_95[0] < 0
    assert f"+{lead.lead_over_cosine_m:.3f} [{lead.interval_95[0]:.3f}, +{lead.interval_95[1]:.3f}]" \
        in predictors.__doc__.replace("\n", " ")


def test_choose_predictor_keeps_cosine_m_when_no_lead_is_resolved():
    rng = np.random.default_rng(0)
    groups = [predictors.GroupPrediction((0, d + 1), float(d), {name: float(d + rng.normal())
                                                                 for name in predictors.PREDICTORS}
                                         | {"cosine-M": float(d)})    # cosine-M ranks perfectly: nothing beats it
              for d in range(12)]
    assert predictors.choose_predictor([groups, groups]).chosen == "cosine-M"
