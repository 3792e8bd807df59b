"""The paper's experiments (its §4-5, App. B) at small scale, on one model with an attention-removed region.

Setup. The region: attention is removed from the `drop_count` consecutive blocks whose single removals cost
least (reffuse.method.removal, scored on calibration text); the longest attention-free run of the result, [a, b], is
the run studied (on SmolLM2, whose blocks all have attention, it is exactly the removed region). The model with
that attention removed is the "pre-fusion" model, the paper's PreFusion: every fusion experiment below is
judged against it, by KL(pre-fusion || variant) of the next-token distributions on held-out text, by
perplexity, and by top-1 agreement; the same against the original model is recorded too. The paper's
accuracy benchmarks (MMLU, MT-Bench) have no counterpart at 135M parameters: KL and perplexity are the proxy
(KL of the logits is reffuse's choice of proxy). The span fused is the run without its last block, [a, b-1], as
in the paper.

The findings (a)-(k) are the modules of reffuse.experiments.findings, one each, named by letter and subject
(a_intensity: fusion intensity, b_removal: FFN removal vs fusion, ... k_planner: the planner's predictor): each
module's docstring says what it measures, and the module holds that measurement, the rule that gives its verdict
against the paper's observation, and its section of the report.

The plans of (a) come from reffuse's planner (reffuse.method.planning), which cuts the span where the neighbour
damage is least; the held-out text is 16384 tokens by default, dealt over eight plays and the Sonnets
(reffuse.formats.corpus), and the report gives the main variants' KL on each kind of text.

Variants are scored from cached prefix streams (reffuse.evaluation.prefix): the blocks before the first change never run
twice. `study` holds what every finding starts from.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from reffuse.core.model import layout
from reffuse.experiments.findings import StudyResult, Verdict, verdicts
from reffuse.experiments.findings.a_intensity import fusion_intensity
from reffuse.experiments.findings.b_removal import decode_latency, ffn_removal
from reffuse.experiments.findings.c_last_ffn import last_ffn
from reffuse.experiments.findings.d_reversed import reversed_order
from reffuse.experiments.findings.e_full_block import full_block
from reffuse.experiments.findings.g_calibrated import calibration
from reffuse.experiments.findings.h_predictors import (PredictorsAgainstSize, predictor_comparison,
                                                       predictors_against_size)
from reffuse.experiments.findings.i_equal_latency import (EqualLatency, decoded_models, modelled_latency,
                                                          removal_counts)
from reffuse.experiments.findings.j_calibration_scale import calibration_scale
from reffuse.experiments.findings.result import Environment, Settings
from reffuse.experiments.provenance import Provenance, Revision, changes_since, provenance
from reffuse.experiments.study import DEFINITIONS, prepare_study, step
from reffuse.formats.registry import load_model
from reffuse.method.pipeline import load_texts
from reffuse.method.predictors import RankCorrelation
from reffuse.records import present_fields
from reffuse.speed.timing import blas_threads


# The code that turns the numbers into verdicts: the report names the commit these files come from.
RULE_FILES = ("reffuse/experiments/findings", "reffuse/evaluation/intervals.py", "reffuse/stats.py")


# The code that shapes the numbers the rules judge: the corpus split, the attention removal, the planner, the
# predictors, calibration, scoring and fusion, and the measurements themselves. A run records their commit.
SETUP_FILES = ("reffuse/experiments/run.py", "reffuse/experiments/study.py", "reffuse/experiments/findings",
               "reffuse/formats/corpus.py", "reffuse/method/pipeline.py", "reffuse/method/removal.py",
               "reffuse/method/metrics.py", "reffuse/method/planning.py", "reffuse/method/predictors.py",
               "reffuse/method/calibrate.py", "reffuse/evaluation/prefix.py", "reffuse/core/fusion.py")


def rejudge(result: StudyResult, command: str) -> StudyResult:
    """A run made earlier, judged again by the current rules: `verdicts` by them, `verdicts_as_run` the verdicts
    the run recorded (kept from the first judging), and `revision`: when, by which command, under which commit
    of the rules, and which setup files changed after the commit the run recorded (its setup files' where it
    recorded them, else its rules')."""
    recorded = result.setup or result.rules
    return dataclasses.replace(
        result, verdicts=verdicts(result),
        verdicts_as_run=result.verdicts if result.verdicts_as_run is None else result.verdicts_as_run,
        revision=Revision(datetime.now(timezone.utc).date().isoformat(), command, provenance(RULE_FILES),
                          changes_since(recorded.commit, SETUP_FILES) if recorded.commit else None))


SCALE_TOKENS = (2048, 8192, 32768)   # calibration text of finding (j)


def load_average() -> float | None:
    """The 1-minute load average, None where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_experiments(model_name: str = "smollm2", drop_count: int = 8, held_out_tokens: int = 16384,
                    calibration_tokens: int = 2048, scoring_tokens: int = 256, dependency_tokens: int = 128,
                    window: int = 256, decode_tokens: int = 32, repeats: int = 15, threads: int | None = None,
                    region_rank: int = 1, scale_tokens=SCALE_TOKENS) -> StudyResult:
    """Every experiment of the module docstring. region_rank: which attention-removal region, 1 the cheapest
    window of drop_count blocks, 2 the next, ... (the study again on other regions, which overlap this one: not
    independent replications); scale_tokens: the calibration text sizes of finding (j)."""
    started = time.perf_counter()
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    rules, setup, load_at_start = provenance(RULE_FILES), provenance(SETUP_FILES), load_average()
    settings = Settings(drop_count, held_out_tokens, calibration_tokens, scoring_tokens, dependency_tokens, window,
                        decode_tokens, repeats, region_rank, [int(n) for n in scale_tokens])
    with blas_threads(threads):
        original = load_model(model_name)
        texts = load_texts(model_name, original, calibration_tokens, held_out_tokens, window)
        study = prepare_study(original, texts, drop_count, scoring_tokens, dependency_tokens, window, region_rank)

        step("(a, f) fusion intensity", f": span {study.span[0]}-{study.span[1]} into "
                                        f"{', '.join(map(str, study.counts))} steps, fold and last")
        intensity = fusion_intensity(study)
        step("(g) calibrated fusion", ": weighting and ridge chosen on validation calibration text, then every k")
        chosen = calibration(study, intensity)
        step("(j) calibration", f" on {', '.join(map(str, scale_tokens))} tokens")
        scale = calibration_scale(study, chosen, scale_tokens)
        step("(b, i) FFN removal at equal depth reduction; every removal count, plain and refitted")
        removal = ffn_removal(study, intensity)
        counts = removal_counts(study, removal, chosen)
        step("(c) last FFN, (d) reversed order, (e) full-block parallelization")
        last, reversed_rows, whole_blocks = last_ffn(study), reversed_order(study), full_block(study)
        step("(h) predictors of fusion damage against every group of the span")
        predictors = predictor_comparison(study)
        step("decode latency", f" of {2 + len(study.counts) + len(counts)} models, in alternation; the same "
                               "modelled on a GPU")
        decode = decode_latency(study, intensity, removal.rows, decode_tokens, repeats, counts)
        equal_latency = EqualLatency(counts, modelled_latency(decoded_models(study, counts)))
    environment = Environment(platform.machine(), os.cpu_count(), threads, platform.python_version(), np.__version__,
                              load_at_start, load_average())
    prepared = study.prepared
    result = StudyResult(
        model_name, DEFINITIONS, rules, setup, environment, settings, original.config.name, texts.describe(),
        prepared.attention_removal, study.region, study.span,
        {"original": layout(original).blocks, "pre_fusion": layout(study.pre).blocks}, prepared.original,
        prepared.sink, prepared.pre_fusion, prepared.ffn_dependency, prepared.plan_costs, chosen, intensity, scale,
        removal, equal_latency, last, reversed_rows, whole_blocks, predictors, decode,
        seconds=time.perf_counter() - started, verdicts=[])
    return dataclasses.replace(result, verdicts=verdicts(result))


@dataclass(frozen=True)
class RegionRow:
    """One region of a run over regions: its attention removal, span and verdicts (finding letter -> verdict),
    and (h)'s correlations where it measured them."""
    rank: int
    attention_removed: str
    blocks: list[int]
    summed_score: float
    span: tuple[int, int]
    verdicts: dict[str, str]
    verdicts_as_run: dict[str, str] | None = None
    predictors: dict[str, RankCorrelation] | None = None
    predictors_against_size: PredictorsAgainstSize | None = None

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> RegionRow:
        correlations, against = raw.get("predictors"), raw.get("predictors_against_size")
        return cls(raw["rank"], raw["attention_removed"], raw["blocks"], raw["summed_score"], tuple(raw["span"]),
                   raw["verdicts"], raw.get("verdicts_as_run"),
                   None if correlations is None else
                   {name: RankCorrelation.from_json(c) for name, c in correlations.items()},
                   None if against is None else PredictorsAgainstSize.from_json(against))


@dataclass(frozen=True)
class FindingCount:
    """How many regions gave each verdict (verdict -> regions) to one finding."""
    finding: str
    title: str
    counts: dict[str, int]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> FindingCount:
        return cls(**raw)


@dataclass(frozen=True)
class RegionSummary:
    """The findings across the regions (regions.json): each region, the verdicts counted, the rules and their
    revision as in the first region, the command and the seconds of all the runs."""
    regions: list[RegionRow]
    findings: list[FindingCount]
    rules: Provenance
    revision: Revision | None
    command: str
    seconds: float

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> RegionSummary:
        revision = raw.get("revision")
        return cls([RegionRow.from_json(r) for r in raw["regions"]],
                   [FindingCount.from_json(f) for f in raw["findings"]], Provenance.from_json(raw["rules"]),
                   None if revision is None else Revision.from_json(revision), raw["command"], raw["seconds"])


def by_finding(verdict_list: list[Verdict]) -> dict[str, str]:
    """finding letter -> verdict."""
    return {v.finding: v.verdict for v in verdict_list}


def region_summary(results: list[StudyResult], command: str, seconds: float) -> RegionSummary:
    """The findings across the regions: each region's removed blocks, span and verdicts, and for each finding how
    many regions gave each verdict."""
    regions = [RegionRow(r.settings.region_rank, r.attention_removal.blocks_text, list(r.attention_removal.blocks),
                         r.attention_removal.summed_score, r.span, by_finding(r.verdicts),
                         None if r.verdicts_as_run is None else by_finding(r.verdicts_as_run),
                         None if r.predictors is None else r.predictors.correlations,
                         None if r.predictors is None else predictors_against_size(r.predictors))
               for r in results]
    findings = []
    for v in results[0].verdicts:
        counts = {}
        for region in regions:
            verdict = region.verdicts[v.finding]
            counts[verdict] = counts.get(verdict, 0) + 1
        findings.append(FindingCount(v.finding, v.title, counts))
    return RegionSummary(regions, findings, results[0].rules, results[0].revision, command, seconds)
