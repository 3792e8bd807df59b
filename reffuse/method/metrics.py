"""Dependency metrics (the paper's §3): how much each block's contribution changes when an earlier block is skipped.

In the paper's notation, for blocks f_0 .. f_{m-1} and the residual stream x_0 (the embedding), x_{j+1} = f_j(x_j):

    h^j(X)       = f_j(x_j) - x_j              block j's contribution (its update of the residual stream)
    h~^j_i(X)                                  block j's contribution when block i is skipped (x_{i+1} = x_i)
    M[i, j]      = mean_t cosdist(h^j_t, h~^j_{i,t})    for j > i; NaN for j <= i (nothing to measure)
    cosdist(a, b) = 1 - a·b / (|a| |b|)

Small M[i, j] means block j barely notices block i, so the two can run in parallel (eq. 5). At FFN granularity
only FFN sub-blocks are skipped and measured: h^j is then block j's FFN output, FFN_j(η2(g_j(x_j))), and block i's
attention still runs when its FFN is skipped. In an attention-free block the block is its FFN, so both
granularities agree there, and one skip pass serves both. A sub-block replaced by a linear map (Nemotron-NAS
`replace_with_linear`) is that block's attention or FFN here: skipped and measured as the sub-block it replaces.

Per block, on the unmodified model: cosdist(X, f(X)) (how much the block turns the token direction),
||h(X)|| / ||X|| (how large its update is next to the stream) and cosdist(h(X), X) (the paper reports ≈ 0.95).

Choices where the paper is silent (see docs/paper.md); each is recorded in every output (`DEFINITIONS`):
- Aggregation: the cosine distance is taken per token, then averaged over every measured token of every sequence
  (pooled, so a longer sequence weighs more). ||h|| / ||X|| is likewise a per-token ratio, then the mean.
- The attention sink: the first token of each sequence is run (every later token attends to it) but by default not
  measured. It sees only itself, so its stream carries no context, and trained Llamas park it at a huge norm
  ("massive activations") that its updates barely turn: its metrics describe the sink, not the text.
- Cosine distance is computed as |â - b̂|² / 2 (equal to 1 - cos), which is exactly 0 for identical vectors and
  keeps small distances accurate. Two zero vectors are at distance 0 (nothing changed); a zero vector against a
  non-zero one is at distance 1 (cos taken as 0).

No redundant work: the unmodified model runs once per sequence and keeps the stream at every block boundary
(and between each block's attention and FFN). Skipping block i changes nothing before it, so its pass starts
from the cached x_i and runs blocks i+1..m-1 once, which gives h~^j_i for every j > i. The whole matrix costs
m(m-1)/2 block evaluations per granularity instead of m² full forward passes.

Windows (the paper's App. B): for each run of w consecutive blocks [s, s+w-1], the w x w submatrix of M, of which
the entries j > i are used: M_max is their largest, M_sum their sum. The greedy selection takes the window with
the lowest M_max, breaks ties by the lowest M_sum, removes every window overlapping it, and repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from reffuse.core.backend import array_module, to_numpy
from reffuse.core.model import Model, check_token_ids, run_blocks
from reffuse.errors import ReffuseError
from reffuse.records import FlatRecord

GRANULARITIES = ("block", "ffn")

# M_max is step-like: neighbouring windows often share their largest entry, or nearly so. Windows whose M_max is
# within this relative tolerance of the lowest are treated as tied, and the lowest M_sum among them wins.
TIE_TOLERANCE = 0.05

DEFINITIONS = {
    "contribution": "h^j(X) = f_j(x_j) - x_j, block j's update of the residual stream (FFN granularity: its FFN "
                    "sub-block's output)",
    "dependency": "M[i, j] = mean over measured tokens of cosdist(h^j, h~^j_i), h~^j_i = block j's contribution "
                  "with block i skipped; j > i only (null elsewhere)",
    "cosine_distance": "1 - cos(a, b), computed as |a/|a| - b/|b||^2 / 2; both zero -> 0, one zero -> 1",
    "aggregation": "per-token value, then the mean over all measured tokens of all sequences pooled",
    "norm_ratio": "||h(X)|| / ||X|| per token, then the mean",
    "attention_sink": "when excluded, the first token of each sequence is run but not measured: it attends only "
                      "to itself and trained models keep it at a huge norm, so it describes the sink, not the text",
    "windows": "M_max / M_sum: largest / sum of the entries j > i of the w x w submatrix of each window of w "
               "consecutive blocks",
    "greedy": f"lowest M_max; windows within a relative {TIE_TOLERANCE:g} of it are tied and the lowest M_sum wins "
              "(then the earliest); windows overlapping a choice are removed; repeat until none remain",
}


# ---------------------------------------------------------------------------------------------------------------
# Cosine distance


def cosine_distance(a, b) -> np.ndarray:
    """1 - cos(a, b) for each row of a, b [..., d] -> [...] float64 (see the module docstring for zeros).

    Computed in the arrays' own precision and on their device (a float32 distance of unit vectors is accurate to
    ~1e-7, far below the distances measured); only the per-row result is float64 NumPy.
    """
    xp = array_module(a)
    norm_a = xp.sqrt(xp.sum(a * a, axis=-1, keepdims=True))
    norm_b = xp.sqrt(xp.sum(b * b, axis=-1, keepdims=True))
    unit_a = a / xp.where(norm_a > 0, norm_a, 1)  # a zero row stays zero
    unit_b = b / xp.where(norm_b > 0, norm_b, 1)
    difference = unit_a - unit_b
    distance = to_numpy(0.5 * xp.sum(difference * difference, axis=-1)).astype(np.float64)
    one_is_zero = to_numpy((norm_a[..., 0] > 0) != (norm_b[..., 0] > 0))
    return np.where(one_is_zero, 1.0, distance)


# ---------------------------------------------------------------------------------------------------------------
# The residual stream, kept at every block boundary


@dataclass
class Stream:
    """The unmodified model's residual stream on one sequence."""
    inputs: list  # m + 1 arrays [T, d]: inputs[j] enters block j; inputs[m] leaves the last block
    mids: list    # m arrays [T, d]: block j's stream after its attention (inputs[j] when it has none)
    cos: object   # RoPE tables [T, head_dim] for this sequence
    sin: object


def residual_stream(model: Model, token_ids) -> Stream:
    """Run `model` once on one sequence and keep the stream at every block boundary and between sub-blocks."""
    ids = check_token_ids(model, token_ids)
    xp = array_module(model.embed)
    cos, sin = model.rope(np.arange(len(ids)))
    x = model.embed[xp.asarray(ids)]  # [T] -> [T, d]
    inputs, mids = [x], []
    run_blocks(model, x, cos, sin, streams=inputs, mids=mids)
    return Stream(inputs, mids, cos, sin)


# ---------------------------------------------------------------------------------------------------------------
# The dependency matrices and per-block metrics


@dataclass
class Dependency:
    """Everything measured on one model and one token set; arrays indexed by block."""
    matrices: dict             # granularity -> M [m, m] (NaN where j <= i or a sub-block is missing)
    cos_dist_x_fx: np.ndarray  # [m] cosdist(X, f(X))
    norm_ratio: np.ndarray     # [m] ||h(X)|| / ||X||
    cos_dist_h_x: np.ndarray   # [m] cosdist(h(X), X)
    tokens_measured: int       # tokens in the averages
    sequence_lengths: list     # tokens run per sequence
    exclude_sink: bool         # whether the first token of each sequence was left out of the averages
    block_evaluations: int     # blocks run in all, the unmodified passes included
    per_block: dict = field(init=False)

    def __post_init__(self):
        self.per_block = {"cos_dist_x_fx": self.cos_dist_x_fx, "norm_ratio": self.norm_ratio,
                          "cos_dist_h_x": self.cos_dist_h_x}


def measured_positions(length: int, exclude_sink: bool, sink_only: bool = False) -> slice:
    """Positions of a sequence that enter the averages: all, all but the first (the attention sink), or
    (sink_only) the first alone."""
    if sink_only:
        return slice(0, 1)
    first = 1 if exclude_sink else 0
    if length <= first:
        raise ReffuseError(f"a sequence of {length} token(s) has nothing to measure once the attention sink (its "
                           "first token) is excluded: use longer sequences")
    return slice(first, length)


def block_evaluations_needed(model: Model, n_sequences: int, granularities=GRANULARITIES) -> int:
    """How many block evaluations `dependency` will run (for a progress bar): the unmodified pass, one pass from
    each skipped block to the end, and at FFN granularity an extra pass for each block whose FFN follows attention."""
    m, per_sequence = len(model.blocks), len(model.blocks)
    for i, block in enumerate(model.blocks):
        after = m - 1 - i
        if "block" in granularities or block.attention is None:
            per_sequence += after
        if "ffn" in granularities and block.attention is not None and block.ffn is not None:
            per_sequence += after
    return n_sequences * per_sequence


def dependency(model: Model, sequences, exclude_sink: bool = True, granularities=GRANULARITIES,
               progress: Callable[[int], None] | None = None, sink_only: bool = False) -> Dependency:
    """M at each granularity and the per-block metrics, on `sequences` (a list of 1-D token id arrays).

    progress(n) is called after every n block evaluations (see block_evaluations_needed for the total).
    sink_only: measure the first token of each sequence alone, the channel the default leaves out.
    """
    granularities = tuple(granularities)
    for g in granularities:
        if g not in GRANULARITIES:
            raise ReffuseError(f"granularity {g!r} is not one of {', '.join(GRANULARITIES)}")
    if not sequences:
        raise ReffuseError("no token sequences given: pass at least one sequence of token ids")
    m = len(model.blocks)
    if m < 2:
        raise ReffuseError(f"the model has {m} block(s): dependencies need at least 2")
    has_ffn = np.array([b.ffn is not None for b in model.blocks])
    sums = {g: np.zeros((m, m)) for g in granularities}
    per_block_sums = np.zeros((3, m))
    tokens, evaluations = 0, 0

    def tick(n):
        nonlocal evaluations
        evaluations += n
        if progress is not None:
            progress(n)

    for ids in sequences:
        stream = residual_stream(model, ids)
        tick(m)
        measured = measured_positions(len(stream.inputs[0]), exclude_sink, sink_only)
        tokens += measured.stop - measured.start
        inputs = [x[measured] for x in stream.inputs]  # measured tokens only: [T, d] -> [T_measured, d]
        mids = [x[measured] for x in stream.mids]
        contribution = {"block": [inputs[j + 1] - inputs[j] for j in range(m)],
                        "ffn": [inputs[j + 1] - mids[j] for j in range(m)]}

        for j in range(m):
            x, h = inputs[j], contribution["block"][j]
            norm_x = np.linalg.norm(to_numpy(x).astype(np.float64), axis=-1)
            norm_h = np.linalg.norm(to_numpy(h).astype(np.float64), axis=-1)
            per_block_sums[0, j] += cosine_distance(x, inputs[j + 1]).sum()
            per_block_sums[1, j] += np.sum(norm_h / norm_x)
            per_block_sums[2, j] += cosine_distance(h, x).sum()

        for i, block in enumerate(model.blocks):
            # Skipping block i: the stream leaving it is the one entering it. For an attention-free block that is
            # also skipping its FFN, so this one pass serves both granularities.
            measure = [g for g in granularities if g == "block" or block.attention is None]
            if measure and i < m - 1:
                _skip_pass(model, stream, i, stream.inputs[i], measured, contribution, measure, sums)
                tick(m - 1 - i)
            if "ffn" in granularities and block.attention is not None and block.ffn is not None and i < m - 1:
                # Skipping only block i's FFN: its attention still runs, so start after it.
                _skip_pass(model, stream, i, stream.mids[i], measured, contribution, ["ffn"], sums)
                tick(m - 1 - i)

    later = np.triu(np.ones((m, m), dtype=bool), k=1)
    matrices = {}
    for g in granularities:
        M = np.where(later, sums[g] / tokens, np.nan)
        if g == "ffn":
            M[~has_ffn, :] = np.nan  # no FFN to skip
            M[:, ~has_ffn] = np.nan  # no FFN to measure
        matrices[g] = M
    per_block = per_block_sums / tokens
    return Dependency(matrices, per_block[0], per_block[1], per_block[2], tokens, [len(ids) for ids in sequences],
                      exclude_sink and not sink_only, evaluations)


def _skip_pass(model, stream, skipped, x, measured, contribution, granularities, sums):
    """Run blocks skipped+1.. from x (the stream leaving the skipped block) and add, for every later block j, the
    summed per-token cosine distance of its contribution from the unmodified one to sums[g][skipped, j]."""
    inputs, mids = [x], []
    run_blocks(model, x, stream.cos, stream.sin, start=skipped + 1, streams=inputs, mids=mids)
    for k, j in enumerate(range(skipped + 1, len(model.blocks))):
        x, mid, out = inputs[k], mids[k], inputs[k + 1]
        if "block" in granularities:
            sums["block"][skipped, j] += cosine_distance((out - x)[measured], contribution["block"][j]).sum()
        if "ffn" in granularities and model.blocks[j].ffn is not None:
            sums["ffn"][skipped, j] += cosine_distance((out - mid)[measured], contribution["ffn"][j]).sum()


# ---------------------------------------------------------------------------------------------------------------
# Windows and the greedy selection


def check_matrix(M) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ReffuseError(f"a dependency matrix must be square [m, m], got shape {M.shape}")
    return M


def check_window(window: int, n_blocks: int) -> int:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
        raise ReffuseError(f"window length {window!r} must be an integer >= 2 (a window holds at least one pair)")
    if window > n_blocks:
        raise ReffuseError(f"window length {window} is longer than the model's {n_blocks} blocks: use at most "
                           f"{n_blocks}")
    return int(window)


@dataclass(frozen=True)
class WindowRow(FlatRecord):
    """M_max and M_sum over the entries j > i of one window of blocks first..last; NaN where the window has no
    defined entry."""
    first: int
    last: int
    max: float
    sum: float


@dataclass(frozen=True)
class GreedyStep(FlatRecord):
    """One step of the paper's greedy selection: the window [first, last] taken, its M_max and M_sum (which breaks
    ties), how many candidate windows were left before it, and the first blocks of those it tied with on M_max."""
    step: int                 # 1 for the first choice
    first: int
    last: int
    max: float
    sum: float
    candidates: int
    tied: tuple[int, ...]

    @classmethod
    def from_json(cls, raw: dict) -> GreedyStep:
        return cls(**(raw | {"tied": tuple(raw["tied"])}))


def window_statistics(M, window: int = 4) -> list[WindowRow]:
    """For every window of `window` consecutive blocks [s, s+w-1]: M_max and M_sum over its entries j > i.

    NaN entries (a missing sub-block) are left out; a window with no finite entry gets NaN for both.
    """
    M = check_matrix(M)
    w = check_window(window, M.shape[0])
    later = np.triu(np.ones((w, w), dtype=bool), k=1)
    rows = []
    for s in range(M.shape[0] - w + 1):
        entries = M[s:s + w, s:s + w][later]  # the w(w-1)/2 pairs i < j of the window
        entries = entries[np.isfinite(entries)]
        rows.append(WindowRow(s, s + w - 1, float(entries.max()) if entries.size else math.nan,
                              float(entries.sum()) if entries.size else math.nan))
    return rows


def greedy_windows(M, window: int = 4, eligible: Sequence[bool] | None = None,
                   tie_tolerance: float = TIE_TOLERANCE, max_steps: int | None = None) -> list[GreedyStep]:
    """The paper's greedy selection of non-overlapping windows to parallelize (the paper's App. B).

    eligible[b] False keeps block b out of every window (the paper's greedy uses full blocks only: pass
    reffuse.core.layout.full_blocks(model)). Each step returns the chosen window, its M_max and M_sum, the windows that tied with it on
    M_max, and how many candidate windows were left before it was chosen.
    """
    M = check_matrix(M)
    m = M.shape[0]
    w = check_window(window, m)
    if tie_tolerance < 0:
        raise ReffuseError(f"tie tolerance {tie_tolerance} must be >= 0")
    if eligible is not None and len(eligible) != m:
        raise ReffuseError(f"eligible has {len(eligible)} entries for a {m}-block matrix")
    candidates = [r for r in window_statistics(M, w) if math.isfinite(r.max)
                  and (eligible is None or all(eligible[b] for b in range(r.first, r.last + 1)))]
    steps = []
    while candidates and (max_steps is None or len(steps) < max_steps):
        lowest = min(r.max for r in candidates)
        tied = [r for r in candidates if r.max <= lowest * (1 + tie_tolerance)]
        chosen = min(tied, key=lambda r: (r.sum, r.first))
        steps.append(GreedyStep(len(steps) + 1, chosen.first, chosen.last, chosen.max, chosen.sum, len(candidates),
                                tuple(r.first for r in tied)))
        candidates = [r for r in candidates if r.last < chosen.first or r.first > chosen.last]
    return steps


# ---------------------------------------------------------------------------------------------------------------
# JSON


def matrix_to_json(M) -> list[list]:
    """Nested lists, null for NaN (JSON has no NaN)."""
    return [[float(v) if math.isfinite(v) else None for v in row] for row in np.asarray(M, dtype=np.float64)]


def matrix_from_json(rows) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
