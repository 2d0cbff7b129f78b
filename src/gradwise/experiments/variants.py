"""Training one recipe several ways: the ``variants`` section of a recipe.

Each variant is a named set of overrides (e.g. one optimizer with its own
LR); each becomes an ordinary run directory under one parent, and the parent
gets a comparison table and an overlaid plot. This is the simple, seedless
form of comparison; sweeps with seeds build on the same run directories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradwise.config import RunConfig, deep_copy, set_path, validate
from gradwise.report.hooks import plotting_hooks
from gradwise.store.files import atomic_write_text
from gradwise.store.rundir import new_run_dir
from gradwise.train.loop import fit


def variant_configs(raw: dict[str, Any], source: str) -> dict[str, RunConfig]:
    """One validated RunConfig per variant: the recipe with that variant's overrides applied."""
    base = {k: v for k, v in raw.items() if k != "variants"}
    configs = {}
    for label, overrides in (raw.get("variants") or {}).items():
        variant_raw = deep_copy(base)
        for path, value in (overrides or {}).items():
            set_path(variant_raw, str(path), value)
        variant_raw["name"] = str(label)
        configs[str(label)] = validate(variant_raw, source=f"{source} variants.{label}")
    return configs


def run_variants(raw: dict[str, Any], cfg: RunConfig, source: str, default_name: str) -> Path:
    """Train every variant into ``<out_dir>/<name>/<label>/`` and write the comparison beside them."""
    configs = variant_configs(raw, source)  # validate all before training any
    parent = new_run_dir(cfg.model_copy(update={"variants": None}), default_name)
    summaries = {}
    for label, variant in configs.items():
        variant = variant.model_copy(update={"out_dir": parent, "name": label})
        run_dir = parent / label
        run_dir.mkdir(parents=True, exist_ok=True)
        summaries[label] = fit(variant, run_dir, hooks=plotting_hooks(variant.log.plots))
    write_comparison(parent, summaries)
    return parent


def write_comparison(parent: Path, summaries: dict[str, dict[str, Any]]) -> None:
    """comparison.json, comparison.md (a table a person can read) and comparison.png."""
    first = next(iter(summaries.values()))
    monitor = first["monitor"]
    test_keys = [k for k in first["final"] if k.startswith("test_")]
    rows = []
    for label, s in summaries.items():
        rows.append(
            {
                "variant": label,
                "best_" + monitor: s["best"]["value"],
                "best_step": s["best"]["step"],
                **{k: s["final"].get(k) for k in test_keys},
                "steps": s["steps"],
                "wall_time_s": s["wall_time_s"],
                "status": s["status"],
            }
        )
    atomic_write_text(parent / "comparison.json", json.dumps(rows, indent=2) + "\n")
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[h]) for h in header) + " |")
    atomic_write_text(parent / "comparison.md", "\n".join(lines) + "\n")
    from gradwise.report.plots import write_comparison_plot

    write_comparison_plot({label: parent / label for label in summaries}, parent / "comparison.png", monitor)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
