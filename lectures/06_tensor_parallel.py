# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lecture 06 — Tensor parallelism with MPI: where fusion saves synchronisation
#
# The paper's speed argument (§3 "Efficiency motivation", Fig. 2) is about **tensor parallelism** (TP): a model
# too large or too slow for one GPU is split over N GPUs *inside every layer*. Each layer then ends with an
# **all-reduce** — every GPU waits for every other — and at small batch those synchronisations are a large share
# of the time. A fused run of k FFNs is one layer, so it synchronises once instead of k times.
#
# This lecture builds that up with `reffuse.tp`:
#
# 1. Megatron sharding: column-parallel and row-parallel projections, and why the partial outputs *sum* to the
#    true output (so one all-reduce per row-parallel layer is all that is needed);
# 2. the ring all-reduce, step by step, on a communicator made of threads so that every message can be printed;
# 3. real ranks: launching the environment's own `mpiexec` from the notebook;
# 4. all-reduce counts and times, sequential vs fused, on tiny and SmolLM2, and at the paper's scale.
#
# MPI comes from the `mpi` extra (mpi4py and MPICH from the package registry; `mpiexec` lands in the virtual
# environment). Without it, the cells that launch ranks say so and the lecture reads the committed results.
# Runs in about half a minute.

# %%
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from queue import Queue

import numpy as np

import reffuse
from reffuse.speed import costmodel
from reffuse.speed.tp_result import TpResult
from reffuse import attention, drop_attention, rms_norm, rope_tables, swiglu
from reffuse.tp import allreduces_per_forward, rank_counts_that_work, ring_allreduce, shard_model, sharding_problems

RESULTS = reffuse.checkout_root() / "benchmarks" / "results"      # committed `reffuse tp --json` results
MPIEXEC = Path(sys.executable).parent / "mpiexec"     # the virtual environment's own launcher (the `mpi` extra)

# %% [markdown]
# ## 1. Sharding the Megatron way
#
# A weight stored `(out, in)` can be split two ways over N ranks:
#
# * **column-parallel**: each rank holds a slice of the *output* features (rows of `W`). From a replicated
#   input `x [T, d]`, rank r computes its own slice of `x @ W.T` — no communication.
# * **row-parallel**: each rank holds a slice of the *input* features (columns of `W`). Given only its slice of
#   the input, rank r computes a **partial sum** `[T, d]`; the true output is the sum over ranks — one
#   all-reduce.
#
# For the SwiGLU FFN: gate and up are column-parallel over the **same** hidden units, each sharded on its own
# (silu(gate) must meet the up projection of the same unit), and down is row-parallel over those units. For
# attention: q, k, v are column-parallel by heads, o is row-parallel. Everything between the column- and the
# row-parallel projection (SiLU and ⊙; attention within a head) is local to a rank. So a block costs two
# all-reduces (after o and after down), an attention-free block one, and a fused run of k FFNs one.
#
# SmolLM2 has 9 query heads and 3 key/value heads, so N must divide 9 (and 3, or be divided by it):

# %%
model = reffuse.load_model("smollm2")
print("N that work for SmolLM2:", rank_counts_that_work(model, up_to=12))
print("N = 2:", sharding_problems(model, 2))

# %% [markdown]
# Shard block 0 over N = 3 ranks — in one process, so we can look at every rank's piece — and check both sums:

# %%
N = 3
shards = [shard_model(model, r, N) for r in range(N)]
block, cfg = model.blocks[0], model.config
print("rank 0 holds: q", shards[0].blocks[0].attention.q.shape, " o", shards[0].blocks[0].attention.o.shape,
      " gate", shards[0].blocks[0].ffn.gate.shape, " down", shards[0].blocks[0].ffn.down.shape)

ids = np.arange(1, 17)                                              # 16 token ids, any will do here
x = model.embed[ids]                                                # [T, d], replicated on every rank
u = rms_norm(x, block.ffn.norm_gain, cfg.norm_eps)                        # norms are replicated too
partial_ffn = [swiglu(s.blocks[0].ffn, u) for s in shards]          # N partial sums, each [T, d]
print(f"FFN: max |Σ_r partial_r - FFN(u)| = {np.abs(sum(partial_ffn) - swiglu(block.ffn, u)).max():.1e}")

cos, sin = rope_tables(np.arange(len(ids)), cfg.head_dim, cfg.rope_theta, model.dtype)
h = rms_norm(x, block.attention.norm_gain, cfg.norm_eps)
partial_attn = [attention(s.blocks[0].attention, h, s.config, cos, sin) for s in shards]   # 3 heads per rank
print(f"attention: max |Σ_r partial_r - Attn(h)| = "
      f"{np.abs(sum(partial_attn) - attention(block.attention, h, cfg, cos, sin)).max():.1e}")

# %% [markdown]
# Both agree to float32 rounding: sharding is exact, only the order of additions changes. The sum over ranks
# is what the all-reduce computes. In a real run, `reffuse.forward(shard, ids, allreduce=...)` calls the
# all-reduce on each row-parallel output before adding it to the residual stream.
#
# ## 2. The ring all-reduce, step by step
#
# An all-reduce leaves the sum of every rank's buffer on every rank. The **ring** algorithm (`reffuse.tp.ring`,
# read its docstring) cuts the buffer into N chunks and passes chunks around a ring of ranks: N − 1 steps of
# *reduce-scatter* (each step, every rank sends one chunk to its right neighbour and adds the chunk arriving from
# its left), after which each rank holds one complete chunk, then N − 1 steps of *all-gather* to spread the
# complete chunks. Each rank sends 2(N − 1)/N of the buffer in all, almost independent of N; but there are
# 2(N − 1) steps, each paying the network's latency.
#
# To watch it, we run reffuse's own `ring_allreduce` on N threads, with a stand-in for an MPI communicator that
# passes messages through queues and remembers what each rank held at every step. Rank r contributes $10^r$,
# so each digit of a sum says which ranks' contributions it already contains.

# %%
class ThreadComm:
    """The three methods of an MPI communicator that ring_allreduce uses, for ranks that are threads."""

    def __init__(self, rank, size, mailboxes, buffer, history):
        self.rank, self.size, self.mailboxes = rank, size, mailboxes
        self.buffer, self.history = buffer, history

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return self.rank

    def Sendrecv(self, sendbuf, dest, recvbuf, source):
        self.history.append(self.buffer.copy())                    # what this rank holds before this step
        self.mailboxes[self.rank, dest].put(np.array(sendbuf))     # send to the right ...
        recvbuf[...] = self.mailboxes[source, self.rank].get(timeout=10)   # ... receive from the left


def watch_ring(n_ranks, size):
    buffers = [np.full(size, 10.0 ** r) for r in range(n_ranks)]
    mailboxes = {(a, b): Queue() for a in range(n_ranks) for b in range(n_ranks)}
    histories = [[] for _ in range(n_ranks)]
    threads = [threading.Thread(target=ring_allreduce,
                                args=(ThreadComm(r, n_ranks, mailboxes, buffers[r], histories[r]), buffers[r]))
               for r in range(n_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [h + [b.copy()] for h, b in zip(histories, buffers)]   # per rank: state before each step, and at the end


n_ranks = 4
history = watch_ring(n_ranks, size=n_ranks)                         # one element per chunk, to keep it readable
phases = ["start"] + [f"reduce-scatter step {s} done" for s in range(n_ranks - 1)] + \
         [f"all-gather step {s} done" for s in range(n_ranks - 1)]
for step, phase in enumerate(phases):
    print(f"{phase:26s}", "  ".join(f"r{r}: " + " ".join(f"{int(v):>4d}" for v in history[r][step])
                                    for r in range(n_ranks)))

# %% [markdown]
# Read a column of a rank: after step s of the reduce-scatter, one more chunk on each rank has one more digit.
# After N − 1 = 3 steps every rank holds one complete chunk (1111), a different one on each rank; the all-gather
# then copies the complete chunks around until every rank holds 1111 everywhere. Every message went to the right
# neighbour only.
#
# ## 3. Real ranks: `mpiexec` from the notebook
#
# MPI starts N copies of a program, one process per rank; they find each other through `MPI.COMM_WORLD`. We
# start the environment's own launcher with `subprocess` — first a five-line program that runs the same
# `ring_allreduce` over real MPI messages (`comm.Sendrecv`), then reffuse's `tp` command.

# %%
RING_PROGRAM = """
import numpy as np
from mpi4py import MPI
from reffuse.tp import ring_allreduce
comm = MPI.COMM_WORLD
buf = np.full(6, 10.0 ** comm.Get_rank())
ring_allreduce(comm, buf)
print(f"rank {comm.Get_rank()} of {comm.Get_size()}: {buf}")
"""


def launch(n_ranks, *args, timeout=120):
    """Run `mpiexec -n n_ranks python ARGS...` with this environment's launcher; its stdout."""
    done = subprocess.run([str(MPIEXEC), "-n", str(n_ranks), sys.executable, *args],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"mpiexec failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


have_mpi = MPIEXEC.exists()
if have_mpi:
    with tempfile.TemporaryDirectory() as folder:
        program = Path(folder) / "ring.py"
        program.write_text(RING_PROGRAM)
        print("".join(sorted(launch(4, str(program)).splitlines(keepends=True))))
else:
    print(f"no mpiexec at {MPIEXEC}: install the `mpi` extra (pip install -e '.[mpi]') to launch ranks")

# %% [markdown]
# `mpiexec -n N reffuse tp` shards a model over the ranks, runs a prefill and decode steps for the sequential and
# the fused model, checks the logits against one process, and counts and times every all-reduce. On tiny
# (synthetic, random weights: it shows the mechanics), fusing the run of blocks 4–8 (k = 5 FFNs):

# %%
if have_mpi:
    raw = json.loads(launch(2, "-m", "reffuse", "tp", "--model", "tiny", "--groups", "4-8", "--json"))
else:
    raw = json.loads((RESULTS / "tp_tiny_n2.json").read_text())
    print("(read from the committed results: benchmarks/results/tp_tiny_n2.json)")
tiny_result = TpResult.from_json(raw)
for variant, r in tiny_result.variants().items():
    print(f"{variant:10s} blocks {r.blocks:2d}   all-reduces per forward {r.prefill.allreduce_count:2d}   "
          f"bytes summed {r.prefill.allreduce_bytes:7,d}")
print(f"parity with one process: {tiny_result.parity} (max relative error {tiny_result.errors.max_rel_error:.1e})")

# %% [markdown]
# 18 all-reduces become 14 = 18 − (5 − 1): the five FFNs of the run now sync once. The general count, for a
# model whose blocks each have attention or an FFN or both (`reffuse.tp.allreduces_per_forward`):
#
# $$\text{all-reduces per forward} = (\text{blocks with attention}) + (\text{FFN steps}),$$
#
# where a fused (or parallel) run is one FFN step.
#
# ## 4. Counts and times on SmolLM2, and at the paper's scale
#
# SmolLM2 has attention everywhere; the `tp` command first removes the attention of blocks 14–21 and fuses
# 14–20 (the run without its last block). The count, without running anything:

# %%
removed = drop_attention(model, range(14, 22))
print("SmolLM2 all-reduces per forward: original", allreduces_per_forward(model),
      "| attention removed", allreduces_per_forward(removed),
      "| fused", allreduces_per_forward(removed, parallel_groups=[(14, 20)]))

# %% [markdown]
# Measuring SmolLM2 over 3 ranks takes longer than a lecture should, so we read the committed result of
# `mpiexec -n 3 reffuse tp --model smollm2 --json` (the exact command is in `benchmarks/results/tp.md`). It was
# measured on a shared 2-core machine where three ranks share two cores, so its times are noisy (compare
# sequential with fused only within the file); its counts and errors are exact.

# %%
smollm2_result = TpResult.from_json(json.loads((RESULTS / "tp_smollm2_n3.json").read_text()))
print(f"ranks {smollm2_result.ranks}, prefill of {smollm2_result.tokens} tokens, "
      f"parity {smollm2_result.parity} (max relative error {smollm2_result.errors.max_rel_error:.1e})")
for variant, r in smollm2_result.variants().items():
    print(f"{variant:10s} all-reduces {r.prefill.allreduce_count:2d}  prefill {1e3 * r.prefill.seconds:7.2f} ms "
          f"(all-reduce {1e3 * r.prefill.allreduce_seconds:6.2f} ms)  decode step {1e3 * r.decode.seconds:6.2f} ms "
          f"(all-reduce {1e3 * r.decode.allreduce_seconds:6.2f} ms)")

# %% [markdown]
# At the paper's scale the same arithmetic is `reffuse.speed.costmodel`: Llama-3.1-405B has 126 full blocks; the
# 253B PreFusion model lost about half its attention layers (a run of 50 attention-free blocks); FFN Fusion then
# turned 49 of those 50 FFNs into 4. Under TP8 on one 8×H100 node, with the cost model's alpha-beta ring
# (0.7 µs per step, NVLink), one all-reduce of a decode step's `[1, 16384]` bf16 activations costs:

# %%
h100 = costmodel.get_hardware("h100-sxm")
per_sync = costmodel.allreduce_seconds(h100, 8, 16384 * h100.activation_bytes)
for name in ("llama-3.1-405b", "ultra-253b-prefusion", "ultra-253b-fused"):
    layout = costmodel.get_layout(name)
    count = costmodel.allreduce_count(layout, 8)
    total = costmodel.forward_cost(layout, h100, tp=8, tokens=1, context=1024).seconds
    print(f"{name:22s} blocks {len(layout.blocks):3d}  all-reduces {count:3d}  -> {1e3 * count * per_sync:5.2f} ms "
          f"of a {1e3 * total:5.2f} ms decode step")

# %% [markdown]
# Fusion removes 45 all-reduces per token at TP8 (and 4 × 45 fewer kernels launched). Lecture 05 puts these
# numbers into the whole latency model and beside the paper's measured tokens/s.

# %% [markdown]
# ## Exercises
#
# 1. **Any cut is exact.** Split tiny's fused FFN (`reffuse.fuse(tiny, [(4, 8)])`, block 4) over 4 "ranks" by
#    *interleaved* hidden units (rank r takes units r, r+4, r+8, ...) and check that the partial outputs still
#    sum to the full output. Why does Megatron use contiguous slices anyway?
# 2. **Ring traffic.** With `watch_ring`, count the messages each rank sends for N = 2..6 and the elements per
#    message for a buffer of 60 elements. Check that each rank sends 2(N − 1)/N of the buffer.
# 3. **Ring vs MPI.** Launch `mpiexec -n 4 python -m reffuse tp --model tiny --allreduce ring --json` and the
#    same with `--allreduce mpi`. Compare all-reduce time per forward. Why might MPI's own be faster?
# 4. **Which N for SmolLM2 fused?** The fused FFN of blocks 14–20 is 7 × 1536 = 10752 units wide. For which
#    N ≤ 12 can the fused model be sharded, and which dimension rules out the rest?
# 5. **Counting at the paper's scale.** Without the cost model, count the all-reduces per forward at TP8 of
#    Llama-405B (126 full blocks) and of a model whose attention-free run of 50 blocks is fused into 4 groups
#    leaving its last block alone; compare with `costmodel.allreduce_count`.
#
# Solutions: `lectures/solutions/06_solutions.py` (run it: `python lectures/solutions/06_solutions.py`).
#
# **Graded: a ring step.** Write `ring_step` in `lectures/exercises/student.py`;
# `python -m pytest lectures/exercises/test_06_tensor_parallel.py` grades every step against what
# `reffuse.tp.ring.ring_allreduce` leaves on each rank (`docs/course.md`).
