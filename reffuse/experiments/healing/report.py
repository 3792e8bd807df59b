"""The healing study's report, drawn from its folder's JSON alone (study.json and points/*.json), so that it is
redrawn without training: the learning-rate choice, every point's held-out KL, perplexity and top-1 agreement,
the verdicts of (l)-(o), what the budget can say about the paper's, and which setup files changed after the points
that used them. findings.json holds the verdicts and curves the report prints; the command draws the recovery
figure beside it (reffuse.plots.healing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reffuse.experiments.findings import Verdict
from reffuse.experiments.healing.findings import Points, verdicts
from reffuse.experiments.healing.plan import VARIANTS, study_points, sweep_points
from reffuse.experiments.healing.points import HealingPoint
from reffuse.experiments.healing.study import (HealingStudySettings, RecordedFusionStudy, StudyRecord, read_points,
                                               read_study)
from reffuse.experiments.provenance import FileChange, Provenance, changes_since, describe_changes
from reffuse.files import json_text
from reffuse.outputs import write_text_atomic
from reffuse.records import FlatRecord, as_json, present_fields

FIGURE = "recovery.png"
FINDINGS = "findings.json"
PAPER_TOKENS = "about 65 billion tokens of distillation for the 253B model, 25 billion for the 49B model (§4)"


@dataclass(frozen=True)
class SweepRow(FlatRecord):
    """One candidate learning rate of the sweep and its calibration KL."""
    objective: str
    learning_rate: float
    tokens: int
    kl: float                  # mean KL(original || model) on calibration text, nats


@dataclass(frozen=True)
class CurveRow(FlatRecord):
    """One budget of a recovery curve, the mean over the seeds that ran."""
    tokens: int                           # training tokens; 0 for the untrained start
    kl: float                             # held-out KL(original || model), nats
    interval: list[float] | None          # its 95% interval over windows
    interval_texts: list[float] | None    # its 95% interval over texts (the one the verdicts read)
    perplexity: float
    top1: float                           # top-1 agreement with the original
    seeds: list[int]


@dataclass(frozen=True)
class Curve:
    """A variant healed by one objective: its rows from budget 0 up."""
    variant: str
    objective: str
    rows: tuple[CurveRow, ...]

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, record: dict) -> Curve:
        return cls(record["variant"], record["objective"], tuple(CurveRow.from_json(r) for r in record["rows"]))


@dataclass(frozen=True)
class StudyProvenance:
    """Which commits the points ran at, and which setup and rules files changed since the study started (None
    where git could not say)."""
    study_started_at: str | None          # the setup files' commit when the study started
    point_commits: list[str]
    changed_since_start: tuple[FileChange, ...] | None
    rules_changed_since: tuple[FileChange, ...] | None

    def to_json(self) -> dict:
        return {"study_started_at": self.study_started_at, "point_commits": self.point_commits,
                "changed_since_start": as_json(self.changed_since_start),
                "rules_changed_since": as_json(self.rules_changed_since)}

    @classmethod
    def from_json(cls, record: dict) -> StudyProvenance:
        def changes(files):
            return None if files is None else tuple(FileChange.from_json(f) for f in files)
        return cls(record["study_started_at"], record["point_commits"], changes(record["changed_since_start"]),
                   changes(record["rules_changed_since"]))


@dataclass(frozen=True)
class PlannedWork(FlatRecord):
    """The whole study as planned: its points and their training tokens."""
    points: int
    training_tokens: int


@dataclass(frozen=True)
class HealingSummary:
    """What the report prints (findings.json): the study's setup, the sweep, the curves and the verdicts."""
    settings: HealingStudySettings
    fusion_study: RecordedFusionStudy
    rules: Provenance                     # the rules files' commit when the study started
    setup: StudyProvenance
    sweep: tuple[SweepRow, ...]
    curves: tuple[Curve, ...]
    verdicts: tuple[Verdict, ...]
    points: int                           # points finished
    seconds: float                        # their wall-clock time (training and scoring), summed
    cpus: list[int]                       # the core counts of the machines they ran on
    planned: PlannedWork

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, record: dict) -> HealingSummary:
        return cls(HealingStudySettings.from_json(record["settings"]),
                   RecordedFusionStudy.from_json(record["fusion_study"]), Provenance.from_json(record["rules"]),
                   StudyProvenance.from_json(record["setup"]), tuple(SweepRow.from_json(r) for r in record["sweep"]),
                   tuple(Curve.from_json(c) for c in record["curves"]),
                   tuple(Verdict.from_json(v) for v in record["verdicts"]), record["points"], record["seconds"],
                   record["cpus"], PlannedWork.from_json(record["planned"]))


def curves(points: Points) -> list[Curve]:
    """Every variant and objective healed, in the report's order: rows from budget 0 up, each the mean KL over
    seeds with its 95% intervals, perplexity, top-1 agreement and the seeds."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    healed = sorted({(v, o) for v, o, _ in points.keys() if o != "start"},
                    key=lambda pair: (order.get(pair[0], 99), pair[0], pair[1]))
    out = []
    for variant, objective in healed:
        rows = []
        for tokens in [0] + sorted(t for v, o, t in points.keys() if (v, o) == (variant, objective)):
            p = points.pooled(variant, objective, tokens)
            if p is None:
                continue
            d = p.kl_interval()
            rows.append(CurveRow(tokens, p.mean_kl, d.windows_interval_95, d.clusters_interval_95, p.perplexity,
                                 p.top1, list(p.seeds)))
        out.append(Curve(variant, objective, tuple(rows)))
    return out


def sweep_rows(results: list[HealingPoint]) -> list[SweepRow]:
    rows = [SweepRow(r.point.objective, r.point.learning_rate, r.point.tokens, r.scores.mean_kl)
            for r in results if r.point.split == "calibration"]
    return sorted(rows, key=lambda r: (r.objective, r.learning_rate))


def study_provenance(study: StudyRecord, results: list[HealingPoint]) -> StudyProvenance:
    """The setup commits the points ran at, and which setup and rules files changed since the study started."""
    commits = {r.provenance.commit for r in results}
    if any(r.provenance.uncommitted_changes for r in results):
        commits.add("uncommitted changes")
    first, rules = study.setup.commit, study.rules.commit
    return StudyProvenance(first, sorted(c for c in commits if c),
                           changes_since(first, study.setup.files).files if first else None,
                           changes_since(rules, study.rules.files).files if rules else None)


def summarize(folder) -> HealingSummary:
    folder = Path(folder)
    study = read_study(folder, "run `reffuse healing-study` to start the study")
    results = read_points(folder)
    budgets = study.settings.budgets
    planned = sweep_points(budgets) + study_points(budgets)
    return HealingSummary(study.settings, study.fusion_study, study.rules, study_provenance(study, results),
                          tuple(sweep_rows(results)), tuple(curves(Points(results))),
                          tuple(verdicts(results, budgets)), len(results), sum(r.seconds for r in results),
                          sorted({r.cpus for r in results if r.cpus}),
                          PlannedWork(len(planned), sum(p.tokens for p in planned)))


def interval_text(interval) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "-"


def rate_choice_line(objective: str, sweep: tuple[SweepRow, ...]) -> str:
    """The chosen rate of an objective, and whether it lies at an end of the candidates (the best rate may then
    lie beyond them)."""
    rows = sorted((r for r in sweep if r.objective == objective), key=lambda r: r.learning_rate)
    best = min(rows, key=lambda r: r.kl)
    edge = ("the largest candidate: a larger rate might do better still" if best is rows[-1] else
            "the smallest candidate: a smaller rate might do better still" if best is rows[0] else
            "inside the candidates")
    return f"- {objective}: {best.learning_rate:g}, {edge}."


def rules_changes(changed: tuple[FileChange, ...] | None) -> str:
    if changed is None:
        return "; whether they changed since could not be read (no git checkout)."
    return f"; changed since: {describe_changes(changed)}." if changed else "; unchanged since."


def markdown(s: HealingSummary, command: str) -> str:
    settings, fusion, budgets = s.settings, s.fusion_study.choices, s.settings.budgets
    lines = [
        "# Healing study: does distillation recover what fusion costs?", "",
        f"Command: `{command}`. {s.points} of {s.planned.points} points finished "
        f"({s.planned.training_tokens:,} training tokens in all, {s.planned.training_tokens / 1e6:.1f} "
        f"million), {s.seconds / 3600:.1f} hours so far"
        + (f" on {' or '.join(map(str, s.cpus))} CPU cores" if s.cpus else "")
        + " (the points' wall-clock training and scoring, summed; some points include time the process sat "
        "paused while tests used the cores, so this is an upper bound on the compute). Rules: "
        f"`reffuse/experiments/healing/findings.py` at commit {s.rules.commit} ({s.rules.committed_at}), "
        "committed before the first point ran"
        + rules_changes(s.setup.rules_changed_since), "",
        "## Setup", "",
        f"SmolLM2-135M, attention removed from blocks {', '.join(map(str, fusion.attention_removed))} (the fusion "
        f"study's region {fusion.region[0]}-{fusion.region[1]}, reports/experiments/smollm2). Variants: that "
        "attention-removed model; fused into 4 steps and into 1 step, each from plain fusion and from the "
        "calibrated refit; FFN removal at the same number of sequential FFN steps (3 and 6 FFNs removed, which "
        "the cost model also puts nearest in latency); and the original model trained by cross-entropy on the same "
        "text (a control: how much of healing only fits the training text).", "",
        "Trainable set: the FFN weights (norm gain, gate, up, down) of every block of the attention-free region, "
        "for every variant (objective kd; ce for the control); kd-fused trains the fused blocks only, as local "
        "distillation does. AdamW, 10% linear warm-up, cosine decay to 10%, global-norm clip 1, one "
        f"{settings.window}-token window per step, training text from the corpus' training split. Budgets: kd "
        f"{', '.join(f'{t:,}' for t in budgets.kd)} tokens; local "
        f"{', '.join(f'{t:,}' for t in budgets.local)}; seeds {', '.join(map(str, budgets.seeds))} at the "
        "largest kd budget, for the points the findings judge (every variant's kd; the 4-step model's kd-fused "
        f"and local). Held-out scoring: {settings.held_out_tokens:,} tokens of the held-out texts (eight plays "
        "and the Sonnets) in "
        f"{settings.window}-token windows, never trained on.", "",
        "### The learning rate, chosen on calibration text before any held-out point", "",
        f"Fused 4 steps, {budgets.sweep_tokens:,} tokens, scored on {settings.calibration_scoring_tokens:,} "
        "calibration tokens (KL to the original); the lowest wins (kd's rate serves kd, kd-fused and ce).", "",
        "| objective | learning rate | calibration KL |", "|---|---|---|"]
    lines += [f"| {r.objective} | {r.learning_rate:g} | {r.kl:.4f} |" for r in s.sweep]
    lines += [""] + [rate_choice_line(objective, s.sweep) for objective in ("kd", "local")
                     if any(r.objective == objective for r in s.sweep)]
    lines += ["", "## Recovery", ""] + ([f"![KL against training tokens]({FIGURE})", ""] if s.curves else [])
    lines += [
              "Held-out KL(original || model) in nats, the mean over seeds where several ran, with its 95% interval "
              "over windows (a bootstrap of whole windows) and over texts (a t-interval over the held-out texts' "
              "own means; it is centred on their unweighted mean, which can differ from the KL, pooled over every "
              "prediction, by a few thousandths: texts hold unequal numbers of windows). The verdicts read the "
              "interval over texts of each seed's paired difference, and count a difference as resolved only when "
              "every seed's lies on the same side.", "",
              "| variant | objective | tokens | KL | interval, windows | interval, texts | perplexity | top-1 | "
              "seeds |", "|---|---|---|---|---|---|---|---|---|"]
    started = set()
    for c in s.curves:
        for r in c.rows:
            if r.tokens == 0 and c.variant in started:
                continue            # one start row per variant, whichever objective heals it
            started.add(c.variant)
            lines.append(f"| {c.variant} | {c.objective if r.tokens else 'start'} | {r.tokens:,} | "
                         f"{r.kl:.4f} | {interval_text(r.interval)} | {interval_text(r.interval_texts)} | "
                         f"{r.perplexity:.2f} | {r.top1:.1%} | {','.join(map(str, r.seeds))} |")
    lines += ["", "## Findings", ""]
    for v in s.verdicts:
        lines += [f"### ({v.finding}) {v.title}: {v.verdict}", "", f"- The paper: {v.paper}.",
                  f"- Here: {v.here}.", f"- Rule: {v.rule}."]
        if v.note:
            lines.append(f"- Note: {v.note}.")
        lines.append("")
    setup = s.setup
    changed = setup.changed_since_start
    lines += ["## What this budget can say", "",
              f"The largest budget here is {max(budgets.local):,} tokens (local) and {max(budgets.kd):,} "
              f"(kd), against the paper's {PAPER_TOKENS}: about five orders of magnitude less. The curves measure the "
              "shape of recovery at the start of training, on one 135M model and one kind of text. Their slope "
              "does not extrapolate to the paper's budget: a log-linear trend of a few points says nothing about "
              "where it flattens, and the paper's distillation data (general web text and synthetic dialogue) "
              "differs from the Shakespeare here. What they can show, where the intervals resolve it, is the order "
              "of the variants at equal budget, and whether the fusion gap closes faster or slower than the "
              "attention-removal gap.", "",
              "## Provenance", "",
              f"The study's setup files (training, fusion, corpus, the core) were at commit "
              f"{setup.study_started_at} when it started; points ran at "
              f"{', '.join(setup.point_commits) or 'no recorded commit'}. "
              + ("Setup files changed since the start: " + describe_changes(changed) + "." if changed else
                 "No setup file changed since the start." if changed is not None else
                 "Whether setup files changed since could not be read (no git checkout).")]
    return "\n".join(lines) + "\n"


def write_report(folder, command: str) -> HealingSummary:
    """README.md and findings.json in the folder, from its JSON (the figure is drawn by the command)."""
    folder = Path(folder)
    s = summarize(folder)
    write_text_atomic(folder / FINDINGS, json_text(s.to_json(), inline_lists=True))
    write_text_atomic(folder / "README.md", markdown(s, command))
    return s
