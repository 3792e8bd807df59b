"""(i) FFN removal vs fusion at equal latency, as the paper compares them: every count of the span's FFNs removed,
plain and refitted as calibrated fusion is (reffuse.method.calibrate.calibrated_removal); each fused model against
the removal whose decode latency is nearest, modelled on a GPU by reffuse.speed.costmodel at the largest
tensor-parallel degree up to 8 the heads allow, and measured on this CPU (with (b)'s decode latency: 15 repeats,
quartiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.a_intensity import by_steps
from reffuse.experiments.findings.b_removal import Removal
from reffuse.experiments.findings.g_calibrated import Calibration
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference
from reffuse.experiments.study import ScoredVariant, Study, format_kl, format_perplexity, fused_name, removed_name
from reffuse.method.calibrate import GroupCalibration, calibrated_removal
from reffuse.method.removal import cheapest, drop_ffns
from reffuse.progress import Progress
from reffuse.speed.costmodel.calibration import get_hardware
from reffuse.speed.costmodel.latency import forward_cost, tensor_parallel_degrees
from reffuse.speed.costmodel.presets import layout_from_model

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult

TP_HARDWARE = "h100-sxm-bf16"   # the cost model's GPU preset for the modelled tensor-parallel latency
TP_CONTEXT = 1024               # cached positions of the modelled decode step


@dataclass(frozen=True)
class RemovalCount:
    """The `removed_count` least important FFNs of the span removed, plain and with the refit calibrated fusion
    gets, and what the refit did."""
    removed_count: int
    removed: list[int]
    plain: ScoredVariant
    refit: ScoredVariant
    refit_fits: list[GroupCalibration]

    def to_json(self) -> dict:
        return {"removed_count": self.removed_count, "removed": self.removed, "plain": self.plain.to_json(),
                "refit": self.refit.to_json(), "refit_fits": [f.as_dict() for f in self.refit_fits]}

    @classmethod
    def from_json(cls, raw: dict) -> RemovalCount:
        return cls(raw["removed_count"], raw["removed"], ScoredVariant.from_json(raw["plain"]),
                   ScoredVariant.from_json(raw["refit"]), [GroupCalibration.from_dict(f) for f in raw["refit_fits"]])


@dataclass(frozen=True)
class ModelledLatency:
    """Each model's decode step by the cost model on `hardware`, at tensor-parallel degree `tp` and at TP 1, with
    `context` cached positions; milliseconds by model name."""
    hardware: str
    tp: int
    context: int
    ms: dict[str, float]
    ms_tp1: dict[str, float]

    def to_json(self) -> dict:
        return {"hardware": self.hardware, "tp": self.tp, "context": self.context, "ms": self.ms,
                "ms_tp1": self.ms_tp1}

    @classmethod
    def from_json(cls, raw: dict) -> ModelledLatency:
        return cls(raw["hardware"], raw["tp"], raw["context"], raw["ms"], raw["ms_tp1"])


@dataclass(frozen=True)
class EqualLatency:
    """Finding (i)'s measurement: every removal count, and every model's modelled latency."""
    removal: list[RemovalCount]
    modelled: ModelledLatency

    def to_json(self) -> dict:
        return {"removal": [row.to_json() for row in self.removal], "modelled": self.modelled.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> EqualLatency:
        return cls([RemovalCount.from_json(row) for row in raw["removal"]], ModelledLatency.from_json(raw["modelled"]))


def removal_counts(study: Study, removal: Removal, chosen: Calibration) -> list[RemovalCount]:
    """Removing 1 .. L-1 FFNs of the span (the least important first, as in (b)), each plain and with the refit
    that calibrated fusion gets (reffuse.method.calibrate.calibrated_removal, the weighting and ridge of (g))."""
    a = study.span[0]
    rows = []
    with Progress("FFN removal, plain and refitted", study.length - 1, "models") as bar:
        for count in range(1, study.length):
            dropped = cheapest(removal.ffn_scores, count)
            refit, fits = calibrated_removal(study.pre, study.span, dropped, study.texts.calibration.ids,
                                             ridge=chosen.ridge, weighting=chosen.weighting)
            rows.append(RemovalCount(count, dropped, study.scores(drop_ffns(study.pre, dropped), a),
                                     study.scores(refit, a), fits))
            bar.update()
    return rows


def modelled_latency(models: dict) -> ModelledLatency:
    """Each model's decode step by the cost model (reffuse.speed.costmodel) on TP_HARDWARE, at the largest
    tensor-parallel degree up to 8 that every model's heads and widths allow, and at TP 1; milliseconds."""
    hw = get_hardware(TP_HARDWARE)
    layouts = {name: layout_from_model(model, fusion_groups=()) for name, model in models.items()}
    tp = max(set.intersection(*(set(tensor_parallel_degrees(layout, 8)) for layout in layouts.values())))
    return ModelledLatency(
        TP_HARDWARE, tp, TP_CONTEXT,
        {name: 1e3 * forward_cost(layout, hw, tp, 1, TP_CONTEXT).seconds for name, layout in layouts.items()},
        {name: 1e3 * forward_cost(layout, hw, 1, 1, TP_CONTEXT).seconds for name, layout in layouts.items()})


def matched_removal(latency: dict, fused: str, counts) -> int:
    """The removal count whose latency (ms, by model name) is nearest the fused model's; a tie goes to fewer FFNs
    removed."""
    return min(counts, key=lambda c: (abs(latency[removed_name(c)] - latency[fused]), c))


def decoded_models(study: Study, counts: list[RemovalCount]) -> dict:
    """The models of (i) by name, for the cost model: pre-fusion, every fused plan and every removal count (the
    rows of removal_counts)."""
    models = {"pre-fusion": study.pre}
    for k in study.counts:
        models[fused_name(k)] = fuse(study.pre, study.plans[k])
    for row in counts:
        models[removed_name(row.removed_count)] = drop_ffns(study.pre, row.removed)
    return models


def judge(r: StudyResult) -> Verdict | None:
    if r.equal_latency is None:
        return None
    e = r.equal_latency
    rows = {row.removed_count: row for row in e.removal}
    modelled, cpu = e.modelled.ms, {name: v.ms_per_token for name, v in r.decode.items()}
    here, plain, calibrated = [], [], []
    for row in by_steps(r):
        name = fused_name(row.steps)
        tp_match, cpu_match = matched_removal(modelled, name, rows), matched_removal(cpu, name, rows)
        d, c = difference(row.fold, rows[tp_match].plain), difference(row.calibrated, rows[tp_match].refit)
        plain.append(d)
        calibrated.append(c)
        cpu_d = difference(row.fold, rows[cpu_match].plain)
        here.append(f"{row.steps} steps ({modelled[name]:.3f} ms modelled) against {tp_match} FFNs removed "
                    f"({modelled[removed_name(tp_match)]:.3f} ms): fusion - removal {describe(d)}, calibrated "
                    f"fusion - refitted removal {describe(c)}; on this CPU ({cpu[name]:.2f} ms) against {cpu_match} "
                    f"removed ({cpu[removed_name(cpu_match)]:.2f} ms): {describe(cpu_d)}")
    return Verdict(
        "i", "FFN removal vs fusion at equal latency",
        paper="at a similar latency, fusion keeps more accuracy than removal (fusion step 3: -10% latency, -3.5% "
              "accuracy; removing 15 FFNs: -7.5% latency, -5% accuracy)",
        here=f"latency of a decode step modelled on {e.modelled.hardware} at TP {e.modelled.tp} "
             f"(the largest degree up to 8 that every model's heads allow), context {e.modelled.context}; "
             "each fused model against the removal whose latency is nearest: " + "; ".join(here),
        rule="by the modelled latency: held if plain fusion has the resolved lower KL than its matched removal at "
             "every k; partly if at some k, or calibrated fusion against refitted removal at every k, and removal "
             "is resolved lower at none; did not hold if removal is resolved lower at some k and plain fusion at "
             "none; else not resolved. The CPU match is reported, not judged: there fusion saves no time",
        verdict=decide_lower(plain, also_partly=all(c.lower for c in calibrated)),
        note=f"plain fusion resolved lower at {sum(d.lower for d in plain)} of {len(plain)} k, removal at "
             f"{sum(d.higher for d in plain)}; calibrated fusion resolved lower than refitted removal at "
             f"{sum(c.lower for c in calibrated)}, higher at {sum(c.higher for c in calibrated)}")


def section(r: StudyResult) -> list[str]:
    """(i): every removal count, plain and refitted, with its modelled and measured decode latency."""
    if r.equal_latency is None:
        return []
    e, lat = r.equal_latency, r.decode
    modelled = e.modelled
    repeats = lat["pre-fusion"].repeats
    lines = ["", "## (i) FFN removal vs fusion at equal latency", "",
             f"Every count of the span's FFNs removed (least important first), plain and with the refit calibrated "
             f"fusion gets (each kept FFN's down-projection fitted to the sequential update of the blocks it stands "
             f"for). Decode latency per token: modelled by the cost model on {modelled.hardware} at TP "
             f"{modelled.tp} and TP 1 (context {modelled.context}), and measured on this CPU (median and "
             f"interquartile range of {'?' if repeats is None else repeats} repeats, models in alternation).", "",
             f"| model | KL | perplexity | refitted: KL | refitted perplexity | TP {modelled.tp} ms | TP 1 ms | "
             "CPU ms (IQR) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cpu(name):
        v = lat[name]
        spread = "" if v.ms_interquartile is None else f" ({v.ms_interquartile[0]:.2f}-{v.ms_interquartile[1]:.2f})"
        return f"{v.ms_per_token:.2f}{spread}"

    lines.append(f"| pre-fusion | 0 | {format_perplexity(r.pre_fusion.perplexity)} | - | - | "
                 f"{modelled.ms['pre-fusion']:.3f} | {modelled.ms_tp1['pre-fusion']:.3f} | {cpu('pre-fusion')} |")
    for row in by_steps(r):
        name = fused_name(row.steps)
        lines.append(f"| {name} ({row.groups_text}) | {format_kl(row.fold.kl)} | "
                     f"{format_perplexity(row.fold.perplexity)} | {format_kl(row.calibrated.kl)} "
                     f"(calibrated) | {format_perplexity(row.calibrated.perplexity)} | {modelled.ms[name]:.3f} "
                     f"| {modelled.ms_tp1[name]:.3f} | {cpu(name)} |")
    for row in e.removal:
        name = removed_name(row.removed_count)
        lines.append(f"| {name} ({','.join(map(str, row.removed))}) | {format_kl(row.plain.kl)} | "
                     f"{format_perplexity(row.plain.perplexity)} | {format_kl(row.refit.kl)} | "
                     f"{format_perplexity(row.refit.perplexity)} | {modelled.ms[name]:.3f} | "
                     f"{modelled.ms_tp1[name]:.3f} | {cpu(name)} |")
    return lines
