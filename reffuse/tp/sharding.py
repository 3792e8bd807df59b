"""Shard a model for one rank of N, the Megatron way; the shard is itself a reffuse Model.

    attention   q, k, v  column-parallel by head groups: rank r holds n_heads/N query heads and the key/value
                         heads those query heads read (n_kv_heads/N of them, or one replicated head when
                         N > n_kv_heads, as vLLM does, because a kv head cannot be split across its queries)
                o        row-parallel: the input columns of rank r's heads -> a partial [T, d], all-reduced
                biases   q, k, v's with their rows; o's added once, by rank 0 (the all-reduce sums the ranks)
                         each block with its own key/value heads (Nemotron-NAS), split or replicated as above
    FFN         gate, up column-parallel, each on its own: rank r holds the same dh/N hidden units of both
                         (never a slice of their concatenation, or silu(gate) would meet the wrong up)
                down     row-parallel: the input columns of those hidden units -> a partial [T, d], all-reduced
    a linear map (a sub-block replaced by one d x d linear, Nemotron-NAS)
                         row-parallel: rank r reads d/N input features of the (replicated) normalised stream
    embeddings, norms and the LM head are replicated.

Why the sum of the partial outputs is the unsharded output: heads are independent until o, and
o(concat_h head_h) = Σ_r o[:, cols_r] head_r; SwiGLU acts on each hidden unit on its own, so
FFN(x) = Σ_r down[:, units_r] (silu(gate[units_r] x) ⊙ up[units_r] x). The shard runs through the ordinary
`reffuse.core.model.forward(shard, ids, allreduce=...)`, which applies the all-reduce after each row-parallel output.

A fused wide FFN (Theorem 3.1) shards the same way: rank r gets a contiguous slice of the wide hidden
dimension, which may cut across the original blocks. Any split of the hidden units is exact, since the fused
FFN is a sum over hidden units and the all-reduce completes the sum; contiguous slices are simply the
Megatron layout. So a run of k fused FFNs costs one all-reduce where the k sequential blocks cost k.
"""

from __future__ import annotations

import dataclasses

from reffuse.core.backend import array_module
from reffuse.errors import ReffuseError
from reffuse.core.layout import sharding_problems
from reffuse.core.config import Config
from reffuse.core.model import FFN, Attention, Block, Linear, Model


def query_heads(config: Config, rank: int, n_ranks: int) -> range:
    """The query heads rank r holds: a contiguous n_heads/N of them."""
    per_rank = config.n_heads // n_ranks
    return range(rank * per_rank, (rank + 1) * per_rank)


def kv_heads(config: Config, rank: int, n_ranks: int, n_kv: int | None = None) -> range:
    """The key/value heads rank r's query heads read (query head h reads kv head h // (n_heads/n_kv_heads)), of a
    block with n_kv of them (default: the model's n_kv_heads)."""
    n_kv = config.n_kv_heads if n_kv is None else n_kv
    if n_kv >= n_ranks:  # split: n_kv/N per rank
        per_rank = n_kv // n_ranks
        return range(rank * per_rank, (rank + 1) * per_rank)
    ranks_per_kv_head = n_ranks // n_kv  # replicated: N/n_kv ranks share one kv head
    head = rank // ranks_per_kv_head
    return range(head, head + 1)


def column_parallel(weight, rank: int, n_ranks: int, rows: range | None = None):
    """Rank r's output features (rows of a weight stored (out, in)): `rows`, or a contiguous 1/N of them."""
    if rows is None:
        per_rank = weight.shape[0] // n_ranks
        rows = range(rank * per_rank, (rank + 1) * per_rank)
    return array_module(weight).ascontiguousarray(weight[rows.start:rows.stop])       # -> [out/N, in]


def row_parallel(weight, rank: int, n_ranks: int, columns: range | None = None):
    """Rank r's input features (columns of a weight stored (out, in)): `columns`, or a contiguous 1/N of them."""
    if columns is None:
        per_rank = weight.shape[1] // n_ranks
        columns = range(rank * per_rank, (rank + 1) * per_rank)
    return array_module(weight).ascontiguousarray(weight[:, columns.start:columns.stop])  # -> [out, in/N]


def _feature_range(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


def _bias_slice(bias, features: range):
    return None if bias is None else array_module(bias).ascontiguousarray(bias[features.start:features.stop])


def shard_attention(attn: Attention, config: Config, rank: int, n_ranks: int) -> Attention:
    """Rank r's heads: q, k, v column-parallel by head groups, o row-parallel over the same query heads."""
    q_features = _feature_range(query_heads(config, rank, n_ranks), config.head_dim)
    kv_features = _feature_range(kv_heads(config, rank, n_ranks, attn.k.shape[0] // config.head_dim),
                                 config.head_dim)
    return Attention(norm_gain=attn.norm_gain,
                     q=column_parallel(attn.q, rank, n_ranks, q_features),    # [n_heads/N * hd, d]
                     k=column_parallel(attn.k, rank, n_ranks, kv_features),   # [n_kv_local * hd, d]
                     v=column_parallel(attn.v, rank, n_ranks, kv_features),   # [n_kv_local * hd, d]
                     o=row_parallel(attn.o, rank, n_ranks, q_features),       # [d, n_heads/N * hd]
                     q_bias=_bias_slice(attn.q_bias, q_features), k_bias=_bias_slice(attn.k_bias, kv_features),
                     v_bias=_bias_slice(attn.v_bias, kv_features),
                     o_bias=attn.o_bias if rank == 0 else None)              # added once to the sum over ranks


def shard_linear(part: Linear, rank: int, n_ranks: int) -> Linear:
    """Rank r's d/N input features of a linear map, row-parallel: x[:, cols_r] W[:, cols_r]^T, summed over ranks."""
    per_rank = part.weight.shape[1] // n_ranks
    return Linear(part.norm_gain, row_parallel(part.weight, rank, n_ranks), first_input=rank * per_rank)


def shard_ffn(ffn: FFN, rank: int, n_ranks: int) -> FFN:
    """Rank r's hidden units, a contiguous dh/N: gate and up column-parallel (the same units), down row-parallel."""
    return FFN(norm_gain=ffn.norm_gain,
               gate=column_parallel(ffn.gate, rank, n_ranks),   # [dh/N, d]
               up=column_parallel(ffn.up, rank, n_ranks),       # [dh/N, d]
               down=row_parallel(ffn.down, rank, n_ranks))      # [d, dh/N]


def rank_counts_that_work(model: Model, up_to: int = 64) -> list[int]:
    """Every N <= up_to over which `model` can be sharded."""
    return [n for n in range(1, up_to + 1) if not sharding_problems(model, n)]


def check_shardable(model: Model, n_ranks: int) -> None:
    """Raise a ReffuseError naming each dimension that does not divide by n_ranks, and the N that would work."""
    if n_ranks < 1:
        raise ReffuseError(f"cannot shard over {n_ranks} ranks: N must be at least 1")
    problems = sharding_problems(model, n_ranks)
    if problems:
        raise ReffuseError(f"cannot shard {model.config.name} over N={n_ranks} ranks: {'; '.join(problems)}. "
                           f"N that work for this model: {', '.join(map(str, rank_counts_that_work(model)))}")


def shard_model(model: Model, rank: int, n_ranks: int) -> Model:
    """The part of `model` that rank r of n_ranks holds, as a Model with the local head counts in its Config."""
    check_shardable(model, n_ranks)
    if not 0 <= rank < n_ranks:
        raise ReffuseError(f"rank {rank} is out of range for {n_ranks} ranks")
    cfg = model.config
    config = dataclasses.replace(cfg, n_heads=len(query_heads(cfg, rank, n_ranks)),
                                 n_kv_heads=len(kv_heads(cfg, rank, n_ranks)),
                                 name=f"{cfg.name} [tensor-parallel rank {rank} of {n_ranks}]")

    def shard(part, shard_heads):
        if part is None:
            return None
        if isinstance(part, Linear):
            return shard_linear(part, rank, n_ranks)
        return shard_heads(part)

    blocks = [Block(attention=shard(b.attention, lambda a: shard_attention(a, cfg, rank, n_ranks)),
                    ffn=shard(b.ffn, lambda f: shard_ffn(f, rank, n_ranks)), fused_from=b.fused_from)
              for b in model.blocks]
    shard = dataclasses.replace(model, config=config, blocks=blocks)  # embeddings, norm, LM head replicated
    return shard.kernels.arrange(shard)  # its new attention weights held as its kernels read them


def allreduces_per_forward(model: Model, parallel_groups=None) -> int:
    """The all-reduces one tensor-parallel forward pass makes: one per attention sub-block (after o) and one per
    FFN step (after down), where a parallel run or a fused block is one step."""
    in_runs = sum(last - first + 1 for first, last in (parallel_groups or []))
    ffn_steps = sum(b.ffn is not None for b in model.blocks) - in_runs + len(parallel_groups or [])
    return sum(b.attention is not None for b in model.blocks) + ffn_steps
