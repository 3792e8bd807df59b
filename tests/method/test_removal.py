"""Attention and FFN removal: scores that equal a direct measurement, selection, and clear errors."""

import numpy as np
import pytest

from reffuse.errors import ReffuseError
from reffuse.evaluation.scoring import evaluate
from reffuse.core.model import FFN, Block, Model
from reffuse.evaluation.prefix import cache_prefix, score_variant
from reffuse.core.layout import attention_free_runs, attention_layers, format_layers, parse_layers
from reffuse.method.removal import (attention_scores, cheapest, drop_attention,
                             drop_ffns, ffn_scores)


@pytest.fixture
def windows():
    return np.random.default_rng(7).integers(0, 256, (2, 20))


def test_drop_attention_makes_a_new_model(tiny64):
    removed = drop_attention(tiny64, [2, 3])
    assert attention_layers(removed) == [0, 1, 10, 11]
    assert attention_layers(tiny64) == [0, 1, 2, 3, 10, 11]  # the original is untouched
    assert removed.blocks[2].ffn is tiny64.blocks[2].ffn      # weights shared, not copied
    assert attention_free_runs(removed) == [(2, 9)]


def test_prefix_scores_equal_full_evaluation(tiny64, windows):
    """score_variant re-runs only the blocks after the change; evaluate runs both models whole."""
    variant = drop_attention(tiny64, [10])
    fast = score_variant(cache_prefix(tiny64, windows), variant, 10)
    full = evaluate(variant, windows, tiny64)
    for key in ("perplexity", "kl_from_base", "top1_agreement", "base_perplexity"):  # the same float64 arithmetic,
        assert getattr(fast, key) == pytest.approx(getattr(full, key), rel=1e-9)     # reordered


def test_attention_scores_are_the_kl_of_each_removal(tiny64, windows):
    scores = attention_scores(tiny64, windows)
    assert sorted(scores) == attention_layers(tiny64)
    for layer in (0, 11):
        direct = evaluate(drop_attention(tiny64, [layer]), windows, tiny64).kl_from_base
        assert scores[layer] == pytest.approx(direct, rel=1e-9)
    assert all(s > 0 for s in scores.values())


def test_a_zero_ffn_costs_nothing_to_remove(tiny64, windows):
    blocks = list(tiny64.blocks)
    f = blocks[6].ffn
    blocks[6] = Block(None, FFN(f.norm_gain, f.gate, f.up, np.zeros_like(f.down)))
    model = Model(tiny64.config, tiny64.embed, blocks, tiny64.norm_gain, tiny64.lm_head)
    scores = ffn_scores(model, windows, layers=range(4, 10))
    assert scores[6] == 0.0
    assert cheapest(scores, 1) == [6]
    assert all(scores[i] > 0 for i in (4, 5, 7, 8, 9))


def test_drop_ffns_leaves_an_empty_block(tiny64, windows):
    removed = drop_ffns(tiny64, [5])
    assert removed.blocks[5].ffn is None and removed.blocks[5].attention is None
    assert attention_free_runs(removed) == [(6, 9)]
    assert np.isfinite(evaluate(removed, windows, tiny64).kl_from_base)


def test_cheapest_anywhere_and_contiguous():
    scores = {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.2, 4: 0.3, 6: 0.0}
    assert cheapest(scores, 2) == [1, 6]
    assert cheapest(scores, 3) == [1, 3, 6]
    # contiguous: windows 1-3 (0.8), 2-4 (1.0), 0-2 (1.5); 4-6 is not a window (5 is no candidate)
    assert cheapest(scores, 3, contiguous=True) == [1, 2, 3]
    with pytest.raises(ReffuseError, match="only 6 are candidates"):
        cheapest(scores, 7)
    with pytest.raises(ReffuseError, match="no 6 consecutive blocks"):
        cheapest(scores, 6, contiguous=True)


def test_layer_lists_parse_and_format():
    assert parse_layers("14-17") == [14, 15, 16, 17]
    assert parse_layers("3, 5,14-15") == [3, 5, 14, 15]
    assert format_layers([3, 5, 14, 15]) == "3,5,14-15"
    for text, message in [("4-x", "is not a block index or a range"), ("9-3", "is empty"), (",", "names no blocks")]:
        with pytest.raises(ReffuseError, match=message):
            parse_layers(text)


@pytest.mark.parametrize("layers, message", [
    ([12], "block 12 is out of range: the model has blocks 0..11"),
    ([-1], "block -1 is out of range"),
    ([5], "block 5 has no attention to remove"),
])
def test_bad_attention_removal(tiny64, layers, message):
    with pytest.raises(ReffuseError, match=message):
        drop_attention(tiny64, layers)


def test_bad_ffn_removal(tiny64):
    with pytest.raises(ReffuseError, match="block 5 has no FFN to remove"):
        drop_ffns(drop_ffns(tiny64, [5]), [5])
    with pytest.raises(ReffuseError, match="out of range"):
        ffn_scores(tiny64, [[1, 2, 3]], layers=[40])


def test_cheapest_windows_rank_the_contiguous_windows():
    from reffuse.method.removal import cheapest_windows
    scores = {0: 0.5, 1: 0.1, 2: 0.2, 3: 0.1, 4: 0.9, 6: 0.0}
    assert cheapest_windows(scores, 2, 3) == [[1, 2], [2, 3], [0, 1]]  # sums 0.3, 0.3 (earlier first), 0.6
    assert cheapest_windows(scores, 2, 1) == [cheapest(scores, 2, contiguous=True)]
    with pytest.raises(ReffuseError, match="there are 4"):
        cheapest_windows(scores, 2, 5)

