"""Lecture 02, graded: Theorem 3.1's fusion of a run of FFNs with unequal widths, and folding the norm gains,
against reffuse.core.fusion.fuse_ffns and the parallel form reffuse.core.model.parallel_forward (eq. 5), on the
tiny model's attention-free run and on SmolLM2's FFNs 5-8. The fused weights are evaluated with reffuse's own
swiglu, so these tests grade fusion alone."""

import numpy as np
import pytest

from grading import check, parts
from reffuse.core.fusion import fuse_ffns
from reffuse.core.model import FFN, parallel_forward, rms_norm, swiglu
from reffuse.method.removal import drop_attention

WEIGHTS = ("w_gate*", "w_up*", "w_down*")


def as_tuples(ffns):
    return [(f.gate, f.up, f.down) for f in ffns]


def student_fused(graded, ffns, what):
    """The student's fused FFN as reffuse's FFN, with a unit gain: what the fused block reads is x / rms(x)."""
    gate, up, down = parts(what, graded.fuse_ffns(as_tuples(ffns)), WEIGHTS)
    return FFN(np.ones(gate.shape[1]), gate, up, down)


def test_fuse_ffns_stacks_the_hidden_units(graded, tiny):
    run = [b.ffn for b in tiny.blocks[4:9]]                          # widths 64, 192, 96, 128, 160
    what = f"fuse_ffns of 5 FFNs of widths {[f.width for f in run]}"
    got = parts(what, graded.fuse_ffns(as_tuples(run)), WEIGHTS)
    want = fuse_ffns(run, norm="last")                               # the plain concatenation
    for name, ours, theirs in zip(WEIGHTS, got, (want.gate, want.up, want.down)):
        check(f"{what}: {name}", ours, theirs, rtol=0)  # a concatenation does no arithmetic: bit for bit


def test_fused_ffn_is_the_sum(graded, tiny, rng):
    run = [b.ffn for b in tiny.blocks[4:9]]
    u = rms_norm(rng.standard_normal((11, tiny.config.dim)), np.ones(tiny.config.dim), 1e-5)
    fused = student_fused(graded, run, "fuse_ffns")
    # the same products, added in another order: equal to rounding (RTOL)
    check("swiglu(u, fused) against Σ_k swiglu(u, FFN_k)", swiglu(fused, u), sum(swiglu(f, u) for f in run))


def test_fold_norm_gain(graded, tiny):
    ffn = tiny.blocks[5].ffn
    got = parts("fold_norm_gain(gain, w_gate, w_up)", graded.fold_norm_gain(ffn.norm_gain, ffn.gate, ffn.up),
                ("w_gate'", "w_up'"))
    folded = fuse_ffns([ffn], norm="fold")                           # one FFN, its gain folded in
    check("fold_norm_gain: w_gate'", got[0], folded.gate)
    check("fold_norm_gain: w_up'", got[1], folded.up)


def fold_and_fuse(graded, run):
    """Each FFN's own gain folded into its projections, then the run fused: the fused block of norm="fold"."""
    folded = []
    for f in run:
        gate, up = parts("fold_norm_gain", graded.fold_norm_gain(f.norm_gain, f.gate, f.up), ("w_gate'", "w_up'"))
        folded.append(FFN(f.norm_gain, gate, up, f.down))
    return student_fused(graded, folded, "fuse_ffns of folded FFNs")


def test_folded_fusion_equals_the_parallel_form(graded, tiny, rng):
    """x + FFN*(x / rms(x)) against eq. 5 with every block's own norm, x + Σ_k FFN_k(η_k(x))."""
    x = 3 * rng.standard_normal((11, tiny.config.dim))               # a residual stream entering block 4
    fused = fold_and_fuse(graded, [b.ffn for b in tiny.blocks[4:9]])
    got = x + swiglu(fused, rms_norm(x, fused.norm_gain, tiny.config.norm_eps))
    check("blocks 4-8 of tiny fused with folded gains, against parallel_forward (eq. 5)", got,
          parallel_forward(tiny, 4, 8, x, None, None))


@pytest.mark.slow
def test_smollm2_ffns_5_to_8(graded, smollm2_part, rng):
    part = drop_attention(smollm2_part(5, 9, rng.integers(0, 49152, 8)), range(4))   # an attention-free run
    run = [b.ffn for b in part.blocks]
    fused = fold_and_fuse(graded, run)
    want = fuse_ffns(run, norm="fold")
    for name, ours, theirs in zip(WEIGHTS, (fused.gate, fused.up, fused.down), (want.gate, want.up, want.down)):
        check(f"SmolLM2's FFNs 5-8 folded and fused: {name}", ours, theirs)
    x = part.embed                                                   # 8 token embeddings as a stream [8, d]
    check("SmolLM2's FFNs 5-8 as one, against parallel_forward (eq. 5)",
          x + swiglu(fused, rms_norm(x, fused.norm_gain, part.config.norm_eps)),
          parallel_forward(part, 0, 3, x, None, None))
