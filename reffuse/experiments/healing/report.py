"""The healing study's report, drawn from its folder's JSON alone (study.json and points/*.json), so that it is
redrawn without training: the learning-rate choice, every point's held-out KL, perplexity and top-1 agreement,
the verdicts of (l)-(o), what the budget can say about the paper's, and which setup files changed after the points
that used them. findings.json holds the verdicts and curves the report prints; the command draws the recovery
figure beside it (reffuse.plots.healing)."""

from __future__ import annotations

from pathlib import Path

from reffuse.experiments.healing.findings import Points, verdicts
from reffuse.experiments.healing.plan import VARIANTS, Budgets, study_points, sweep_points
from reffuse.experiments.healing.points import WindowScores
from reffuse.experiments.healing.study import read_points
from reffuse.experiments.provenance import changes_since, describe_changes
from reffuse.files import json_text, read_json
from reffuse.outputs import write_text_atomic

FIGURE = "recovery.png"
FINDINGS = "findings.json"
PAPER_TOKENS = "about 65 billion tokens of distillation for the 253B model, 25 billion for the 49B model (§4)"


def budgets_of(study: dict) -> Budgets:
    b = study["settings"]["budgets"]
    return Budgets(**{k: tuple(v) if isinstance(v, list) else v for k, v in b.items()})


def curves(points: Points) -> dict:
    """(variant, objective) -> rows from budget 0 up, each the mean KL over seeds with its 95% interval over
    windows, perplexity, top-1 agreement and the seeds."""
    out = {}
    for variant, objective, tokens in points.keys():
        if objective == "start":
            continue
        out.setdefault((variant, objective), [])
    for (variant, objective), rows in out.items():
        budgets = [0] + sorted(t for v, o, t in points.keys() if (v, o) == (variant, objective))
        for tokens in budgets:
            p = points.pooled(variant, objective, tokens)
            if p is None:
                continue
            d = p.kl_interval()
            rows.append({"tokens": tokens, "kl": p.mean_kl, "interval": d["windows_interval_95"],
                         "interval_texts": d["clusters_interval_95"], "perplexity": p.perplexity, "top1": p.top1,
                         "seeds": list(p.seeds)})
    order = {v: i for i, v in enumerate(VARIANTS)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])))


def sweep_rows(results: list[dict]) -> list[dict]:
    rows = [{"objective": r["point"]["objective"], "learning_rate": r["point"]["learning_rate"],
             "tokens": r["point"]["tokens"], "kl": WindowScores.from_json(r["scores"]).mean_kl}
            for r in results if r["point"]["split"] == "calibration"]
    return sorted(rows, key=lambda r: (r["objective"], r["learning_rate"]))


def setup_changes(study: dict, results: list[dict]) -> dict:
    """The setup commits the points ran at, and which setup files changed since the earliest of them."""
    commits = {}
    for r in results:
        prov = r.get("provenance") or {}
        commits.setdefault(prov.get("commit"), []).append(r["point"])
        if prov.get("uncommitted_changes"):
            commits.setdefault("uncommitted changes", []).append(r["point"])
    first, rules = study["setup"]["commit"], study["rules"]["commit"]
    return {"study_started_at": first, "point_commits": sorted(c for c in commits if c),
            "changed_since_start": changes_since(first, study["setup"]["files"])["files"] if first else None,
            "rules_changed_since": changes_since(rules, study["rules"]["files"])["files"] if rules else None}


def summarize(folder) -> dict:
    folder = Path(folder)
    study = read_json(folder / "study.json", "run `reffuse healing-study` to start the study")
    results = read_points(folder)
    budgets = budgets_of(study)
    points = Points(results)
    planned = sweep_points(budgets) + study_points(budgets)
    return {"settings": study["settings"], "fusion_study": study["fusion_study"], "rules": study["rules"],
            "setup": setup_changes(study, results), "sweep": sweep_rows(results),
            "curves": [{"variant": v, "objective": o, "rows": rows} for (v, o), rows in curves(points).items()],
            "verdicts": [v.as_dict() for v in verdicts(results, budgets)],
            "points": len(results), "seconds": sum(r["seconds"] for r in results),
            "cpus": sorted({r["cpus"] for r in results if r.get("cpus")}),
            "planned": {"points": len(planned), "training_tokens": sum(p.tokens for p in planned)}}


def interval_text(interval) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "-"


def rate_choice_line(objective: str, sweep: list[dict]) -> str:
    """The chosen rate of an objective, and whether it lies at an end of the candidates (the best rate may then
    lie beyond them)."""
    rows = sorted((r for r in sweep if r["objective"] == objective), key=lambda r: r["learning_rate"])
    best = min(rows, key=lambda r: r["kl"])
    edge = ("the largest candidate: a larger rate might do better still" if best is rows[-1] else
            "the smallest candidate: a smaller rate might do better still" if best is rows[0] else
            "inside the candidates")
    return f"- {objective}: {best['learning_rate']:g}, {edge}."


def rules_changes(changed: list[dict] | None) -> str:
    if changed is None:
        return "; whether they changed since could not be read (no git checkout)."
    return f"; changed since: {describe_changes(changed)}." if changed else "; unchanged since."


def markdown(s: dict, command: str) -> str:
    settings, fusion, budgets = s["settings"], s["fusion_study"], s["settings"]["budgets"]
    lines = [
        "# Healing study: does distillation recover what fusion costs?", "",
        f"Command: `{command}`. {s['points']} of {s['planned']['points']} points finished "
        f"({s['planned']['training_tokens']:,} training tokens in all, {s['planned']['training_tokens'] / 1e6:.1f} "
        f"million), {s['seconds'] / 3600:.1f} hours of compute so far"
        + (f" on {' or '.join(map(str, s['cpus']))} CPU cores" if s["cpus"] else "")
        + f". Rules: `reffuse/experiments/healing/findings.py` at commit {s['rules']['commit']} "
        f"({s['rules']['committed_at']}), committed before the first point ran"
        + rules_changes(s["setup"]["rules_changed_since"]), "",
        "## Setup", "",
        f"SmolLM2-135M, attention removed from blocks {', '.join(map(str, fusion['attention_removed']))} (the fusion "
        f"study's region {fusion['region'][0]}-{fusion['region'][1]}, reports/experiments/smollm2). Variants: that "
        "attention-removed model; fused into 4 steps and into 1 step, each from plain fusion and from the "
        "calibrated refit; FFN removal at the same number of sequential FFN steps (3 and 6 FFNs removed, which "
        "the cost model also puts nearest in latency); and the original model trained by cross-entropy on the same "
        "text (a control: how much of healing only fits the training text).", "",
        "Trainable set: the FFN weights (norm gain, gate, up, down) of every block of the attention-free region, "
        "for every variant (objective kd; ce for the control); kd-fused trains the fused blocks only, as local "
        "distillation does. AdamW, 10% linear warm-up, cosine decay to 10%, global-norm clip 1, one "
        f"{settings['window']}-token window per step, training text from the corpus' training split. Budgets: kd "
        f"{', '.join(f'{t:,}' for t in budgets['kd'])} tokens; local "
        f"{', '.join(f'{t:,}' for t in budgets['local'])}; seeds {', '.join(map(str, budgets['seeds']))} at the "
        f"largest kd budget. Held-out scoring: {settings['held_out_tokens']:,} tokens of the held-out plays in "
        f"{settings['window']}-token windows, never trained on.", "",
        "### The learning rate, chosen on calibration text before any held-out point", "",
        f"Fused 4 steps, {budgets['sweep_tokens']:,} tokens, scored on {settings['calibration_scoring_tokens']:,} "
        "calibration tokens (KL to the original); the lowest wins (kd's rate serves kd, kd-fused and ce).", "",
        "| objective | learning rate | calibration KL |", "|---|---|---|"]
    lines += [f"| {r['objective']} | {r['learning_rate']:g} | {r['kl']:.4f} |" for r in s["sweep"]]
    lines += [""] + [rate_choice_line(objective, s["sweep"]) for objective in ("kd", "local")
                     if any(r["objective"] == objective for r in s["sweep"])]
    lines += ["", "## Recovery", ""] + ([f"![KL against training tokens]({FIGURE})", ""] if s["curves"] else [])
    lines += [
              "Held-out KL(original || model) in nats, the mean over seeds where several ran, with its 95% interval "
              "over windows (a bootstrap of whole windows) and over texts (a t-interval over the held-out texts' "
              "own means; the verdicts use this one).", "",
              "| variant | objective | tokens | KL | interval, windows | interval, texts | perplexity | top-1 | "
              "seeds |", "|---|---|---|---|---|---|---|---|---|"]
    started = set()
    for c in s["curves"]:
        for r in c["rows"]:
            if r["tokens"] == 0 and c["variant"] in started:
                continue            # one start row per variant, whichever objective heals it
            started.add(c["variant"])
            lines.append(f"| {c['variant']} | {c['objective'] if r['tokens'] else 'start'} | {r['tokens']:,} | "
                         f"{r['kl']:.4f} | {interval_text(r['interval'])} | {interval_text(r['interval_texts'])} | "
                         f"{r['perplexity']:.2f} | {r['top1']:.1%} | {','.join(map(str, r['seeds']))} |")
    lines += ["", "## Findings", ""]
    for v in s["verdicts"]:
        lines += [f"### ({v['finding']}) {v['title']}: {v['verdict']}", "", f"- The paper: {v['paper']}.",
                  f"- Here: {v['here']}.", f"- Rule: {v['rule']}."]
        if v.get("note"):
            lines.append(f"- Note: {v['note']}.")
        lines.append("")
    setup = s["setup"]
    changed = setup["changed_since_start"]
    lines += ["## What this budget can say", "",
              f"The largest budget here is {max(budgets['local']):,} tokens (local) and {max(budgets['kd']):,} "
              f"(kd), against the paper's {PAPER_TOKENS}: about five orders of magnitude less. The curves measure the "
              "shape of recovery at the start of training, on one 135M model and one kind of text. Their slope "
              "does not extrapolate to the paper's budget: a log-linear trend of a few points says nothing about "
              "where it flattens, and the paper's distillation data (general web text and synthetic dialogue) "
              "differs from the Shakespeare here. What they can show is the order of the variants at equal "
              "budget, and whether the fusion gap closes faster or slower than the attention-removal gap.", "",
              "## Provenance", "",
              f"The study's setup files (training, fusion, corpus, the core) were at commit "
              f"{setup['study_started_at']} when it started; points ran at "
              f"{', '.join(setup['point_commits']) or 'no recorded commit'}. "
              + ("Setup files changed since the start: " + describe_changes(changed) + "." if changed else
                 "No setup file changed since the start." if changed is not None else
                 "Whether setup files changed since could not be read (no git checkout).")]
    return "\n".join(lines) + "\n"


def figure_curves(summary: dict) -> dict:
    """The curves as reffuse.plots.healing.recovery_figure takes them: (variant, objective) -> rows."""
    return {(c["variant"], c["objective"]): c["rows"] for c in summary["curves"]}


def write_report(folder, command: str) -> dict:
    """README.md and findings.json in the folder, from its JSON (the figure is drawn by the command)."""
    folder = Path(folder)
    s = summarize(folder)
    write_text_atomic(folder / FINDINGS, json_text(s, inline_lists=True))
    write_text_atomic(folder / "README.md", markdown(s, command))
    return s
