"""How fast reffuse trains, against PyTorch taking the same step: `reffuse bench --train`.

A training step: one forward over a window of T tokens (T = 512), the mean next-token cross-entropy, the backward
to every trainable weight, clipping by global norm and one AdamW step (HYPERPARAMETERS; weight decay on matrices
only), as reffuse's trainer takes it. Both engines take it on the same window of real text (the first T tokens of
the training split, reffuse.formats.corpus; random ids on the synthetic tiny model), from the same float32
weights, with the same trainable set and the same thread count:

- reffuse: reffuse.gradients, clip_by_global_norm and reffuse.training.optim.AdamW, on copies of the trainable
  weights (as reffuse.training.trainer makes them);
- PyTorch: autograd, clip_grad_norm_ and torch.optim.AdamW (its default implementation), on transformers'
  LlamaForCausalLM (sdpa attention) holding the same weights where the model is a plain Llama, else on the
  equations written in PyTorch (reffuse.speed.torch_models.equations_forward); only the trainable tensors
  require grad.

Trainable sets: "all" (every weight) and "fused" (the fused blocks of the fused model: the attention of blocks
5-12 removed, then blocks 5-8 and 9-11 fused, FUSED_REMOVED and FUSED_GROUPS).

Each engine runs in a worker process of its own, so that its peak resident memory (peak_rss_bytes) is its own:
the worker loads the model, makes its trainable copy and waits; the parent then has the two take steps in turns,
one step at a time, after one untimed warm-up step each, the order swapped every round. A worker times its own
step. Round i of both is a pair: the ratio reffuse tokens/s over PyTorch tokens/s is the ratio of their median
steps, with the bootstrap 95% interval of the pairs (reffuse.stats.paired_ratio), and the targets' verdicts follow
from where the interval lies (reffuse.speed.bench_report.check_train_targets). Both workers stay resident; one
computes at a time.
The warm-up step's loss is each engine's loss at the loaded weights: the two must agree.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from reffuse.core.model import Model
from reffuse.core.names import named_weights, with_weights
from reffuse.errors import ReffuseError
from reffuse.optional import require
from reffuse.records import as_json, as_tuple, present_fields
from reffuse.speed.bench_report import RATIO, check_train_targets
from reffuse.speed.environment import environment
from reffuse.speed.timing import blas_threads
from reffuse.speed.train_result import (EngineSteps, FusedModel, Hyperparameters, TorchLibraries, TrainResult,
                                        TrainRow)
from reffuse.stats import paired_ratio

TRAIN_CHOICES = ("all", "fused")
TRAIN_TOKENS = 512
FUSED_REMOVED = range(5, 13)       # blocks whose attention the fused model drops (those that have one)
FUSED_GROUPS = ((5, 8), (9, 11))   # then fuses
HYPERPARAMETERS = Hyperparameters(learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=1.0)
ENGINES = ("reffuse", "pytorch")
PAUSE_SECONDS = 0.05               # before each step: the last engine's idle OpenMP/BLAS threads stop spinning
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------------------------------
# What is trained, on what


def training_model(model: Model, train: str) -> Model:
    """The model a step trains: the model itself for "all"; for "fused" the model with the attention of
    FUSED_REMOVED dropped (those blocks that have one) and FUSED_GROUPS fused."""
    if train == "all":
        return model
    if train != "fused":
        raise ReffuseError(f"--train {train!r} is not a choice: use one of {', '.join(TRAIN_CHOICES)}")
    from reffuse.core.fusion import fuse
    from reffuse.method.removal import drop_attention

    if len(model.blocks) <= FUSED_GROUPS[-1][1]:
        raise ReffuseError(f"{model.config.name} has {len(model.blocks)} blocks: the fused training benchmark fuses "
                           f"blocks {', '.join(f'{a}-{b}' for a, b in FUSED_GROUPS)}")
    removed = [i for i in FUSED_REMOVED if i < len(model.blocks) and model.blocks[i].attention is not None]
    return fuse(drop_attention(model, removed) if removed else model, list(FUSED_GROUPS))


def trainable_set(model: Model, train: str) -> list[str]:
    """The HF names that train: every weight ("all") or those of the fused blocks ("fused")."""
    from reffuse.training.trainer import trainable_names
    return trainable_names(model, train)


def text_window(model_name: str, model: Model, tokens: int) -> tuple[np.ndarray, str]:
    """The ids both engines train on, and what they are: the first `tokens` tokens of the training split, or
    seeded random ids on the synthetic model."""
    from reffuse.method.pipeline import is_synthetic, synthetic_windows

    if is_synthetic(model_name, model):
        windows = synthetic_windows(model, "training", tokens, tokens)
        return windows.ids[0], windows.split
    from reffuse.formats.corpus import split_texts, token_windows
    from reffuse.formats.registry import check_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    check_tokenizer(tokenizer, model, model_name)
    windows = token_windows(split_texts("training")[:1], tokenizer, tokens, tokens, "training")
    span = windows.spans[0]
    return windows.ids[0], f"the first {tokens} tokens of {span.title} (training split)"


# ---------------------------------------------------------------------------------------------------------------
# The two engines, each behind step() -> the loss before its update


class ReffuseStep:
    implementation = "reffuse.gradients, clip_by_global_norm, AdamW (reffuse.training)"

    def __init__(self, model: Model, trainable, ids):
        from reffuse.training.gradients import gradients
        from reffuse.training.optim import AdamW, clip_by_global_norm

        self.gradients, self.clip = gradients, clip_by_global_norm
        self.model = with_weights(model, {n: w.copy() for n, w in named_weights(model).items() if n in trainable})
        weights = {n: w for n, w in named_weights(self.model).items() if n in trainable}  # what it computes with
        h = HYPERPARAMETERS
        self.optimizer = AdamW(weights, h.betas, h.eps, h.weight_decay)
        self.trainable, self.ids = set(trainable), np.asarray(ids, dtype=np.int64)
        self.parameters = sum(int(w.size) for w in weights.values())

    def step(self) -> float:
        loss, grads = self.gradients(self.model, self.ids, trainable=self.trainable)
        self.clip(grads, HYPERPARAMETERS.clip)
        self.optimizer.step(grads, HYPERPARAMETERS.learning_rate)
        return float(loss)


# ---------------------------------------------------------------------------------------------------------------
# The worker process of one engine, and the parent's side of it


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far: on Linux VmHWM of /proc/self/status, the high-water mark of
    this process's own memory (ru_maxrss is not: a child starts with its parent's peak, carried over fork and
    exec), elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process times (worker_main), sent to it as the first line of its input."""
    model: str
    train: str                         # "all" or "fused"
    ids: tuple[int, ...]               # the window both engines train on
    threads: int
    engine: str                        # "reffuse" or "pytorch"

    def to_json(self) -> dict:
        return as_json(asdict(self))

    @classmethod
    def from_json(cls, raw: dict) -> WorkerSpec:
        return cls(raw["model"], raw["train"], as_tuple(raw["ids"]), raw["threads"], raw["engine"])


@dataclass(frozen=True)
class WorkerSetup:
    """A worker's first reply, once its engine is set up: what computes the step, and what setting it up cost."""
    implementation: str
    trainable_tensors: int
    trainable_parameters: int
    setup_seconds: float
    rss_after_setup_bytes: int
    libraries: TorchLibraries | None = None   # PyTorch's only

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> WorkerSetup:
        libraries = raw.get("libraries")
        return cls(raw["implementation"], raw["trainable_tensors"], raw["trainable_parameters"], raw["setup_seconds"],
                   raw["rss_after_setup_bytes"], None if libraries is None else TorchLibraries.from_json(libraries))


def worker_main() -> None:
    """One engine's worker: a WorkerSpec on the first line of stdin (reply: a WorkerSetup), then "step" (reply:
    seconds, loss) as often as asked, then "stop" (reply: the peak resident memory). Replies are JSON lines on the
    original stdout; anything else written to stdout goes to stderr."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**fields):
        replies.write(json.dumps(fields) + "\n")
        replies.flush()

    spec = WorkerSpec.from_json(json.loads(sys.stdin.readline()))
    try:
        started = time.perf_counter()
        with blas_threads(spec.threads):
            from reffuse.formats.registry import load_model
            model = training_model(load_model(spec.model, dtype="float32"), spec.train)
            trainable = trainable_set(model, spec.train)
            libraries = None
            if spec.engine == "pytorch":
                from reffuse.speed.torch_models import TorchStep, torch_libraries
                require("torch", "reference", "timing training against PyTorch").set_num_threads(spec.threads)
                libraries = torch_libraries()
                engine = TorchStep(model, trainable, spec.ids, HYPERPARAMETERS)
            else:
                engine = ReffuseStep(model, trainable, spec.ids)
            del model
            setup = WorkerSetup(engine.implementation, len(trainable), engine.parameters,
                                time.perf_counter() - started, peak_rss_bytes(), libraries)
            reply(**setup.to_json())
            for line in sys.stdin:
                if line.strip() != "step":
                    break
                start = time.perf_counter()
                loss = engine.step()
                reply(seconds=time.perf_counter() - start, loss=loss)
        reply(peak_rss_bytes=peak_rss_bytes())
    except Exception as e:  # the parent reports it
        reply(error=f"{type(e).__name__}: {e}")
        raise SystemExit(1)


class Worker:
    """A worker process (worker_main) for one engine, its threads pinned by the environment as well."""

    def __init__(self, spec: WorkerSpec):
        self.engine = spec.engine
        env = {**os.environ, **{name: str(spec.threads) for name in THREAD_VARIABLES}}
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from reffuse.speed.train_bench import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.send(json.dumps(spec.to_json()))

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        reply = json.loads(line) if line.strip() else {}
        if not reply or "error" in reply:
            self.process.wait(timeout=60)
            self.log.seek(0)
            raise ReffuseError(f"the {self.engine} worker stopped: "
                               f"{reply.get('error') or self.log.read()[-3000:] or 'no output'}")
        return reply

    def setup(self) -> WorkerSetup:
        """The worker's first reply, once its engine is set up."""
        return WorkerSetup.from_json(self.receive())

    def step(self) -> tuple[float, float]:
        """One training step: its seconds, and the loss before its update."""
        self.send("step")
        reply = self.receive()
        return reply["seconds"], reply["loss"]

    def stop(self) -> int:
        """No more steps: the worker's peak resident memory, in bytes."""
        self.send("stop")
        return self.receive()["peak_rss_bytes"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def time_training(model_name: str, train: str, ids, threads: int, repeats: int, with_pytorch: bool = True,
                  progress=None) -> TrainRow:
    """One trainable set: every engine's step seconds, in turns (module doc), its peak memory and losses, and
    the paired ratio reffuse tokens/s over PyTorch's."""
    note = progress or (lambda message: None)
    ids = tuple(int(i) for i in ids)
    engines = list(ENGINES if with_pytorch else ENGINES[:1])
    workers = {}
    try:
        for engine in engines:
            workers[engine] = Worker(WorkerSpec(model_name, train, ids, threads, engine))
        ready = {engine: worker.setup() for engine, worker in workers.items()}
        losses = {engine: [workers[engine].step()[1]] for engine in engines}  # warm-up, untimed
        seconds = {engine: [] for engine in engines}
        for round_ in range(repeats):
            for engine in engines if round_ % 2 == 0 else engines[::-1]:
                time.sleep(PAUSE_SECONDS)
                step_seconds, loss = workers[engine].step()
                seconds[engine].append(step_seconds)
                losses[engine].append(loss)
            note(f"--train {train}: round {round_ + 1}/{repeats}, "
                 + ", ".join(f"{e} {s[-1]:.2f} s" for e, s in seconds.items()))
        peaks = {engine: worker.stop() for engine, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    steps = {}
    for engine in engines:
        median, setup = statistics.median(seconds[engine]), ready[engine]
        steps[engine] = EngineSteps(
            implementation=setup.implementation, step_seconds=tuple(seconds[engine]), median_step_seconds=median,
            tokens_per_second=len(ids) / median, peak_rss_bytes=peaks[engine],
            rss_after_setup_bytes=setup.rss_after_setup_bytes, setup_seconds=setup.setup_seconds,
            losses=tuple(losses[engine]), libraries=setup.libraries)
    row = TrainRow(train=train, tokens=len(ids), trainable_tensors=ready["reffuse"].trainable_tensors,
                   trainable_parameters=ready["reffuse"].trainable_parameters, reffuse=steps["reffuse"])
    if not with_pytorch:
        return row
    ratio = paired_ratio(seconds["pytorch"], seconds["reffuse"])  # their time / ours = our speed / theirs
    ours, theirs = np.asarray(losses["reffuse"]), np.asarray(losses["pytorch"])
    return replace(row, pytorch=steps["pytorch"], speed_ratio=ratio.median,
                   speed_ratio_interval_95=as_tuple(ratio.interval_95),
                   first_loss_relative_difference=float(abs(ours[0] - theirs[0]) / abs(theirs[0])),
                   worst_loss_relative_difference=float(np.max(np.abs(ours - theirs) / np.abs(theirs))))


def run_train_benchmark(model_name: str, trains=("all",), tokens: int = TRAIN_TOKENS, threads: int | None = None,
                        repeats: int = 7, with_pytorch: bool = True, progress=None) -> TrainResult:
    """The training step timed for each trainable set in `trains` (module doc)."""
    from reffuse.formats.registry import load_model
    from reffuse.speed.environment import default_threads

    threads = threads or default_threads()
    note = progress or (lambda message: None)
    model = load_model(model_name, dtype="float32")
    ids, text = text_window(model_name, model, tokens)
    blocks, config_name = len(model.blocks), model.config.name
    del model
    env = environment(threads)
    if with_pytorch:
        torch = require("torch", "reference", "timing training against PyTorch")
        transformers = require("transformers", "reference", "timing training against PyTorch")
        env = replace(env, torch=torch.__version__, transformers=transformers.__version__)
    rows = []
    for train in trains:
        note(f"--train {train}: starting the workers")
        rows.append(time_training(model_name, train, ids, threads, repeats, with_pytorch, note))
    result = TrainResult(model=model_name, model_name=config_name, dtype="float32", repeats=repeats, ratio=RATIO,
                         tokens=int(len(ids)), text=text, hyperparameters=HYPERPARAMETERS,
                         fused_model=FusedModel(tuple(i for i in FUSED_REMOVED if i < blocks), FUSED_GROUPS),
                         environment=env.at_end(), pytorch_used=with_pytorch, rows=tuple(rows), targets=())
    return replace(result, targets=check_train_targets(result))
