"""Tensor parallelism without MPI: sharding math, the ring all-reduce and the all-reduce count, in one process.

N ranks run as N threads with a small stand-in for an mpi4py communicator (ThreadComm: Sendrecv and Barrier,
what the ring all-reduce needs), so the whole sharded forward is checked here; tests/tp/test_tp_mpi.py runs the
same code under a real `mpiexec`.
"""

import queue
import threading

import numpy as np
import pytest

import reffuse
from reffuse.core.backend import to_numpy
from reffuse.errors import ReffuseError
from reffuse.core.fusion import fuse
from reffuse.core.config import Config
from reffuse.core.kv_cache import KVCache
from reffuse.core.model import FFN, Attention, Block, Model, attention, swiglu
from reffuse.core.rope import rope_tables
from reffuse.tp import (AllReduce, allreduces_per_forward, check_shardable, kv_heads, query_heads,
                        rank_counts_that_work, ring_allreduce, shard_model, sharding_problems)

FUSED_RUN = (4, 8)  # tiny's attention-free run without its last block: k = 5 FFNs


class ThreadComm:
    """Rank `rank` of `size` threads: mpi4py's Sendrecv and Barrier through queues, one per (sender, receiver)."""

    def __init__(self, rank, size, mailboxes, barrier):
        self.rank, self.size, self.mailboxes, self.barrier = rank, size, mailboxes, barrier

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=0, recvtag=0):
        if type(sendbuf).__module__ == "strict_cupy":  # MPI reads device memory directly: the stream must be done
            import strict_cupy
            if not strict_cupy.idle():
                raise AssertionError("a device buffer was handed to MPI before its stream was synchronised")
        self.mailboxes[self.rank, dest].put(sendbuf.copy())  # queues are unbounded: put never blocks
        recvbuf[...] = self.mailboxes[source, self.rank].get(timeout=600)  # hang guards, not speed limits

    def Barrier(self):
        self.barrier.wait(timeout=600)


def run_ranks(size, fn):
    """[fn(comm) for each rank], each rank in its own thread; an exception on any rank is raised here."""
    mailboxes = {(a, b): queue.Queue() for a in range(size) for b in range(size)}
    barrier = threading.Barrier(size)
    results, failures = [None] * size, []

    def rank_main(rank):
        try:
            results[rank] = fn(ThreadComm(rank, size, mailboxes, barrier))
        except BaseException as e:  # handed to the test thread below
            failures.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1200)
    if failures:
        raise failures[0]
    return results


def tp_forwards(model, ids, size, prefill, xp_device="cpu"):
    """Every rank's logits for a prefill of ids[:prefill] then one-token decode steps, and its all-reduce counts."""
    def rank_main(comm):
        shard = reffuse.to_device(shard_model(model, comm.Get_rank(), size), xp_device)
        allreduce = AllReduce(comm, "ring", cuda_aware=False)
        cache = KVCache(shard, len(ids))
        logits, counts = [], []
        for step in [ids[:prefill]] + [ids[t:t + 1] for t in range(prefill, len(ids))]:
            allreduce.stats.reset()
            logits.append(to_numpy(reffuse.forward(shard, step, cache=cache, allreduce=allreduce)))
            counts.append(allreduce.stats.count)
        return logits, counts
    return run_ranks(size, rank_main)


def single_process_forwards(model, ids, prefill):
    cache = KVCache(model, len(ids))
    return [reffuse.forward(model, step, cache=cache)
            for step in [ids[:prefill]] + [ids[t:t + 1] for t in range(prefill, len(ids))]]


# ----------------------------------------------------------------------------------------------------------------
# Sharding math: the sum over shards of the partial outputs is the unsharded output


@pytest.mark.parametrize("n_ranks", [1, 2, 4])
def test_sum_of_partial_attention_outputs_is_the_attention(tiny64, n_ranks):
    x = np.random.default_rng(0).standard_normal((7, tiny64.config.dim))
    cos, sin = rope_tables(np.arange(7), tiny64.config.head_dim, tiny64.config.rope_theta, np.float64)
    shards = [shard_model(tiny64, r, n_ranks) for r in range(n_ranks)]
    for layer in (0, 10):  # attention blocks before and after the attention-free run
        full = attention(tiny64.blocks[layer].attention, x, tiny64.config, cos, sin)
        partial = sum(attention(s.blocks[layer].attention, x, s.config, cos, sin) for s in shards)
        np.testing.assert_allclose(partial, full, rtol=0, atol=1e-12)  # float64: only summation order differs


@pytest.mark.parametrize("n_ranks", [2, 4])
def test_sum_of_partial_ffn_outputs_is_the_ffn_also_when_fused(tiny64, n_ranks):
    x = np.random.default_rng(1).standard_normal((5, tiny64.config.dim))
    fused = fuse(tiny64, [FUSED_RUN])  # a contiguous slice of the wide FFN cuts across the original blocks
    for model, layer in ((tiny64, 5), (fused, FUSED_RUN[0])):
        full = swiglu(model.blocks[layer].ffn, x)
        partial = sum(swiglu(shard_model(model, r, n_ranks).blocks[layer].ffn, x) for r in range(n_ranks))
        np.testing.assert_allclose(partial, full, rtol=0, atol=1e-12)


def test_shards_hold_1_over_n_of_each_sharded_weight_and_replicate_the_rest(tiny32):
    shard = shard_model(tiny32, 1, 2)
    full_attn, attn = tiny32.blocks[0].attention, shard.blocks[0].attention
    assert attn.q.shape == (full_attn.q.shape[0] // 2, 64)   # column-parallel: output rows split
    assert attn.o.shape == (64, full_attn.o.shape[1] // 2)   # row-parallel: input columns split
    np.testing.assert_array_equal(attn.q, full_attn.q[32:64])
    np.testing.assert_array_equal(attn.o, full_attn.o[:, 32:64])
    ffn, full_ffn = shard.blocks[1].ffn, tiny32.blocks[1].ffn
    np.testing.assert_array_equal(ffn.gate, full_ffn.gate[48:96])  # gate and up: the same hidden units
    np.testing.assert_array_equal(ffn.up, full_ffn.up[48:96])
    np.testing.assert_array_equal(ffn.down, full_ffn.down[:, 48:96])
    assert shard.embed is tiny32.embed and shard.lm_head is tiny32.lm_head and shard.norm_gain is tiny32.norm_gain
    assert (shard.config.n_heads, shard.config.n_kv_heads) == (2, 1)


def test_kv_heads_split_when_they_divide_and_replicate_when_fewer_than_ranks(tiny32):
    cfg = tiny32.config  # 4 query heads, 2 kv heads: query head h reads kv head h // 2
    assert [list(kv_heads(cfg, r, 2)) for r in range(2)] == [[0], [1]]
    assert [list(query_heads(cfg, r, 4)) for r in range(4)] == [[0], [1], [2], [3]]
    assert [list(kv_heads(cfg, r, 4)) for r in range(4)] == [[0], [0], [1], [1]]  # replicated
    for r in range(4):
        for h in query_heads(cfg, r, 4):
            assert h // (cfg.n_heads // cfg.n_kv_heads) in kv_heads(cfg, r, 4)


def smollm2_shaped_model():
    """SmolLM2-135M's head counts and FFN width (9 query heads, 3 kv heads, 1536) on tiny arrays."""
    cfg = Config(vocab_size=8, dim=8, n_heads=9, n_kv_heads=3, head_dim=2, name="smollm2-shaped")
    z = np.zeros
    attn = Attention(z(8), z((18, 8)), z((6, 8)), z((6, 8)), z((8, 18)))
    block = Block(attn, FFN(z(8), z((1536, 8)), z((1536, 8)), z((8, 1536))))
    return Model(cfg, z((8, 8)), [block, block], z(8), z((8, 8)))


def test_a_dimension_that_does_not_divide_is_named_with_the_n_that_work():
    model = smollm2_shaped_model()
    assert rank_counts_that_work(model) == [1, 3]
    with pytest.raises(ReffuseError, match=r"9 query heads .* N=2.*N that work for this model: 1, 3"):
        check_shardable(model, 2)
    assert any("1536" in p for p in sharding_problems(model, 9))  # 9 splits the heads but not the FFN
    with pytest.raises(ReffuseError, match="FFN width 128"):
        shard_model(Model(model.config, model.embed,
                          [Block(None, FFN(np.zeros(8), np.zeros((128, 8)), np.zeros((128, 8)), np.zeros((8, 128))))],
                          model.norm_gain, model.lm_head), 0, 3)


# ----------------------------------------------------------------------------------------------------------------
# The ring all-reduce


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [0, 1, 4, 7, 103])
def test_ring_allreduce_is_the_sum_for_any_size(n_ranks, size):
    buffers = [np.random.default_rng(r).standard_normal(size) for r in range(n_ranks)]
    expected = np.sum(buffers, axis=0)
    results = run_ranks(n_ranks, lambda comm: ring_allreduce(comm, buffers[comm.Get_rank()].copy()))
    for result in results:
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-12)


def test_allreduce_counts_bytes_and_keeps_the_shape():
    def rank_main(comm):
        allreduce = AllReduce(comm, "ring", cuda_aware=False)
        out = allreduce(np.full((3, 5), comm.Get_rank() + 1, dtype=np.float32))
        allreduce(np.ones((2, 5), dtype=np.float32))
        return out, allreduce.stats.as_dict()
    for out, stats in run_ranks(3, rank_main):
        np.testing.assert_array_equal(out, np.full((3, 5), 6, dtype=np.float32))
        assert stats["count"] == 2 and stats["bytes"] == (15 + 10) * 4 and stats["seconds"] >= 0


def test_an_unknown_allreduce_kind_is_refused():
    with pytest.raises(ReffuseError, match="mpi, ring"):
        AllReduce(None, "tree", cuda_aware=False)


# ----------------------------------------------------------------------------------------------------------------
# The whole tensor-parallel forward, and the all-reduce count


@pytest.mark.parametrize("n_ranks", [2, 4])
def test_tensor_parallel_forward_equals_the_single_process_one(tiny32, tiny_ids, n_ranks):
    for model in (tiny32, fuse(tiny32, [FUSED_RUN])):
        reference = single_process_forwards(model, tiny_ids, prefill=20)   # then 4 decode steps
        scale = max(np.abs(r).max() for r in reference)
        for logits, _ in tp_forwards(model, tiny_ids, n_ranks, prefill=20):
            for out, ref in zip(logits, reference):
                # float32: the partial sums are added in another order, ~1e-7 relative; reffuse's parity bound is
                # <= 1e-5
                assert np.abs(out - ref).max() <= 1e-5 * scale


def test_allreduces_per_forward_are_attention_blocks_plus_ffn_blocks_after_fusion(tiny32, tiny_ids):
    k = FUSED_RUN[1] - FUSED_RUN[0] + 1
    fused = fuse(tiny32, [FUSED_RUN])
    sequential_count = 6 + 12  # tiny: 6 blocks with attention, 12 FFNs
    assert allreduces_per_forward(tiny32) == sequential_count
    assert allreduces_per_forward(fused) == 6 + (12 - k + 1) == sequential_count - (k - 1)
    assert allreduces_per_forward(tiny32, parallel_groups=[FUSED_RUN]) == allreduces_per_forward(fused)
    for model in (tiny32, fused):
        for _, counts in tp_forwards(model, tiny_ids[:6], 2, prefill=4):
            assert counts == [allreduces_per_forward(model)] * 3  # prefill and each decode step alike


@pytest.mark.parametrize("cuda_aware", [False, True])
def test_tensor_parallel_forward_on_gpu_ranks(device, tiny32, tiny_ids, cuda_aware):
    # threads stand in for MPI here, so "CUDA-aware" hands the device arrays to Sendrecv as they are (and the
    # stand-in checks that their stream was synchronised first); host staging copies them through host memory
    reference = single_process_forwards(tiny32, tiny_ids, prefill=20)
    scale = max(np.abs(r).max() for r in reference)

    def rank_main(comm):
        shard = reffuse.to_device(shard_model(tiny32, comm.Get_rank(), 2), "gpu")
        allreduce = AllReduce(comm, "ring", cuda_aware=cuda_aware)
        cache = KVCache(shard, len(tiny_ids))
        return [to_numpy(reffuse.forward(shard, step, cache=cache, allreduce=allreduce))
                for step in [tiny_ids[:20]] + [tiny_ids[t:t + 1] for t in range(20, len(tiny_ids))]]
    for logits in run_ranks(2, rank_main):
        for out, ref in zip(logits, reference):
            assert np.abs(out - ref).max() <= 1e-5 * scale
    if not cuda_aware and hasattr(device, "stats"):
        assert device.stats["to_host"] > 0  # staged through host memory (the stand-in counts it)


def test_the_stand_in_catches_a_buffer_handed_to_mpi_before_its_stream_finished(strict_device, monkeypatch):
    device = strict_device
    from reffuse.tp import allreduce as allreduce_module, ring
    monkeypatch.setattr(allreduce_module, "synchronize", lambda x: None)  # forget to synchronise
    monkeypatch.setattr(ring, "synchronize", lambda x: None)

    def rank_main(comm):
        return AllReduce(comm, "ring", cuda_aware=True)(device.asarray(np.ones((2, 8))) * 2)
    with pytest.raises(AssertionError, match="before its stream was synchronised"):
        run_ranks(2, rank_main)


def test_allreduce_figure_draws_from_tp_json(tmp_path):
    pytest.importorskip("matplotlib")
    import dataclasses
    import json

    from reffuse.plots import save_figure
    from reffuse.plots.tp import allreduce_figure
    from reffuse.speed.tp_result import TpResult

    committed = reffuse.checkout_root() / "benchmarks" / "results" / "tp_tiny_n2.json"
    result = TpResult.from_json(json.loads(committed.read_text()))
    without_decode = dataclasses.replace(result, ranks=4, fused=dataclasses.replace(result.fused, decode=None))
    path = save_figure(allreduce_figure([result, without_decode]), tmp_path / "tp.png")
    assert path.stat().st_size > 0
