"""(b) FFN removal vs fusion at equal depth reduction: removing the L - k least important FFNs of the span (by the
KL of removing each alone, on calibration text) against fusing the span into k steps; decode latency of every
model of (a), (b) and (i) in the same run, in alternation (reffuse.speed.bench.decode_samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.evaluation.intervals import describe
from reffuse.experiments.findings.a_intensity import IntensityRow
from reffuse.experiments.findings.rules import Verdict, decide_lower, difference
from reffuse.experiments.study import (SCORE_COLUMNS, ScoredVariant, Study, format_kl, format_perplexity, fused_name,
                                       removed_name, score_cells)
from reffuse.method.removal import cheapest, drop_ffns, ffn_scores
from reffuse.records import present_fields
from reffuse.speed.bench import decode_samples, prompt_ids, reffuse_decode

if TYPE_CHECKING:  # the result holds this module's measurement: named for the annotations only
    from reffuse.experiments.findings import StudyResult


@dataclass(frozen=True)
class RemovalRow:
    """The `depth_reduction` least important FFNs of the span removed, and the scores of what is left."""
    depth_reduction: int
    removed: list[int]
    scores: ScoredVariant

    def to_json(self) -> dict:
        return {"depth_reduction": self.depth_reduction, "removed": self.removed, **self.scores.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> RemovalRow:
        return cls(raw["depth_reduction"], raw["removed"], ScoredVariant.from_json(raw))


@dataclass(frozen=True)
class Removal:
    """Each FFN of the span scored by the KL of removing it alone (calibration text), and a removal for every
    depth reduction of (a)."""
    ffn_scores: dict[int, float]     # block -> KL of removing its FFN alone, nats
    rows: list[RemovalRow]

    def to_json(self) -> dict:
        return {"ffn_scores": {str(k): v for k, v in self.ffn_scores.items()},
                "rows": [row.to_json() for row in self.rows]}

    @classmethod
    def from_json(cls, raw: dict) -> Removal:
        return cls({int(k): v for k, v in raw["ffn_scores"].items()}, [RemovalRow.from_json(r) for r in raw["rows"]])


@dataclass(frozen=True)
class DecodeTiming:
    """One model's greedy decode, per token: the median over the repeats and its quartiles."""
    ms_per_token: float
    tokens_per_second: float
    ms_interquartile: list[float] | None = None   # [first quartile, third quartile]; None in runs without them
    repeats: int | None = None

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> DecodeTiming:
        return cls(raw["ms_per_token"], raw["tokens_per_second"], raw.get("ms_interquartile"), raw.get("repeats"))


def ffn_removal(study: Study, intensity: list[IntensityRow]) -> Removal:
    """The L - k least important FFNs of the span removed (by the KL of removing each alone, on calibration
    text), for every depth reduction of `intensity`."""
    importance = ffn_scores(study.pre, study.texts.scoring(study.scoring_tokens, min(study.window, 128)),
                            layers=range(study.span[0], study.span[1] + 1))
    rows = []
    for row in intensity:
        dropped = cheapest(importance, row.depth_reduction)
        rows.append(RemovalRow(row.depth_reduction, dropped, study.scores(drop_ffns(study.pre, dropped),
                                                                          study.span[0])))
    return Removal(dict(importance), rows)


def judge(r: StudyResult) -> Verdict:
    latency = r.decode
    base_ms = latency["pre-fusion"].ms_per_token
    pairs = list(zip(r.intensity, r.removal.rows))
    plain = [difference(row.fold, removal.scores) for row, removal in pairs]
    calibrated = [difference(row.calibrated, removal.scores) for row, removal in pairs]
    here = []
    for (row, removal), d, c in zip(pairs, plain, calibrated):
        fused_ms = latency[fused_name(row.steps)].ms_per_token
        removed_ms = latency[removed_name(removal.depth_reduction)].ms_per_token
        here.append(f"depth -{row.depth_reduction}: fusion KL {format_kl(row.fold.kl)} (calibrated "
                    f"{format_kl(row.calibrated.kl)}), {100 * (fused_ms / base_ms - 1):+.1f}% decode latency; "
                    f"removal KL {format_kl(removal.scores.kl)}, {100 * (removed_ms / base_ms - 1):+.1f}%; fusion - "
                    f"removal {describe(d)}; calibrated fusion - removal {describe(c)}")
    return Verdict(
        "b", "FFN removal vs fusion",
        paper="at a similar latency, fusion keeps more accuracy than removal (fusion step 3: -10% latency, -3.5% "
              "accuracy; removing 15 FFNs: -7.5% latency, -5% accuracy; 20 FFNs: -11%, -8.7%)",
        here="; ".join(here),
        rule="at equal depth reduction (not the paper's equal latency): held if plain fusion has the resolved lower "
             "KL at every depth; partly if at some depth, or calibrated fusion at every depth, and removal is "
             "resolved lower at none; did not hold if removal is resolved lower at some depth and plain fusion at "
             "none; else not resolved. Latency is reported, not judged: a CPU decode of a 135M model is bound by "
             "reading weights, which fusion does not reduce",
        verdict=decide_lower(plain, also_partly=all(c.lower for c in calibrated)),
        note=f"plain fusion resolved lower at {sum(d.lower for d in plain)} of {len(plain)} depths, removal at "
             f"{sum(d.higher for d in plain)}; calibrated fusion resolved lower at {sum(c.lower for c in calibrated)}")


def decode_latency(study: Study, intensity: list[IntensityRow], removal_rows: list[RemovalRow], decode_tokens: int,
                   repeats: int, removal_counts=()) -> dict[str, DecodeTiming]:
    """Greedy decode of the original, the pre-fusion, every fused and every FFN-removed model (those of (b), and
    of (i) when given: finding (i)'s rows), timed in alternation in one run (reffuse.speed.bench.decode_samples):
    the median and the quartiles of the repeats, per token, by model name."""
    models = {"original": study.original, "pre-fusion": study.pre}
    for row in intensity:
        models[fused_name(row.steps)] = fuse(study.pre, list(row.groups))
    for row in removal_rows:
        models[removed_name(row.depth_reduction)] = drop_ffns(study.pre, row.removed)
    for row in removal_counts:
        models[removed_name(row.removed_count)] = drop_ffns(study.pre, row.removed)
    seconds, _ = decode_samples({name: (lambda p, n, m=m: reffuse_decode(m, p, n)) for name, m in models.items()},
                                prompt_ids(study.original, 32), decode_tokens, repeats)
    result = {}
    for name, samples in seconds.items():
        q1, median, q3 = np.quantile(np.asarray(samples) * 1e3 / decode_tokens, [0.25, 0.5, 0.75])
        result[name] = DecodeTiming(float(median), 1e3 / float(median), [float(q1), float(q3)], len(samples))
    return result


def section(r: StudyResult) -> list[str]:
    """Each fused model, plain and calibrated, beside the removal of as many FFNs, with its decode latency."""
    lat = r.decode
    base_ms = lat["pre-fusion"].ms_per_token
    original_ms = lat["original"].ms_per_token
    lines = ["", "## (b) FFN removal vs fusion at equal depth reduction", "",
             "FFNs of the span scored by the KL of removing each alone (calibration text); the least important "
             "removed. Decode latency of every model measured in the same run, in alternation.", "",
             "| model | depth reduction | " + SCORE_COLUMNS[1:] + " decode ms/token | vs pre-fusion |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| original | - | - | {format_perplexity(r.original.perplexity)} | - | 0 | - | {original_ms:.2f} "
                 f"| {100 * (original_ms / base_ms - 1):+.1f}% |")
    lines.append(f"| pre-fusion | 0 | 0 | {format_perplexity(r.pre_fusion.perplexity)} | 100% | "
                 f"{format_kl(r.pre_fusion.kl_vs_original)} | {r.sink.norm_leaving_run:.0f} | {base_ms:.2f} | 0% |")
    for row, removal_row in zip(r.intensity, r.removal.rows):
        fused_ms = lat[fused_name(row.steps)].ms_per_token
        removed_ms = lat[removed_name(removal_row.depth_reduction)].ms_per_token
        lines.append(f"| fused {row.groups_text} | {row.depth_reduction} | {score_cells(row.fold)} | "
                     f"{fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| fused {row.groups_text}, calibrated | {row.depth_reduction} | "
                     f"{score_cells(row.calibrated)} | {fused_ms:.2f} | {100 * (fused_ms / base_ms - 1):+.1f}% |")
        lines.append(f"| removed FFNs {','.join(map(str, removal_row.removed))} | {removal_row.depth_reduction}"
                     f" | {score_cells(removal_row.scores)} | {removed_ms:.2f} | "
                     f"{100 * (removed_ms / base_ms - 1):+.1f}% |")
    return lines
