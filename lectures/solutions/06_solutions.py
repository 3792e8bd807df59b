"""Solutions to the exercises of lecture 06 (tensor parallelism). Run: python lectures/solutions/06_solutions.py"""

import json
import subprocess
import sys
import threading
from pathlib import Path
from queue import Queue

import numpy as np

import reffuse
from reffuse.speed import costmodel
from reffuse.speed.tp_result import TpResult
from reffuse import FFN, drop_attention, rms_norm, swiglu
from reffuse.tp import ring_allreduce, sharding_problems

# 1. Any cut of the hidden units is exact: the FFN is a sum over hidden units, whatever the grouping.
#    Megatron uses contiguous slices because they are plain views of the weights (one GEMM per rank, no gather
#    of scattered rows) and they keep each original block's units together.
tiny = reffuse.load_model("tiny", dtype="float64")
wide = reffuse.fuse(tiny, [(4, 8)]).blocks[4].ffn
x = np.random.default_rng(0).standard_normal((8, tiny.config.dim))
u = rms_norm(x, wide.norm_gain, tiny.config.norm_eps)
parts = [swiglu(FFN(wide.norm_gain, wide.gate[r::4], wide.up[r::4], wide.down[:, r::4]), u) for r in range(4)]
err = np.abs(sum(parts) - swiglu(wide, u)).max()
print(f"1. interleaved shards over 4 ranks: max |Σ partial - full| = {err:.1e}")
assert err < 1e-12


# 2. Ring traffic: 2 (N - 1) messages per rank, each a chunk of size/N elements.
class CountingComm:
    def __init__(self, rank, size, mailboxes, sent):
        self.rank, self.size, self.mailboxes, self.sent = rank, size, mailboxes, sent

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return self.rank

    def Sendrecv(self, sendbuf, dest, recvbuf, source):
        self.sent.append(len(sendbuf))
        self.mailboxes[self.rank, dest].put(np.array(sendbuf))
        recvbuf[...] = self.mailboxes[source, self.rank].get(timeout=10)


size = 60
for n in range(2, 7):
    buffers = [np.full(size, float(r)) for r in range(n)]
    mailboxes = {(a, b): Queue() for a in range(n) for b in range(n)}
    sent = [[] for _ in range(n)]
    threads = [threading.Thread(target=ring_allreduce, args=(CountingComm(r, n, mailboxes, sent[r]), buffers[r]))
               for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(b, np.full(size, sum(range(n)))) for b in buffers)
    assert all(len(s) == 2 * (n - 1) for s in sent)
    fraction = sum(sent[0]) / size
    print(f"2. N={n}: {len(sent[0])} messages per rank, {sent[0][0]} elements each, "
          f"{fraction:.3f} of the buffer (2(N-1)/N = {2 * (n - 1) / n:.3f})")
    assert abs(fraction - 2 * (n - 1) / n) < 1e-9

# 3. Ring vs MPI's own all-reduce, 4 ranks on tiny. MPICH picks its algorithm by message size (recursive
#    doubling for small messages: log2(N) steps instead of 2(N-1)) and runs it in C, so it is usually faster.
mpiexec = Path(sys.executable).parent / "mpiexec"
if mpiexec.exists():
    for kind in ("ring", "mpi"):
        out = subprocess.run([str(mpiexec), "-n", "4", sys.executable, "-m", "reffuse", "tp", "--model", "tiny",
                              "--allreduce", kind, "--json"], capture_output=True, text=True, timeout=300, check=True)
        result = TpResult.from_json(json.loads(out.stdout))
        r = result.sequential.prefill
        print(f"3. --allreduce {kind}: {r.allreduce_count} all-reduces, {1e3 * r.allreduce_seconds:.2f} ms "
              f"per prefill forward, parity {result.parity}")
        assert result.parity
else:
    print("3. skipped: no mpiexec in this environment (install the `mpi` extra)")

# 4. The fused SmolLM2 (attention removed in 14-21, 14-20 fused): 9 query heads allow N = 1, 3, 9 (3 kv heads
#    split for 3, replicated for 9); 1536 = 2^9 * 3 rules out 9. Only N = 1 and 3 work, as before fusion.
smollm2 = reffuse.load_model("smollm2")
fused = reffuse.fuse(drop_attention(smollm2, range(14, 22)), [(14, 20)])
assert max(b.ffn.width for b in fused.blocks) == 10752
works = [n for n in range(1, 13) if not sharding_problems(fused, n)]
print(f"4. N <= 12 that shard the fused SmolLM2: {works}; N = 9 fails on:", sharding_problems(fused, 9))
assert works == [1, 3]

# 5. Llama-405B at TP8: 126 blocks x 2 = 252 all-reduces. Ultra: costmodel's pre-fusion layout, minus 49 - 4 = 45.
prefusion = costmodel.get_layout("ultra-253b-prefusion")
attention_syncs = sum(b.attention for b in prefusion.blocks)
ffn_syncs = sum(b.ffn_width > 0 for b in prefusion.blocks)
by_hand = {"llama-3.1-405b": 126 * 2, "ultra-253b-prefusion": attention_syncs + ffn_syncs,
           "ultra-253b-fused": attention_syncs + ffn_syncs - (49 - 4)}
for name, count in by_hand.items():
    model_count = costmodel.allreduce_count(costmodel.get_layout(name), 8)
    print(f"5. {name}: by hand {count}, cost model {model_count}")
    assert count == model_count
