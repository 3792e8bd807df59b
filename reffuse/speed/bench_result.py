"""What `reffuse bench` measured (speed.bench.run_benchmark), typed: the records its report, figure, lecture and
command read, and their JSON (benchmarks/results/bench_*.json) both ways.

A ratio's 95% interval is a pair, None where too few repeats gave none (reffuse.stats.paired_ratio), or
NOT_RECORDED (reffuse.records) in a record made before intervals were kept: its key is then absent from the JSON.
Other parts a run did not measure (an engine not compared, the bound on a GPU) are None and absent from the JSON as
well.
"""

from __future__ import annotations

from dataclasses import dataclass

from reffuse.records import NOT_RECORDED, as_json, as_tuple, interval_of, present_fields
from reffuse.speed.environment import Environment
from reffuse.stats import PairedRatio


@dataclass(frozen=True)
class Target:
    """A speed target (its words), the measured ratio that decides it, its 95% interval and the verdict."""
    target: str
    measured: float | None
    interval_95: tuple | None
    unit: str
    verdict: str                       # met, not met, unresolved or not measured

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("measured", "interval_95"))

    @classmethod
    def from_json(cls, raw: dict) -> Target:
        return cls(raw["target"], raw["measured"], interval_of(raw, "interval_95"), raw["unit"], raw["verdict"])


@dataclass(frozen=True, kw_only=True)
class PrefillRow:
    """One prompt length: reffuse's seconds, and each engine compared beside it with reffuse's time over its."""
    tokens: int
    reffuse_seconds: float
    transformers_seconds: float | None = None
    time_ratio: float | None = None                # reffuse / transformers time, < 1: reffuse takes less
    time_ratio_interval_95: tuple | None = NOT_RECORDED
    llamacpp_seconds: float | None = None
    llamacpp_time_ratio: float | None = None
    llamacpp_time_ratio_interval_95: tuple | None = NOT_RECORDED

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("time_ratio_interval_95", "llamacpp_time_ratio_interval_95"))

    @classmethod
    def from_json(cls, raw: dict) -> PrefillRow:
        return cls(tokens=raw["tokens"], reffuse_seconds=raw["reffuse_seconds"],
                   transformers_seconds=raw.get("transformers_seconds"), time_ratio=raw.get("time_ratio"),
                   time_ratio_interval_95=interval_of(raw, "time_ratio_interval_95"),
                   llamacpp_seconds=raw.get("llamacpp_seconds"), llamacpp_time_ratio=raw.get("llamacpp_time_ratio"),
                   llamacpp_time_ratio_interval_95=interval_of(raw, "llamacpp_time_ratio_interval_95"))


@dataclass(frozen=True, kw_only=True)
class Decode:
    """Greedy decode after a prompt: tokens/s of each engine, reffuse's speed over theirs, and whether they chose
    the same tokens."""
    prompt_tokens: int
    new_tokens: int
    reffuse_tokens_per_second: float
    transformers_tokens_per_second: float | None = None
    speedup: float | None = None                   # reffuse / transformers tokens/s
    speedup_interval_95: tuple | None = NOT_RECORDED
    same_greedy_tokens: bool | None = None
    llamacpp_tokens_per_second: float | None = None
    fraction_of_llamacpp: float | None = None      # reffuse / llama.cpp tokens/s
    fraction_of_llamacpp_interval_95: tuple | None = NOT_RECORDED
    same_greedy_tokens_as_llamacpp: bool | None = None

    def rates(self) -> dict[str, float]:
        """Each engine measured (its name as the bound's fractions spell it) -> its tokens/s."""
        rates = {"reffuse": self.reffuse_tokens_per_second, "transformers": self.transformers_tokens_per_second,
                 "llama.cpp": self.llamacpp_tokens_per_second}
        return {engine: rate for engine, rate in rates.items() if rate is not None}

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("speedup_interval_95", "fraction_of_llamacpp_interval_95"))

    @classmethod
    def from_json(cls, raw: dict) -> Decode:
        return cls(prompt_tokens=raw["prompt_tokens"], new_tokens=raw["new_tokens"],
                   reffuse_tokens_per_second=raw["reffuse_tokens_per_second"],
                   transformers_tokens_per_second=raw.get("transformers_tokens_per_second"),
                   speedup=raw.get("speedup"), speedup_interval_95=interval_of(raw, "speedup_interval_95"),
                   same_greedy_tokens=raw.get("same_greedy_tokens"),
                   llamacpp_tokens_per_second=raw.get("llamacpp_tokens_per_second"),
                   fraction_of_llamacpp=raw.get("fraction_of_llamacpp"),
                   fraction_of_llamacpp_interval_95=interval_of(raw, "fraction_of_llamacpp_interval_95"),
                   same_greedy_tokens_as_llamacpp=raw.get("same_greedy_tokens_as_llamacpp"))


@dataclass(frozen=True)
class Bandwidth:
    """Bytes per second NumPy streams here (speed.timing.streaming_bandwidth)."""
    gemv_out_in_bytes_per_second: float   # a GEMV over weights stored (out, in), as reffuse stores them
    gemv_in_out_bytes_per_second: float
    copy_bytes_per_second: float          # bytes read and written

    @property
    def best(self) -> float:
        return max(self.gemv_out_in_bytes_per_second, self.gemv_in_out_bytes_per_second, self.copy_bytes_per_second)

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> Bandwidth:
        return cls(raw["gemv_out_in_bytes_per_second"], raw["gemv_in_out_bytes_per_second"],
                   raw["copy_bytes_per_second"])


@dataclass(frozen=True)
class Bound:
    """The bound on decode: every weight read once at the best streaming rate (speed.timing.decode_bound), and
    each engine's decode as a fraction of it."""
    weight_bytes: int
    bytes_per_second: float
    seconds_per_token: float
    tokens_per_second: float
    bandwidth: Bandwidth
    fractions: dict[str, float]       # engine -> its decode tokens/s over the bound's

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> Bound:
        return cls(raw["weight_bytes"], raw["bytes_per_second"], raw["seconds_per_token"], raw["tokens_per_second"],
                   Bandwidth.from_json(raw["bandwidth"]), dict(raw["fractions"]))


@dataclass(frozen=True, kw_only=True)
class FfnRow:
    """A run of FFNs on `tokens` positions, sequential and fused (speed.timing.time_ffn_run): median seconds,
    sequential / fused (> 1: fusion is faster), and the same on the GPU's clock where it was read."""
    tokens: int
    sequential: float
    fused: float
    speedup: float
    speedup_interval_95: tuple | None = NOT_RECORDED
    sequential_gpu: float | None = None
    fused_gpu: float | None = None
    gpu_speedup: float | None = None
    gpu_speedup_interval_95: tuple | None = NOT_RECORDED

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("speedup_interval_95", "gpu_speedup_interval_95"))

    @classmethod
    def from_json(cls, raw: dict) -> FfnRow:
        return cls(tokens=raw["tokens"], sequential=raw["sequential"], fused=raw["fused"], speedup=raw["speedup"],
                   speedup_interval_95=interval_of(raw, "speedup_interval_95"),
                   sequential_gpu=raw.get("sequential_gpu"), fused_gpu=raw.get("fused_gpu"),
                   gpu_speedup=raw.get("gpu_speedup"),
                   gpu_speedup_interval_95=interval_of(raw, "gpu_speedup_interval_95"))


@dataclass(frozen=True)
class FfnRun:
    """The fused-FFN microbenchmark: a run of `blocks` FFNs of the model, fused into one of `fused_width`."""
    blocks: int
    dim: int
    widths: tuple[int, ...]
    norm: str
    fused_width: int
    rows: tuple[FfnRow, ...]

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> FfnRun:
        return cls(raw["blocks"], raw["dim"], as_tuple(raw["widths"]), raw["norm"], raw["fused_width"],
                   tuple(FfnRow.from_json(r) for r in raw["rows"]))


@dataclass(frozen=True)
class LlamaCppFusion:
    """llama.cpp's decode of the model with attention removed against the same with its run fused."""
    attention_removed: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]
    removed_tokens_per_second: float
    fused_tokens_per_second: float
    fused_speedup: float
    fused_speedup_paired: PairedRatio

    def to_json(self) -> dict:
        return {"attention_removed": as_json(self.attention_removed), "groups": as_json(self.groups),
                "tokens_per_second": {"attention removed": self.removed_tokens_per_second,
                                      "fused": self.fused_tokens_per_second},
                "fused_speedup": self.fused_speedup, "fused_speedup_paired": self.fused_speedup_paired.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> LlamaCppFusion:
        rate = raw["tokens_per_second"]
        return cls(as_tuple(raw["attention_removed"]), as_tuple(raw["groups"]),
                   rate["attention removed"], rate["fused"], raw["fused_speedup"],
                   PairedRatio.from_json(raw["fused_speedup_paired"]))


@dataclass(frozen=True)
class TransformersUse:
    """Whether transformers was compared, and why not."""
    used: bool
    reason: str | None

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("reason",))

    @classmethod
    def from_json(cls, raw: dict) -> TransformersUse:
        return cls(raw["used"], raw["reason"])


@dataclass(frozen=True)
class LlamaCppUse:
    """Whether llama.cpp was compared, and its fused-vs-unfused decode when it was."""
    used: bool
    fusion: LlamaCppFusion | None = None

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> LlamaCppUse:
        return cls(raw["used"], LlamaCppFusion.from_json(raw["fusion"]) if "fusion" in raw else None)


@dataclass(frozen=True, kw_only=True)
class BenchResult:
    """One `reffuse bench` run (speed.bench's module doc): the machine, each measurement and the targets' verdicts.
    `ratio` says what a ratio is (None in records made before it was recorded); `command` is the command line
    that made it, once a command has run it."""
    model: str                          # the name it was loaded by
    model_name: str                     # its config's name
    dtype: str
    repeats: int
    ratio: str | None = None
    environment: Environment            # with the versions of the engines compared
    transformers: TransformersUse
    llama_cpp: LlamaCppUse | None = None  # None: a record made before llama.cpp was compared
    prefill: tuple[PrefillRow, ...]
    decode: Decode
    bound: Bound | None = None          # measured on the CPU only
    ffn_run: FfnRun
    targets: tuple[Target, ...]
    command: str | None = None

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> BenchResult:
        return cls(model=raw["model"], model_name=raw["model_name"], dtype=raw["dtype"], repeats=raw["repeats"],
                   ratio=raw.get("ratio"), environment=Environment.from_json(raw["environment"]),
                   transformers=TransformersUse.from_json(raw["transformers"]),
                   llama_cpp=LlamaCppUse.from_json(raw["llama_cpp"]) if "llama_cpp" in raw else None,
                   prefill=tuple(PrefillRow.from_json(r) for r in raw["prefill"]),
                   decode=Decode.from_json(raw["decode"]),
                   bound=Bound.from_json(raw["bound"]) if "bound" in raw else None,
                   ffn_run=FfnRun.from_json(raw["ffn_run"]),
                   targets=tuple(Target.from_json(t) for t in raw["targets"]), command=raw.get("command"))
