"""What a sweep leaves behind: its trials as tables and a plot, the best recipe, and its record.

:func:`gradwise.experiments.sweep.run_sweep` calls :func:`_write_results` when the
study stops (finished or interrupted). It writes into the sweep directory
``trials.json`` (one row per trial: state, outcome, decoded values, best value),
``trials.md`` (the same as a Markdown table under a one-line headline),
``trials.png`` (each trial's best value and the running best), ``best.yaml``
(the recipe with the best trial's values, when one completed) and ``sweep.json``
(the sweep's settings, counts and best trial). A study shared by several sweep
directories (machines) has the same tables in each; a trial's ``run_dir`` is its
``trial-NNNN`` name when it ran in this directory, else the other directory's path
(after ``host:`` when another machine ran it). :func:`_outcome` (how a trial ended)
and :func:`_masked` (a storage URL without its password) live here too: the study
code in :mod:`gradwise.experiments.sweep` shares them.
"""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from gradwise.store.files import atomic_write_text

if TYPE_CHECKING:
    from gradwise.experiments.sweep import _Plan


def _write_results(study: optuna.Study, plan: _Plan, recipe: Path, status: str) -> None:
    """trials.json/.md, trials.png, best.yaml (when a trial completed) and sweep.json."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = [_row(t, plan, retried_as) for t in trials]
    atomic_write_text(plan.sweep_dir / "trials.json", json.dumps(rows, indent=2) + "\n")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    finished = sum(1 for r in rows if r["outcome"] in ("completed", "pruned", "error"))
    counts = {o: sum(1 for r in rows if r["outcome"] == o) for o in dict.fromkeys(r["outcome"] for r in rows)}
    headline = f"Sweep {plan.study_name}: {finished} of {plan.trials} trials finished ({_counts_text(counts)})"
    if best is not None:
        headline += f"; best: trial {best.number}, {plan.monitor} {best.value:.4g}"
        _write_best_recipe(plan, best, recipe)
    atomic_write_text(plan.sweep_dir / "trials.md", _markdown(headline, rows, plan))
    meta = {
        "name": plan.study_name,
        "status": status,
        "recipe": str(recipe),
        "space": plan.space.source,
        "storage": _masked(plan.storage),
        "sampler": plan.sampler,
        "pruner": plan.pruner,
        "seed": plan.seed,
        "monitor": plan.monitor,
        "direction": study.direction.name.lower(),
        "trials": plan.trials,
        "finished": finished,
        "counts": counts,
        "best": None
        if best is None
        else {"trial": best.number, "value": best.value, "run_dir": _run_dir(best, plan.sweep_dir)},
    }
    atomic_write_text(plan.sweep_dir / "sweep.json", json.dumps(meta, indent=2) + "\n")
    _plot(rows, plan, study.direction.name.lower(), plan.sweep_dir / "trials.png")


def _row(trial: FrozenTrial, plan: _Plan, retried_as: dict[int, int]) -> dict[str, Any]:
    outcome = _outcome(trial)
    attrs, result = trial.user_attrs, trial.user_attrs.get("result", {})
    note = result.get("stop_reason") if outcome in ("completed", "pruned") else result.get("error", "")
    if trial.number in retried_as:
        note = f"{outcome}; retried as trial {retried_as[trial.number]}"
    elif "retry_of" in attrs:
        note = f"retry of trial {attrs['retry_of']}" + (f"; {note}" if note else "")
    elif attrs.get("recipe_values"):
        note = "the recipe's own values" + (f"; {note}" if note else "")
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "outcome": outcome,
        "params": plan.space.decoded(trial.params),
        "value": result.get("best_value") if outcome in ("completed", "pruned") else None,
        "best_step": result.get("best_step"),
        "steps": result.get("steps"),
        "wall_time_s": result.get("wall_time_s"),
        "run_dir": None if trial.state == TrialState.WAITING else _run_dir(trial, plan.sweep_dir),
        "note": note or "",
    }


def _run_dir(trial: FrozenTrial, sweep_dir: Path) -> str:
    """``trial-NNNN`` when the trial ran in ``sweep_dir``, else where it ran: ``[host:]/its/sweep/trial-NNNN``."""
    name = f"trial-{trial.number:04d}"
    worker = trial.user_attrs.get("worker", {})
    where = worker.get("dir") if isinstance(worker, dict) else None
    if not where or Path(where) == sweep_dir.resolve():
        return name
    host = worker.get("host")
    return f"{host}:{where}/{name}" if host and host != socket.gethostname() else f"{where}/{name}"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "none yet"


def _write_best_recipe(plan: _Plan, best: FrozenTrial, recipe: Path) -> None:
    raw = plan.space.apply(plan.base_raw, best.params)
    raw.pop("variants", None)
    shown = ", ".join(f"{k}={_cell(v)}" for k, v in plan.space.decoded(best.params).items())
    raw["description"] = f"best of sweep {plan.study_name} (trial {best.number}, {plan.monitor} {best.value:.4g})"
    header = (
        f"# Best trial {best.number} of sweep {plan.study_name} over {plan.space.source}\n"
        f"# recipe {recipe}; {shown}\n# {plan.monitor} {best.value!r}; reproduce with: gradwise train <this file>\n"
    )
    atomic_write_text(plan.sweep_dir / "best.yaml", header + yaml.safe_dump(raw, sort_keys=False))


def _markdown(headline: str, rows: list[dict[str, Any]], plan: _Plan) -> str:
    paths = plan.space.paths
    header = ["trial", "state", *paths, f"best {plan.monitor}", "steps", "wall s", "note"]
    lines = [f"{headline}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["trial"], row["outcome"], *(row["params"].get(p, "") for p in paths)]
        cells += [row["value"], row["steps"], row["wall_time_s"], str(row["note"]).replace("|", "/")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _plot(rows: list[dict[str, Any]], plan: _Plan, direction: str, out: Path) -> None:
    """Each trial's best monitored value by trial number, with the running best of the completed ones."""
    from gradwise.report.plots import _figure, _metric_label, _save  # matplotlib loads only here

    fig = _figure((8.0, 4.6))
    ax = fig.subplots()
    for outcome, style in (("completed", "o"), ("pruned", "x")):
        points = [(r["trial"], r["value"]) for r in rows if r["outcome"] == outcome and r["value"] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, ms=6, label=f"{outcome} ({len(points)})")
    done = [(r["trial"], r["value"]) for r in rows if r["outcome"] == "completed" and r["value"] is not None]
    if done:
        pick = max if direction == "maximize" else min
        running = [pick(v for _, v in done[: i + 1]) for i in range(len(done))]
        ax.step([n for n, _ in done], running, where="post", color="crimson", lw=1.6, label="running best")
        best_n, best_v = next((n, v) for n, v in done if v == running[-1])
        ax.plot([best_n], [best_v], "*", color="crimson", ms=14, label=f"best: trial {best_n}, {best_v:.4g}")
    failed = sum(1 for r in rows if r["outcome"] not in ("completed", "pruned"))
    goal = "higher" if direction == "maximize" else "lower"
    hidden = f"; {failed} failed or unfinished, not shown" if failed else ""
    # A long study name would run the title off the figure: wrap it to the figure's width (about 0.6 em a
    # character at the title's size); the tight layout then makes room for the extra lines.
    title = f"{plan.study_name}: best {plan.monitor} per trial ({goal} is better{hidden})"
    width = int(fig.get_figwidth() * 72 / (0.6 * float(ax.title.get_fontsize())))
    ax.set(
        title=textwrap.fill(title, width=width, break_on_hyphens=False),
        xlabel="trial number",
        ylabel=f"best {plan.monitor}: {_metric_label(plan.monitor)}",
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    _save(fig, out)


def _outcome(trial: FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        return "completed"
    if trial.state == TrialState.PRUNED:
        return "pruned"
    if trial.state == TrialState.FAIL:
        return str(trial.user_attrs.get("result", {}).get("outcome", "killed"))
    return trial.state.name.lower()


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even parsable: nothing to hide from a message about it
        return url
