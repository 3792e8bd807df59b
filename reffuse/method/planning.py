"""Fusion planning: from a model's attention-free runs and a pairwise cost matrix C, propose the groups to fuse
(the paper's §3-4: contiguous groups inside the attention-free runs).

C[i, j] (i < j) is what running FFNs i and j in parallel is predicted to cost. Two predictors fill it
(reffuse.method.predictors): the paper's block dependency metric, cosine-M (the FFN-level matrix M of
reffuse.method.metrics), and the neighbour damage, C[k, k+1] = KL(pre || pre with FFNs k, k+1 fused) on
calibration text and 0 for pairs further apart. `reffuse fuse --plan`, `demo` and `experiments` plan with
the neighbour damage (PLANNER_PREDICTOR): over the four attention-removal regions of the committed SmolLM2
experiments it ranks the damage of fusing each contiguous group better than cosine-M does, by a resolved
margin (predictors.choose_predictor gives the rule and the numbers). `reffuse analyze` plans from the matrix
it measures, cosine-M.

The paper fuses contiguous groups inside attention-free runs, caps their size (by per-GPU memory), and leaves out
each run's last FFN, which is unusually sensitive (§4.2). It gives no rule for where to cut a run into groups
(its 49B steps were designed by hand). reffuse's rule, per run:

1. The span: the run, without its last block when leave_out_last (the default, as in the paper).
2. The number of groups k: the fewest the size cap allows, ceil(length / max_group_size) (one group when there is
   no cap), or more when groups_per_run asks for more.
3. The cuts: of all ways to cut the span into k contiguous pieces of at most max_group_size blocks, the one with
   the least cost left inside the pieces, Σ_pieces Σ_{i<j in the piece} C[i, j]. Fusing puts the blocks of a
   piece in parallel, which is exact only where they do not depend on each other; pairs in different pieces stay
   sequential. So the cuts fall where the most predicted damage crosses them (for the neighbour damage: at the
   k - 1 adjacent pairs that are most costly to fuse). Ties go to the latest cuts (earlier
   groups the larger, as in the paper's Ultra plan).
4. A piece of one block is not a group (nothing to fuse) and stays as it is.

`Plan.groups` is what `reffuse.fuse(model, plan.groups)` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reffuse.errors import ReffuseError
from reffuse.method.metrics import check_matrix
from reffuse.core.layout import attention_free_runs, check_groups
from reffuse.core.model import Model

SPLIT_RULE = ("per run (without its last block by default): the fewest groups the size cap allows, cut where the "
              "summed pairwise cost C[i, j] left inside the groups is least")


@dataclass
class Plan:
    groups: list[tuple[int, int]]  # (first, last) inclusive, ready for reffuse.fuse
    runs: list[dict]               # per attention-free run: its span, pieces, and the dependency inside and across
    max_group_size: int | None
    leave_out_last: bool
    groups_per_run: int | None
    predictor: str | None = "cosine-M"  # what the cost matrix holds (reffuse.method.predictors.PREDICTORS); None
                                        # in a plan recorded before plans named it
    rule: str = SPLIT_RULE              # as the plan was made: a recorded plan keeps the words it was recorded with

    def to_json(self) -> dict:
        raw = {"groups": [list(g) for g in self.groups], "runs": self.runs, "max_group_size": self.max_group_size,
               "leave_out_last": self.leave_out_last, "groups_per_run": self.groups_per_run, "rule": self.rule}
        return raw if self.predictor is None else raw | {"predictor": self.predictor}

    @classmethod
    def from_json(cls, raw: dict) -> Plan:
        return cls([tuple(g) for g in raw["groups"]], raw["runs"], raw["max_group_size"], raw["leave_out_last"],
                   raw["groups_per_run"], raw.get("predictor"), raw["rule"])


def inside_dependency(M: np.ndarray, first: int, last: int) -> float:
    """Σ M[i, j] over first <= i < j <= last: the pairwise cost (for cosine-M, the dependency) that running blocks
    first..last in parallel ignores."""
    piece = M[first:last + 1, first:last + 1]
    return float(piece[np.triu(np.ones(piece.shape, dtype=bool), k=1)].sum())


def split_run(M: np.ndarray, first: int, last: int, pieces: int, max_size: int | None) -> list[tuple[int, int]]:
    """Cut blocks first..last into `pieces` contiguous pieces of at most max_size blocks with the least summed
    inside_dependency (dynamic programming over the end of each piece; ties go to the latest cuts)."""
    length = last - first + 1
    cap = max_size or length
    if not 1 <= pieces <= length or pieces * cap < length:
        raise ReffuseError(f"blocks {first}-{last} cannot be cut into {pieces} pieces of at most {cap} blocks")
    # best[k][e]: (cost, pieces) for blocks first..first+e-1 cut into k pieces
    best = [[(math.inf, [])] * (length + 1) for _ in range(pieces + 1)]
    best[0][0] = (0.0, [])
    for k in range(1, pieces + 1):
        for end in range(1, length + 1):
            for start in range(max(0, end - cap), end):  # the last piece is first+start .. first+end-1
                cost, cut = best[k - 1][start]
                if math.isinf(cost):
                    continue
                total = cost + inside_dependency(M, first + start, first + end - 1)
                if total <= best[k][end][0]:  # on a tie the later start wins
                    best[k][end] = (total, cut + [(first + start, first + end - 1)])
    return best[pieces][length][1]


def propose_groups(model: Model, M, max_group_size: int | None = None, leave_out_last: bool = True,
                   groups_per_run: int | None = None, runs=None, predictor: str = "cosine-M") -> Plan:
    """Fusion groups for `model` from a pairwise cost matrix M [m, m] (see the module docstring): the FFN-level
    dependency matrix (predictor "cosine-M") or the neighbour damage matrix ("neighbour damage").

    runs: the attention-free runs (first, last) to plan in; default all of the model's maximal runs.
    """
    M = check_matrix(M)
    m = len(model.blocks)
    if M.shape[0] != m:
        raise ReffuseError(f"the dependency matrix is {M.shape[0]} x {M.shape[0]} but the model has {m} blocks: "
                           "measure M on this model (after removing attention)")
    if max_group_size is not None and max_group_size < 2:
        raise ReffuseError(f"max group size {max_group_size} must be at least 2 (a group fuses 2 or more FFNs)")
    if groups_per_run is not None and groups_per_run < 1:
        raise ReffuseError(f"groups per run {groups_per_run} must be at least 1")
    runs = attention_free_runs(model) if runs is None else check_groups(model, runs)

    groups, details = [], []
    for run_first, run_last in runs:
        first, last = run_first, run_last - 1 if leave_out_last else run_last
        detail = {"run": [run_first, run_last], "span": [first, last], "pieces": [], "inside": [], "across": []}
        details.append(detail)
        length = last - first + 1
        if length < 2:
            detail["note"] = "fewer than 2 blocks to fuse"
            continue
        block = M[first:last + 1, first:last + 1]
        if not np.all(np.isfinite(block[np.triu(np.ones(block.shape, dtype=bool), k=1)])):
            raise ReffuseError(f"the {predictor} matrix has no entry for some pair in blocks {first}-{last}: "
                               "use a matrix measured on this model, over its attention-free runs")
        pieces = math.ceil(length / max_group_size) if max_group_size else 1
        pieces = min(max(pieces, groups_per_run or 1), length)
        cut = split_run(M, first, last, pieces, max_group_size)
        detail["pieces"] = [list(p) for p in cut]
        detail["inside"] = [inside_dependency(M, a, b) for a, b in cut]
        # dependency across each cut: pairs i before it, j after it, inside the span
        detail["across"] = [float(np.nansum(M[first:b + 1, b + 1:last + 1])) for _, b in cut[:-1]]
        groups += [(a, b) for a, b in cut if b > a]
    return Plan(check_groups(model, groups), details, max_group_size, leave_out_last, groups_per_run, predictor)
