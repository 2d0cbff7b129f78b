"""Learning curves of several strategies, each over several seeds: mean line with a min–max band.

Left: train loss (each seed smoothed by the same EMA as the single-run plots,
then averaged); middle: the monitored eval metric vs step; right: the primary
final metric per strategy, mean ± sample std with every seed as a dot — the
picture of how large a difference is next to the seed noise.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from gradwise.config import monitor_mode
from gradwise.report.plots import (
    _STEP,
    _ema,
    _ema_beta,
    _figure,
    _loss_label,
    _metric_label,
    _read_summary,
    _save,
    _series,
    _spans_decades,
)
from gradwise.store.rundir import read_metrics

# Enough points to draw a smooth band without a 100k-step run making a huge figure.
_MAX_POINTS = 400


def write_compare_plot(groups: dict[str, list[Path]], out: Path, metric: str, *, target: str | None = None) -> Path:
    """Overlay strategies (mean over seeds with a min–max band) and their final-metric spread.

    Args:
        groups: Strategy → its seed run directories, in legend order.
        out: The PNG to write.
        metric: The eval metric to draw vs step, e.g. ``"val_accuracy"``.
        target: ``metric>=value`` / ``metric<=value``; drawn as a dashed line when on ``metric``.

    Returns:
        ``out``.

    Raises:
        ValueError: ``groups`` is empty.
    """
    if not groups:
        raise ValueError("write_compare_plot needs at least one strategy")
    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    fig = _figure((17.5, 5.0))
    ax_loss, ax_metric, ax_final = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 1.0, 0.8]})
    loss_labels, loss_arrays, primary, finals = set(), [], "", {}
    for i, (name, dirs) in enumerate(groups.items()):
        color = cmap(i % cmap.N)
        data = [read_metrics(Path(d)) for d in dirs]
        summaries = [_read_summary(Path(d)) for d in dirs]
        loss_labels |= {_loss_label(Path(d), s) for d, s in zip(dirs, summaries, strict=True)}
        beta = _ema_beta(max((len(train) for train, _ in data), default=1))
        loss_runs = [(steps, _ema(values, beta)) for steps, values in (_series(train, "loss") for train, _ in data)]
        loss_arrays += [v for _, v in loss_runs]
        _band(ax_loss, loss_runs, color, name, len(dirs))
        _band(ax_metric, [_series(evals, metric) for _, evals in data], color, name, len(dirs))
        primary = primary or _primary(summaries, metric)
        finals[name] = [float(s["final"][primary]) for s in summaries if _has_final(s, primary)]
    loss_labels.discard("loss")
    if _spans_decades(*loss_arrays):
        ax_loss.set_yscale("log")
    ax_loss.set(title="train loss (EMA per seed; mean, band min–max)", xlabel=_STEP)
    ax_loss.set_ylabel(loss_labels.pop() if len(loss_labels) == 1 else "loss")
    mode = monitor_mode(metric, "auto")
    _target_line(ax_metric, metric, target)
    ax_metric.set(title=f"{metric} ({mode} is best; mean, band min–max)", xlabel=_STEP, ylabel=_metric_label(metric))
    _final_panel(ax_final, finals, primary or metric, cmap)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    seeds = sorted({len(d) for d in groups.values()})
    shown = "/".join(map(str, seeds))
    fig.suptitle(f"{len(groups)} strategies compared over {shown} seed{'s' if seeds != [1] else ''} each")
    return _save(fig, Path(out))


def mean_band(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean, min and max over seed curves, each interpolated onto the union of their steps.

    A seed counts at a step only inside its own range (an early-stopped seed ends where it ended),
    and NaNs (non-finite values) are left out.
    """
    runs = [(s, v) for s, v in runs if len(s)]
    if not runs:
        empty = np.array([])
        return empty, empty, empty, empty
    grid = np.unique(np.concatenate([s for s, _ in runs]))
    if len(grid) > _MAX_POINTS:
        grid = np.unique(grid[np.linspace(0, len(grid) - 1, _MAX_POINTS).round().astype(int)])
    stack = np.full((len(runs), len(grid)), np.nan)
    for row, (steps, values) in enumerate(runs):
        keep = np.isfinite(values)
        if not keep.any():
            continue
        inside = (grid >= steps[keep][0]) & (grid <= steps[keep][-1])
        stack[row, inside] = np.interp(grid[inside], steps[keep], values[keep])
    covered = np.isfinite(stack).any(axis=0)
    grid, stack = grid[covered], stack[:, covered]
    return grid, np.nanmean(stack, axis=0), np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)


def _band(ax: Axes, runs: list[tuple[np.ndarray, np.ndarray]], color: object, name: str, n: int) -> None:
    steps, mean, low, high = mean_band(runs)
    if not len(steps):
        return
    ax.plot(steps, mean, color=color, lw=1.6, label=f"{name} (n={n})")
    if n > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.18, lw=0)


def _primary(summaries: list[dict], metric: str) -> str:
    test = "test_" + metric.removeprefix("val_")
    return test if any(_has_final(s, test) for s in summaries) else metric


def _has_final(summary: dict, key: str) -> bool:
    value = (summary.get("final") or {}).get(key)
    return isinstance(value, int | float) and np.isfinite(value)


def _target_line(ax: Axes, metric: str, target: str | None) -> None:
    if not target:
        return
    for op in (">=", "<="):
        name, _, value = target.partition(op)
        if value and name.strip() == metric:
            ax.axhline(float(value), color="black", ls="--", lw=1, label=f"target {target}")


def _final_panel(ax: Axes, finals: dict[str, list[float]], primary: str, cmap: object) -> None:
    """Mean ± sample std of the final primary metric per strategy, every seed as a dot."""
    names = list(finals)
    for i, name in enumerate(names):
        values = np.asarray(finals[name], dtype=float)
        if not len(values):
            continue
        color = cmap(i % cmap.N)  # type: ignore[operator]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        ax.errorbar([values.mean()], [i], xerr=[std], fmt="o", color=color, ms=7, capsize=4)
        ax.plot(values, np.full(len(values), i) + 0.18, "x", color=color, ms=5, alpha=0.8)
    # Long strategy names are wrapped: unwrapped they push the panel, and its title, off the figure's edge.
    ax.set_yticks(range(len(names)), [textwrap.fill(name, 22) for name in names])
    ax.invert_yaxis()
    ax.set(title=f"final {primary}:\nmean ± std (o), seeds (x)", xlabel=_metric_label(primary))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # a narrow panel: four-decimal ticks would touch
    ax.grid(alpha=0.3, axis="x")
