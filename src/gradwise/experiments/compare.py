"""Comparing strategies over several seeds, so a difference smaller than seed noise shows as such.

A strategy is a run directory (its ``config.yaml``) or a recipe (each of its
``variants``, or the recipe itself). Each strategy is trained with seeds
s0, s0+1, …, s0+K−1 (s0 = its own seed) into ``<out>/<strategy>/seed-<s>/`` —
ordinary run directories made by the one loop — or read when that directory
has already finished, so re-running the same command continues an interrupted
comparison. ``compare.md`` / ``compare.json`` give per strategy the mean ± sample
std of the final metrics and of the best monitored value, the time to reach a
target, and Welch's t-test of the primary metric against the best strategy;
``compare.png`` overlays the learning curves (report/curves.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradwise.config import RunConfig, apply_overrides, deep_copy, read_saved_config, read_yaml, set_path, validate
from gradwise.errors import ConfigError, TrainingError
from gradwise.experiments.recipes import find_recipe
from gradwise.report.hooks import plotting_hooks
from gradwise.store.checkpoint import committed_step
from gradwise.store.files import atomic_write_text
from gradwise.store.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary
from gradwise.train.loop import fit

# A difference whose Welch p-value is at least this is reported as within seed noise.
NOISE_P = 0.05
# Config fields that name or show a run without changing what it trains.
# Spreads this small are float rounding of equal metrics (scipy warns of catastrophic cancellation).
_TIE = 1e-12
_COSMETIC = ("name", "out_dir", "log", "description", "resume", "variants")


@dataclass(frozen=True)
class Target:
    """A threshold on a logged eval metric, e.g. ``val_accuracy>=0.95``."""

    metric: str
    op: str  # ">=" or "<="
    value: float

    def reached(self, value: float) -> bool:
        return value >= self.value if self.op == ">=" else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Strategy:
    """One way of training: its recipe (variants resolved, overrides applied) and where it came from."""

    name: str
    raw: dict[str, Any]
    source: str
    run_dir: Path | None = None  # a run directory given as a target: the run of its own seed


def compare_runs(
    targets: list[str],
    *,
    seeds: int = 1,
    target: str | None = None,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Run (or read) every strategy of ``targets`` over ``seeds`` seeds and write the comparison.

    Args:
        targets: Run directories and/or recipes (file paths or bundled names).
        seeds: Seeds per strategy, K ≥ 1.
        target: ``metric>=value`` or ``metric<=value``; the time (steps, wall seconds) to first reach it.
        out: The comparison directory (default ``<out_dir>/compare-<first target's stem>``).
        overrides: ``key.path=value`` applied to every strategy after its variant's own overrides
            (e.g. ``stop.epochs=5`` for a quick look).

    Returns:
        The comparison directory, holding ``compare.md``, ``compare.json``, ``compare.png``.

    Raises:
        ConfigError: a bad target, threshold or override, or a seed directory holding another config.
    """
    if not targets:
        raise ConfigError("compare: give at least one run directory or recipe")
    if seeds < 1:
        raise ConfigError(f"compare --seeds: must be >= 1 (got {seeds})")
    threshold = parse_target(target) if target else None
    strategies = strategies_of(targets, overrides or [])
    if out is None:
        first = validate(strategies[0].raw, source=strategies[0].source)
        out = first.out_dir / f"compare-{Path(targets[0].rstrip('/')).stem}"
    out = Path(out)
    # Validate every seed's config before training any, so a typo fails in a second, not after an hour.
    plan = {
        s.name: [(_seed_config(s, seed, out), _seed_dir(s, seed, out)) for seed in _seeds(s, seeds)] for s in strategies
    }
    groups: dict[str, list[Path]] = {name: [] for name in plan}
    interrupted = False
    for name, runs in plan.items():
        for cfg, run_dir in runs:
            summary = run_or_read(cfg, run_dir)
            if summary.get("status") == "interrupted":
                interrupted = True
                break
            groups[name].append(run_dir)
        if interrupted:
            break
    report = summarize({k: v for k, v in groups.items() if v}, threshold)
    report.update(targets=list(targets), seeds=seeds, overrides=list(overrides or []), complete=not interrupted)
    write_compare(out, report, groups)
    return out


def parse_target(text: str) -> Target:
    """``"val_accuracy>=0.95"`` → Target; anything else is a ConfigError saying the form."""
    match = re.fullmatch(r"\s*([A-Za-z_][\w]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if match is None:
        raise ConfigError(
            f"compare --target {text!r}: expected metric>=value or metric<=value (e.g. val_accuracy>=0.95)"
        )
    try:
        value = float(match.group(3))
    except ValueError:
        raise ConfigError(f"compare --target {text!r}: {match.group(3)!r} is not a number") from None
    return Target(match.group(1), match.group(2), value)


def strategies_of(targets: list[str], overrides: list[str]) -> list[Strategy]:
    """The strategies named by run directories and recipes, with unique names."""
    found: list[Strategy] = []
    for arg in targets:
        path = Path(arg)
        if path.is_dir():
            config = path / CONFIG_FILE
            if not config.is_file():
                raise ConfigError(f"compare: {arg}: not a run directory ({CONFIG_FILE} is missing)")
            raw = {k: v for k, v in read_saved_config(config).items() if k != "variants"}
            found.append(Strategy(path.name, apply_overrides(raw, overrides), str(config), run_dir=path))
            continue
        recipe = find_recipe(arg)
        raw = read_yaml(recipe)
        variants = raw.pop("variants", None) or {}
        if not variants:
            found.append(Strategy(recipe.stem, apply_overrides(raw, overrides), str(recipe)))
        for label, changes in variants.items():
            variant = deep_copy(raw)
            for key, value in (changes or {}).items():
                set_path(variant, str(key), value)
            found.append(Strategy(str(label), apply_overrides(variant, overrides), f"{recipe} variants.{label}"))
    seen: dict[str, int] = {}
    unique = []
    for s in found:
        seen[s.name] = seen.get(s.name, 0) + 1
        name = s.name if seen[s.name] == 1 else f"{s.name}-{seen[s.name]}"
        unique.append(Strategy(name, s.raw, s.source, s.run_dir))
    return unique


def _seeds(strategy: Strategy, k: int) -> list[int]:
    s0 = validate(strategy.raw, source=strategy.source).seed
    return list(range(s0, s0 + k))


def _seed_config(strategy: Strategy, seed: int, out: Path) -> RunConfig:
    raw = deep_copy(strategy.raw)
    raw.update(seed=seed, name=strategy.name, out_dir=str(out / strategy.name))
    return validate(raw, source=f"{strategy.source} (seed {seed})")


def _seed_dir(strategy: Strategy, seed: int, out: Path) -> Path:
    given = strategy.run_dir
    if given is not None and (given / SUMMARY_FILE).is_file():
        own = validate(read_saved_config(given / CONFIG_FILE), source=str(given / CONFIG_FILE))
        # The given run is this strategy's seed-s0 run only if it trained exactly this config.
        if own.seed == seed and not _differences(own, _seed_config(strategy, seed, given.parent)):
            return given
    return out / strategy.name / f"seed-{seed}"


def run_or_read(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The summary of ``run_dir``: read when finished, resumed when interrupted, else trained by ``fit``.

    A run that diverges (TrainingError) counts as a finished, failed seed: running it again would fail again.
    """
    if (run_dir / CONFIG_FILE).is_file():
        saved = validate(read_saved_config(run_dir / CONFIG_FILE), source=str(run_dir / CONFIG_FILE))
        changed = _differences(saved, cfg)
        if changed:
            key, (old, new) = next(iter(changed.items()))
            raise ConfigError(
                f"compare: {run_dir} holds a run with {key}={old!r}, this comparison asks for {new!r}; "
                "remove it or pass another --out"
            )
    summary = read_summary(run_dir) if (run_dir / SUMMARY_FILE).is_file() else None
    if summary is not None and summary.get("status") != "interrupted":
        return summary
    resume = committed_step(run_dir, "last") is not None or (run_dir / "checkpoints" / "last").is_dir()
    if not resume and (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()  # killed before its first checkpoint: nothing to resume from
    try:
        return fit(cfg, run_dir, resume=resume, hooks=plotting_hooks(cfg.log.plots))
    except TrainingError:
        return read_summary(run_dir)


def _differences(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    left = _flat(a.model_dump(mode="json", exclude=set(_COSMETIC)))
    right = _flat(b.model_dump(mode="json", exclude=set(_COSMETIC)))
    return {k: (left.get(k), right.get(k)) for k in sorted(left.keys() | right.keys()) if left.get(k) != right.get(k)}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


# --------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None with fewer than two values) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    mean = float(np.mean(finite)) if finite else None
    std = float(np.std(finite, ddof=1)) if len(finite) >= 2 else None
    return {"mean": mean, "std": std, "n": len(finite), "values": finite}


def time_to_target(run_dir: Path, target: Target) -> dict[str, float] | None:
    """The first evaluation at which ``target`` holds: ``{"step", "seconds"}`` (training wall time), or None."""
    train, evals = read_metrics(run_dir)
    seconds = {line["step"]: line.get("time") for line in train}
    for line in evals:
        value = line.get(target.metric)
        if isinstance(value, int | float) and math.isfinite(value) and target.reached(float(value)):
            return {"step": line["step"], "seconds": seconds.get(line["step"])}
    return None


def noise_test(a: list[float], b: list[float]) -> float | None:
    """Welch's two-sided t-test p-value for equal means (None when a side has fewer than two values).

    References:
        Welch 1947, "The generalization of 'Student's' problem when several different population
        variances are involved".
    """
    if len(a) < 2 or len(b) < 2:
        return None
    # Constant samples (up to float rounding) leave t undefined: equal constants are the same, others are not.
    if np.ptp(a) <= _TIE and np.ptp(b) <= _TIE:
        return 1.0 if abs(float(np.mean(a)) - float(np.mean(b))) <= _TIE else 0.0
    from scipy.stats import t as student_t

    # Welch's t and Welch–Satterthwaite degrees of freedom, as scipy.stats.ttest_ind(equal_var=False) computes
    # them; written out because scipy warns of precision loss when one sample is (nearly) constant.
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2.0 * student_t.sf(abs(t), df))


def summarize(groups: dict[str, list[Path]], target: Target | None) -> dict[str, Any]:
    """Per-strategy statistics over its seed runs, and each strategy's noise verdict against the best.

    The primary metric is the test counterpart of the monitor (``val_accuracy`` → ``test_accuracy``)
    when the runs have a test split, else the monitor's final value.
    """
    summaries = {name: [read_summary(d) for d in dirs] for name, dirs in groups.items()}
    everything = [s for runs in summaries.values() for s in runs]
    first = next((s for s in everything if s.get("monitor")), everything[0])  # a failed run has no monitor
    monitor, mode = str(first.get("monitor")), str(first.get("mode", "max"))
    test_name = "test_" + monitor.removeprefix("val_")
    primary = test_name if test_name in (first.get("final") or {}) else monitor
    rows = []
    for name, runs in summaries.items():
        finals = sorted({k for s in runs for k in (s.get("final") or {}) if k.startswith(("val_", "test_"))})
        row: dict[str, Any] = {
            "strategy": name,
            "runs": [str(d) for d in groups[name]],
            "seeds": [_seed_of(d) for d in groups[name]],
            "status": {st: sum(s.get("status") == st for s in runs) for st in {s.get("status") for s in runs}},
            "final": {k: mean_std([(s.get("final") or {}).get(k) for s in runs]) for k in finals},
            "best": mean_std([(s.get("best") or {}).get("value") for s in runs]),
            "wall_time_s": mean_std([s.get("wall_time_s") for s in runs]),
            "steps": mean_std([s.get("steps") for s in runs]),
        }
        if target is not None:
            hits = [time_to_target(d, target) for d in groups[name]]
            reached = [h for h in hits if h is not None]
            row["target"] = {
                "reached": len(reached),
                "of": len(hits),
                "steps": mean_std([h["step"] for h in reached]),
                "seconds": mean_std([h["seconds"] for h in reached]),
            }
        rows.append(row)
    _judge(rows, primary, mode)
    return {
        "monitor": monitor,
        "mode": mode,
        "primary": primary,
        "target": str(target) if target else None,
        "strategies": rows,
    }


def _judge(rows: list[dict[str, Any]], primary: str, mode: str) -> None:
    """Mark the best strategy by mean primary metric; test every other one against it."""
    scored = [r for r in rows if (r["final"].get(primary) or {}).get("mean") is not None]
    if not scored:
        return
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda r: r["final"][primary]["mean"])
    for row in rows:
        if row is best:
            row["noise"] = {"vs": row["strategy"], "p_value": None, "verdict": "best"}
            continue
        values = (row["final"].get(primary) or {}).get("values", [])
        p = noise_test(values, best["final"][primary]["values"])
        if p is None:
            verdict = "n/a (needs 2+ seeds)"
        elif p >= NOISE_P:
            verdict = "within noise"
        else:
            verdict = "worse"
        row["noise"] = {"vs": best["strategy"], "p_value": p, "verdict": verdict}


def _seed_of(run_dir: Path) -> int | None:
    try:
        return int(validate(read_saved_config(run_dir / CONFIG_FILE), source=str(run_dir)).seed)
    except ConfigError:
        return None


# --------------------------------------------------------------------------- files


def write_compare(out: Path, report: dict[str, Any], groups: dict[str, list[Path]]) -> None:
    """compare.json (everything), compare.md (the table) and compare.png (curves)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "compare.md", compare_markdown(report))
    runs = {name: dirs for name, dirs in groups.items() if dirs}
    if runs:
        from gradwise.report.curves import write_compare_plot

        write_compare_plot(runs, out / "compare.png", report["monitor"], target=report.get("target"))


def compare_markdown(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table, with how to read its noise column."""
    primary, monitor = report["primary"], report["monitor"]
    rows = report["strategies"]
    finals = [k for k in dict.fromkeys(k for r in rows for k in r["final"]) if k.startswith("test_")]
    finals = finals or [k for k in dict.fromkeys(k for r in rows for k in r["final"])]
    header = ["strategy", "seeds", *finals, f"best {monitor}"]
    if report.get("target"):
        header += [f"reached {report['target']}", "steps to target", "seconds to target"]
    header += ["steps", "wall s", f"{primary} vs best (Welch p)"]
    lines = [
        f"# Compare: {', '.join(report.get('targets', []))}",
        "",
        f"Mean ± sample std over seeds (n per strategy in `seeds`). Primary metric: `{primary}` "
        f"({report['mode']} is best). The last column is Welch's two-sided t-test of each strategy's "
        f"`{primary}` against the best strategy's: p ≥ {NOISE_P} means the difference is within seed noise.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [r["strategy"], str(len(r["runs"])), *(_pm(r["final"].get(k)) for k in finals), _pm(r["best"])]
        if report.get("target"):
            t = r["target"]
            cells += [f"{t['reached']}/{t['of']}", _pm(t["steps"], ".0f"), _pm(t["seconds"], ".3g")]
        cells += [_pm(r["steps"], ".0f"), _pm(r["wall_time_s"], ".3g"), _verdict(r.get("noise"))]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r["strategy"] for r in rows if any(st != "completed" and st != "early_stopped" for st in r["status"])]
    if failed:
        lines += ["", "Runs that did not finish normally: " + ", ".join(f"{n} {_status(rows, n)}" for n in failed)]
    if not report.get("complete", True):
        lines += ["", "**Interrupted**: run the same command again to continue the missing seeds."]
    return "\n".join(lines) + "\n"


def _pm(stats: dict[str, Any] | None, fmt: str = ".4g") -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    std = stats.get("std")
    return f"{stats['mean']:{fmt}} ± {std:{fmt}}" if std is not None else f"{stats['mean']:{fmt}}"


def _verdict(noise: dict[str, Any] | None) -> str:
    if not noise:
        return "–"
    p = noise.get("p_value")
    return noise["verdict"] + (f" (p={p:.2g})" if p is not None else "")


def _status(rows: list[dict[str, Any]], name: str) -> str:
    row = next(r for r in rows if r["strategy"] == name)
    return "(" + ", ".join(f"{n} {st}" for st, n in row["status"].items()) + ")"
