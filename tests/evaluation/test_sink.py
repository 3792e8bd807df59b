"""The attention sink as a measured channel: a variant scored with the first token's stream put back
(reffuse.evaluation.prefix.sink_restored), and the dependency matrix of the first token alone."""

import numpy as np
import pytest

from reffuse.core.fusion import fuse
from reffuse.core.model import Block, Model
from reffuse.errors import ReffuseError
from reffuse.evaluation.prefix import cache_prefix, score_variant, sink_restored
from reffuse.method.metrics import dependency


@pytest.fixture
def windows():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, 16) for _ in range(3)]


def with_scaled_ffn(model: Model, layer: int, factor: float) -> Model:
    """The model with block `layer`'s FFN output scaled: a change to every token's stream."""
    blocks = list(model.blocks)
    block = blocks[layer]
    ffn = type(block.ffn)(block.ffn.norm_gain, block.ffn.gate, block.ffn.up, block.ffn.down * factor)
    blocks[layer] = Block(block.attention, ffn, block.fused_from)
    return Model(model.config, model.embed, blocks, model.norm_gain, model.lm_head)


def test_restoring_the_sink_of_the_base_model_changes_nothing(tiny64, windows):
    prefix = cache_prefix(tiny64, windows)
    assert sink_restored(prefix, tiny64, 4, 10).kl_from_base == pytest.approx(0, abs=1e-12)


def test_a_fused_run_scored_with_its_sink_restored(tiny64, windows):
    prefix = cache_prefix(tiny64, windows)
    fused = fuse(tiny64, [(4, 8)])
    plain = score_variant(prefix, fused, 4, kl_only=True).kl_from_base
    restored = sink_restored(prefix, fused, 4, 9, per_token=True)
    assert 0 <= restored.kl_from_base and restored.kl_from_base != plain
    assert [len(w) for w in restored.per_token.kl] == [15, 15, 15]
    # a change to every token's stream, restored at the first token only, is not undone
    scaled = with_scaled_ffn(tiny64, 5, 3.0)
    assert sink_restored(prefix, scaled, 5, 6).kl_from_base > 1e-10  # the base model restored: below 1e-12


def test_the_sink_is_restored_at_a_block_boundary_only(tiny64, windows):
    prefix = cache_prefix(tiny64, windows)
    fused = fuse(tiny64, [(4, 8)])
    with pytest.raises(ReffuseError, match="not a block boundary"):
        sink_restored(prefix, fused, 4, 6)  # inside the fused run
    with pytest.raises(ReffuseError, match="inside a parallel run"):
        sink_restored(prefix, tiny64, 0, 2, parallel=[(1, 3)], whole_blocks=True)


def test_the_first_token_alone_has_its_own_dependency_matrix(tiny64, windows):
    rest = dependency(tiny64, windows, granularities=("ffn",))
    sink = dependency(tiny64, windows, granularities=("ffn",), sink_only=True)
    assert sink.tokens_measured == len(windows) and rest.tokens_measured == 15 * len(windows)
    assert not sink.exclude_sink
    assert not np.allclose(np.nan_to_num(sink.matrices["ffn"]), np.nan_to_num(rest.matrices["ffn"]))
