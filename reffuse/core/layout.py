"""A model's layout: which blocks have attention, how wide each FFN is, which layers a fused block replaces.

One description, used wherever the structure matters and the weights do not: the saved config (reffuse.formats),
the cost model's presets (reffuse.speed.costmodel, including layouts of models that are never loaded, such as
Llama-3.1-405B), the plots, and every question about structure asked below (attention-free runs, attention
layers, full blocks, whether a list of runs may be fused). `model.layout()` (or `reffuse.layout(model)`) gives
a loaded model's layout; `.rows()` gives it as JSON rows.

Vocabulary, shared with DeciLM / Nemotron-NAS configs: a block's attention or FFN may be absent (`no_op`) or one
linear map (`replace_with_linear`), and its key/value heads may differ from the model's (`n_heads_in_group`); an
attention-free run is a maximal run of two or more consecutive blocks that have a SwiGLU FFN and no attention
(only such runs can run in parallel, eq. 5, and fuse, Theorem 3.1); a group is a run (first, last), 0-based and
inclusive, chosen to be fused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from reffuse.errors import ReffuseError


@dataclass(frozen=True)
class BlockLayout:
    """One block: attention present or not, the SwiGLU FFN's width (0: none), for a fused block the layers of the
    unfused model it replaces; and where they differ from a plain block: its key/value heads, and a sub-block
    that is one linear map."""
    attention: bool
    ffn_width: int
    fused_from: tuple[int, ...] = ()
    kv_heads: int | None = None      # None: the model's n_kv_heads
    linear_attention: bool = False   # attention replaced by a d x d linear map (then `attention` is True)
    linear_ffn: bool = False         # FFN replaced by a d x d linear map (then ffn_width is 0)

    @property
    def has_ffn(self) -> bool:
        """An FFN sub-block of either kind."""
        return self.ffn_width > 0 or self.linear_ffn

    @property
    def has_heads(self) -> bool:
        """Attention with heads: keys and values to cache, RoPE to apply."""
        return self.attention and not self.linear_attention

    def to_json(self) -> dict:
        row = {"attention": self.attention, "ffn_width": self.ffn_width, "fused_from": list(self.fused_from)}
        if self.kv_heads is not None:
            row["kv_heads"] = self.kv_heads
        if self.linear_attention:
            row["linear_attention"] = True
        if self.linear_ffn:
            row["linear_ffn"] = True
        return row


@dataclass(frozen=True)
class Layout:
    """A model's shapes without its weights. `fusion_groups` are the runs its fused variant fuses (the cost
    model's presets carry the paper's); `source` and `assumptions` say where the shapes come from."""
    name: str
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    blocks: tuple[BlockLayout, ...]
    fusion_groups: tuple[tuple[int, int], ...] = ()
    source: str = ""
    assumptions: tuple[str, ...] = ()

    def attention_weights(self) -> int:
        """Weights of one attention sub-block: q [H·hd, d], k and v [Hkv·hd, d], o [d, H·hd]."""
        return self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)

    def kv_heads(self, block: int) -> int:
        """The key/value heads of block `block` (0 for a block without heads)."""
        b = self.blocks[block]
        return 0 if not b.has_heads else self.n_kv_heads if b.kv_heads is None else b.kv_heads

    def rows(self) -> list[dict]:
        """One JSON row per block: its index, attention present, FFN width, the layers a fused block replaces."""
        return blocks_to_json(self.blocks)


def blocks_to_json(blocks) -> list[dict]:
    """BlockLayouts as JSON rows, each with its index: what blocks_from_json reads back."""
    return [{"block": i, **b.to_json()} for i, b in enumerate(blocks)]


def blocks_from_json(rows, source: str) -> tuple[BlockLayout, ...]:
    """BlockLayouts from JSON rows ({"attention", "ffn_width", "fused_from"}, and where set "kv_heads",
    "linear_attention", "linear_ffn"), as saved configs hold them; each field checked, and no original layer
    claimed by two blocks."""
    if not isinstance(rows, list) or not rows:
        raise ReffuseError(f"{source}: blocks must be a non-empty list of block entries")
    blocks, claimed = [], {}
    for i, row in enumerate(rows):
        where = f"{source}: block {i}"
        if not isinstance(row, dict) or "attention" not in row or "ffn_width" not in row:
            raise ReffuseError(f"{where} is malformed ({row!r}): each needs attention and ffn_width")
        attention, width, fused_from = row["attention"], row["ffn_width"], row.get("fused_from", [])
        if not isinstance(attention, bool):
            raise ReffuseError(f"{where}: attention must be true or false, got {attention!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise ReffuseError(f"{where}: ffn_width must be an integer >= 0, got {width!r}")
        if not isinstance(fused_from, list) or not all(isinstance(j, int) and not isinstance(j, bool) and j >= 0
                                                       for j in fused_from) or fused_from != sorted(set(fused_from)):
            raise ReffuseError(f"{where}: fused_from must list original layer indices >= 0 in increasing order, "
                               f"got {fused_from!r}")
        for j in fused_from:
            if j in claimed:
                raise ReffuseError(f"{where}: fused_from names layer {j}, which block {claimed[j]} already stands for")
            claimed[j] = i
        kv_heads = row.get("kv_heads")
        if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1):
            raise ReffuseError(f"{where}: kv_heads must be an integer >= 1, got {kv_heads!r}")
        linear_attention, linear_ffn = row.get("linear_attention", False), row.get("linear_ffn", False)
        if not isinstance(linear_attention, bool) or not isinstance(linear_ffn, bool):
            raise ReffuseError(f"{where}: linear_attention and linear_ffn must be true or false")
        if (linear_attention and not attention) or (linear_ffn and width):
            raise ReffuseError(f"{where}: a linear attention needs attention true, a linear FFN ffn_width 0")
        blocks.append(BlockLayout(attention, width, tuple(fused_from), kv_heads, linear_attention, linear_ffn))
    return tuple(blocks)


# ---------------------------------------------------------------------------------------------------------------
# Questions about structure: each takes a Layout or a reffuse Model (whose .layout() gives its Layout)


def as_layout(structure) -> Layout:
    """A Layout as it is; a Model's layout."""
    return structure if isinstance(structure, Layout) else structure.layout()


def attention_layers(structure) -> list[int]:
    """Blocks that have attention (with heads or a linear map)."""
    return [i for i, b in enumerate(as_layout(structure).blocks) if b.attention]


def full_blocks(structure) -> list[bool]:
    """Per block: True when it has both attention and an FFN (the blocks the paper's greedy selection considers)."""
    return [b.attention and b.has_ffn for b in as_layout(structure).blocks]


def attention_free_runs(structure) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of >= 2 consecutive blocks that have a SwiGLU FFN and no attention."""
    runs, start = [], None
    for i, block in enumerate(as_layout(structure).blocks + (None,)):  # None closes the last run
        free = block is not None and not block.attention and block.ffn_width > 0
        if free and start is None:
            start = i
        elif not free and start is not None:
            if i - 1 > start:
                runs.append((start, i - 1))
            start = None
    return runs


def original_layers(structure) -> list[tuple[int, ...]]:
    """For every block, the layers of the unfused model it stands for (one for a plain block)."""
    layers, next_layer = [], 0
    for block in as_layout(structure).blocks:
        span = block.fused_from or (next_layer,)
        layers.append(tuple(span))
        next_layer = max(span) + 1
    return layers


def check_runs(n_blocks: int, groups) -> list[tuple[int, int]]:
    """Runs (first, last) of blocks, 0-based and inclusive, in range, of 2 or more blocks, not overlapping;
    returned sorted. Says nothing of what the blocks hold (see check_groups)."""
    checked = []
    for group in groups:
        try:
            first, last = group
        except (TypeError, ValueError):
            raise ReffuseError(f"group {group!r} is not a pair (first, last) of block indices") from None
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in (first, last)):
            raise ReffuseError(f"group {tuple(group)!r} is not a pair of integer block indices")
        first, last = int(first), int(last)
        if not (0 <= first < n_blocks and 0 <= last < n_blocks):
            raise ReffuseError(f"group ({first}, {last}) is out of range: the model has blocks 0..{n_blocks - 1}")
        if last < first:
            raise ReffuseError(f"group ({first}, {last}) is reversed: first > last; write it as ({last}, {first})")
        if last == first:
            raise ReffuseError(f"group ({first}, {last}) has fewer than 2 blocks: a run is (first, last) "
                               "with first < last, both inclusive")
        checked.append((first, last))
    checked.sort()
    for (a, b), (c, d) in zip(checked, checked[1:]):
        if c <= b:
            raise ReffuseError(f"groups ({a}, {b}) and ({c}, {d}) overlap: each block belongs to at most one group")
    return checked


def check_groups(structure, groups) -> list[tuple[int, int]]:
    """check_runs, and every block of every group attention-free with an FFN: the runs that may run in parallel
    (eq. 5) and fuse (Theorem 3.1)."""
    layout = as_layout(structure)
    checked = check_runs(len(layout.blocks), groups)
    for first, last in checked:
        for i in range(first, last + 1):
            if layout.blocks[i].attention:
                raise ReffuseError(f"group ({first}, {last}) contains block {i}, which has attention: only runs "
                                   "of attention-free blocks can run in parallel (remove its attention first)")
            if layout.blocks[i].linear_ffn:
                raise ReffuseError(f"group ({first}, {last}) contains block {i}, whose FFN is a linear map: only "
                                   "SwiGLU FFNs fuse into one (Theorem 3.1)")
            if not layout.blocks[i].has_ffn:
                raise ReffuseError(f"group ({first}, {last}) contains block {i}, which has no FFN")
    return checked


def contiguous_ranges(layers) -> list[tuple[int, int]]:
    """[14, 15, 16, 20] -> [(14, 16), (20, 20)]."""
    ranges = []
    for layer in sorted(layers):
        if ranges and layer == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], layer)
        else:
            ranges.append((layer, layer))
    return ranges


def format_layers(layers) -> str:
    """[3, 4, 5, 9] -> "3-5,9": the inverse of `parse_layers`."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in contiguous_ranges(layers)) or "-"


def parse_layers(text: str) -> list[int]:
    """"14-21" or "3,5,14-21" -> sorted block indices (0-based, ranges inclusive)."""
    layers = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, sep, last = part.partition("-")
        try:
            lo, hi = int(first), int(last if sep else first)
        except ValueError:
            raise ReffuseError(f"{part!r} is not a block index or a range FIRST-LAST (e.g. 14-21)") from None
        if hi < lo:
            raise ReffuseError(f"range {part!r} is empty: write FIRST-LAST with FIRST <= LAST")
        layers.update(range(lo, hi + 1))
    if not layers:
        raise ReffuseError(f"{text!r} names no blocks: write e.g. 14-21 or 3,5,14-21")
    return sorted(layers)


def parse_groups(text: str) -> list[tuple[int, int]]:
    """"14-17,18-20" -> [(14, 17), (18, 20)]: 0-based, inclusive block ranges."""
    if not text.strip():
        raise ReffuseError("no group given: write the runs to fuse as FIRST-LAST[,FIRST-LAST...], e.g. 4-8")
    groups = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, sep, last = part.partition("-")
        try:
            groups.append((int(first), int(last)))
        except ValueError:
            raise ReffuseError(f"group {part!r} is not a range FIRST-LAST of block indices (e.g. 4-8)") from None
        if not sep:
            raise ReffuseError(f"group {part!r} is not a range FIRST-LAST of block indices (e.g. 4-8)")
    return groups


def format_groups(groups, separator: str = ",") -> str:
    """[(14, 17), (18, 20)] -> "14-17,18-20": the inverse of `parse_groups` ("-" for none)."""
    return separator.join(f"{a}-{b}" for a, b in groups) or "-"


def sharding_problems(structure, n_ranks: int) -> list[str]:
    """Why a model cannot be split over n_ranks tensor-parallel ranks the Megatron way (empty when it can): query
    heads must divide by N; each block's key/value heads must divide by N or divide N (then they are
    replicated); every FFN width, and the width d a linear map reads, must divide by N. reffuse.tp.sharding
    splits by this rule and the cost model predicts by it."""
    layout, problems = as_layout(structure), []
    if n_ranks < 1:
        return [f"the tensor-parallel degree N must be at least 1, not {n_ranks}"]
    if any(b.has_heads for b in layout.blocks):
        if layout.n_heads % n_ranks:
            problems.append(f"its {layout.n_heads} query heads (n_heads) do not divide by N={n_ranks}")
        kv = {}
        for i in range(len(layout.blocks)):
            heads = layout.kv_heads(i)
            if heads and heads % n_ranks and n_ranks % heads:
                kv.setdefault(heads, []).append(i)
        for heads, layers in kv.items():
            problems.append(f"the {heads} key/value heads of block{'s' if len(layers) > 1 else ''} "
                            f"{format_layers(layers)} neither divide by N={n_ranks} nor divide N (to be replicated)")
    if any(b.linear_attention or b.linear_ffn for b in layout.blocks) and layout.dim % n_ranks:
        problems.append(f"its linear maps read d={layout.dim} features, which do not divide by N={n_ranks}")
    widths = {}
    for i, block in enumerate(layout.blocks):
        if block.has_ffn and block.ffn_width % n_ranks:
            widths.setdefault(block.ffn_width, []).append(i)
    if widths:
        listed = ", ".join(f"{width} (block{'s' if len(layers) > 1 else ''} {format_layers(layers)})"
                           for width, layers in widths.items())
        problems.append(f"FFN width{'s' if len(widths) > 1 else ''} {listed} do{'es' if len(widths) == 1 else ''} "
                        f"not divide by N={n_ranks}")
    return problems


def steps(n_blocks: int, runs) -> list[tuple[int, int]]:
    """The steps of a walk over blocks 0..n_blocks-1: each run (first, last) is one step, every other block a step
    (b, b) of its own. `runs` must be checked (sorted, in range, not overlapping)."""
    ends = dict(runs)
    walk, layer = [], 0
    while layer < n_blocks:
        last = ends.get(layer, layer)
        walk.append((layer, last))
        layer = last + 1
    return walk


def fused_layers(structure, first: int, last: int) -> tuple[int, ...]:
    """The layers of the unfused model that blocks first..last stand for, once fused into one block."""
    return tuple(i for span in original_layers(structure)[first:last + 1] for i in span)


def fuse_layout(layout: Layout, groups=None) -> Layout:
    """The layout after fusing each group (default: its fusion_groups) into one FFN whose width is the sum of the
    group's widths (Theorem 3.1). reffuse.fuse does the same to weights."""
    groups = check_groups(layout, layout.fusion_groups if groups is None else groups)
    blocks = []
    for first, last in steps(len(layout.blocks), groups):
        if first == last:
            blocks.append(layout.blocks[first])
        else:
            width = sum(b.ffn_width for b in layout.blocks[first:last + 1])
            blocks.append(BlockLayout(False, width, fused_layers(layout, first, last)))
    return dataclasses.replace(layout, name=f"{layout.name} (fused)", blocks=tuple(blocks), fusion_groups=())
