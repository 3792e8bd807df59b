"""Lecture 03, graded: one entry of the block-wise dependency matrix (the paper's §3) against the whole matrix of
reffuse.method.metrics.dependency, on the tiny model and on SmolLM2's first five blocks. The blocks handed to the
student are reffuse.core.model.block_forward, the plain forward's own."""

import itertools

import numpy as np
import pytest

from grading import check
from reffuse.core.model import block_forward
from reffuse.method.metrics import dependency


def grade_every_entry(graded, model, ids, what):
    M = dependency(model, [ids], granularities=("block",)).matrices["block"]   # [m, m], NaN where j <= i
    cos, sin = model.rope(np.arange(len(ids)))
    blocks = [lambda x, k=k: block_forward(model, k, x, cos, sin) for k in range(len(model.blocks))]
    x = model.embed[ids]                                                       # the stream entering block 0
    for i, j in itertools.combinations(range(len(model.blocks)), 2):
        check(f"dependency_entry(blocks, x, i={i}, j={j}) on {what}", graded.dependency_entry(blocks, x, i, j),
              M[i, j])


def test_dependency_entry(graded, tiny, rng):
    grade_every_entry(graded, tiny, rng.integers(0, tiny.config.vocab_size, 16), "tiny's 12 blocks, 16 tokens")


@pytest.mark.slow
def test_dependency_entry_smollm2(graded, smollm2_part, rng):
    first_five = smollm2_part(0, 5, rng.integers(0, 49152, 12))
    grade_every_entry(graded, first_five, np.arange(12), "SmolLM2's blocks 0-4, 12 tokens")
