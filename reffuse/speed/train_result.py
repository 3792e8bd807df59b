"""What `reffuse bench --train` measured (speed.train_bench.run_train_benchmark), typed: the records its report and
command read, and their JSON (benchmarks/results/bench_train_*.json) both ways. Intervals and parts not measured
follow speed.bench_result: None or NOT_RECORDED (reffuse.records), and absent from the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from reffuse.records import NOT_RECORDED, as_json, as_tuple, interval_of, present_fields
from reffuse.speed.bench_result import Target
from reffuse.speed.environment import Environment


@dataclass(frozen=True)
class Hyperparameters:
    """The step both engines take (speed.train_bench.HYPERPARAMETERS)."""
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float                # on matrices only
    clip: float                        # the global norm gradients are clipped to

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> Hyperparameters:
        return cls(raw["learning_rate"], as_tuple(raw["betas"]), raw["eps"], raw["weight_decay"], raw["clip"])


@dataclass(frozen=True)
class FusedModel:
    """What --train fused trains: the model with these blocks' attention dropped, then these groups fused."""
    attention_removed: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> FusedModel:
        return cls(as_tuple(raw["attention_removed"]), as_tuple(raw["groups"]))


@dataclass(frozen=True)
class TorchLibraries:
    """What PyTorch computed with (speed.torch_models.torch_libraries): its BLAS, its CPU kernels, its threads."""
    torch_blas: str | None
    cpu_capability: str | None
    torch_threads: int

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("torch_blas", "cpu_capability"))

    @classmethod
    def from_json(cls, raw: dict) -> TorchLibraries:
        return cls(raw["torch_blas"], raw["cpu_capability"], raw["torch_threads"])


@dataclass(frozen=True, kw_only=True)
class EngineSteps:
    """One engine's steps on one trainable set: every timed step's seconds, their median, the losses (the untimed
    warm-up step's first: the loss at the loaded weights) and the worker's memory."""
    implementation: str
    step_seconds: tuple[float, ...]
    median_step_seconds: float
    tokens_per_second: float
    peak_rss_bytes: int
    rss_after_setup_bytes: int
    setup_seconds: float
    losses: tuple[float, ...]
    libraries: TorchLibraries | None = None   # PyTorch's only

    def to_json(self) -> dict:
        raw = present_fields(self)
        libraries = raw.pop("libraries", {})  # PyTorch's lie flat among its steps
        return {**raw, **libraries}

    @classmethod
    def from_json(cls, raw: dict) -> EngineSteps:
        return cls(implementation=raw["implementation"], step_seconds=as_tuple(raw["step_seconds"]),
                   median_step_seconds=raw["median_step_seconds"], tokens_per_second=raw["tokens_per_second"],
                   peak_rss_bytes=raw["peak_rss_bytes"], rss_after_setup_bytes=raw["rss_after_setup_bytes"],
                   setup_seconds=raw["setup_seconds"], losses=as_tuple(raw["losses"]),
                   libraries=TorchLibraries.from_json(raw) if "torch_threads" in raw else None)


@dataclass(frozen=True, kw_only=True)
class TrainRow:
    """One trainable set: both engines' steps and, where PyTorch ran, reffuse's tokens/s over PyTorch's and how
    far their losses lie apart."""
    train: str                          # "all" or "fused"
    tokens: int
    trainable_tensors: int
    trainable_parameters: int
    reffuse: EngineSteps
    pytorch: EngineSteps | None = None
    speed_ratio: float | None = None
    speed_ratio_interval_95: tuple | None = NOT_RECORDED
    first_loss_relative_difference: float | None = None
    worst_loss_relative_difference: float | None = None

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("speed_ratio_interval_95",))

    @classmethod
    def from_json(cls, raw: dict) -> TrainRow:
        return cls(train=raw["train"], tokens=raw["tokens"], trainable_tensors=raw["trainable_tensors"],
                   trainable_parameters=raw["trainable_parameters"], reffuse=EngineSteps.from_json(raw["reffuse"]),
                   pytorch=EngineSteps.from_json(raw["pytorch"]) if "pytorch" in raw else None,
                   speed_ratio=raw.get("speed_ratio"),
                   speed_ratio_interval_95=interval_of(raw, "speed_ratio_interval_95"),
                   first_loss_relative_difference=raw.get("first_loss_relative_difference"),
                   worst_loss_relative_difference=raw.get("worst_loss_relative_difference"))


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """One `reffuse bench --train` run (speed.train_bench's module doc). `ratio` says what a ratio is (None in
    records made before it was recorded); `command` is the command line that made it, once a command has run it."""
    model: str
    model_name: str
    dtype: str
    repeats: int
    ratio: str | None = None
    tokens: int                         # in the window
    text: str                           # what the window is
    hyperparameters: Hyperparameters
    fused_model: FusedModel
    environment: Environment            # with torch's and transformers' versions
    pytorch_used: bool
    rows: tuple[TrainRow, ...]
    targets: tuple[Target, ...]
    command: str | None = None

    def to_json(self) -> dict:
        head = {"model": self.model, "model_name": self.model_name, "dtype": self.dtype, "repeats": self.repeats}
        if self.ratio is not None:
            head["ratio"] = self.ratio
        raw = {**head, "tokens": self.tokens, "text": self.text, "hyperparameters": self.hyperparameters.to_json(),
               "fused_model": self.fused_model.to_json(), "environment": self.environment.to_json(),
               "pytorch": {"used": self.pytorch_used}, "rows": as_json(self.rows), "targets": as_json(self.targets)}
        return raw if self.command is None else {**raw, "command": self.command}

    @classmethod
    def from_json(cls, raw: dict) -> TrainResult:
        return cls(model=raw["model"], model_name=raw["model_name"], dtype=raw["dtype"], repeats=raw["repeats"],
                   ratio=raw.get("ratio"), tokens=raw["tokens"], text=raw["text"],
                   hyperparameters=Hyperparameters.from_json(raw["hyperparameters"]),
                   fused_model=FusedModel.from_json(raw["fused_model"]),
                   environment=Environment.from_json(raw["environment"]),
                   pytorch_used=raw["pytorch"]["used"], rows=tuple(TrainRow.from_json(r) for r in raw["rows"]),
                   targets=tuple(Target.from_json(t) for t in raw["targets"]), command=raw.get("command"))
