"""PNG plots of a run directory (loss, eval metrics, LR/batch size, confusion) and of several runs side by side.

Everything here reads only a run directory (``metrics.jsonl``, ``summary.json``,
optionally ``config.yaml``), so it works on finished, killed and resumed runs alike.
Figures are drawn on the Agg canvas directly, without pyplot: no global backend
switch in the caller's process, no figure registry to leak, safe in threads.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradwise.config import monitor_mode
from gradwise.errors import CheckpointError
from gradwise.store.rundir import read_metrics

DPI = 110
_STEP = "optimizer step"
_LOSS_NAMES = {"cross_entropy": "cross-entropy", "mse": "MSE", "mae": "MAE", "huber": "Huber"}
_METRIC_LABELS = {
    "accuracy": "accuracy (fraction correct)",
    "macro_f1": "macro F1 (0–1)",
    "mse": "MSE (target units²)",
    "rmse": "RMSE (target units)",
    "mae": "MAE (target units)",
    "r2": "R² (1 = perfect)",
    "perplexity": "perplexity (tokens)",
}


def plot_finished_run(run_dir: Path, enabled: bool = True) -> None:
    """Draw a finished run's plots when its config asks (``log.plots``); a plotting bug only warns.

    The loop does not plot (the training layer knows nothing of reports): whoever ran ``fit`` calls this.
    """
    if not enabled or not (Path(run_dir) / "summary.json").exists():
        return
    try:
        write_run_plots(run_dir)
    except Exception as exc:  # a plotting bug must not fail a finished run; its summary is already written
        warnings.warn(f"{run_dir}: plots not written ({type(exc).__name__}: {exc})", stacklevel=2)


def write_run_plots(run_dir: Path) -> list[Path]:
    """Write ``loss.png``, ``metrics.png``, ``lr.png`` and ``confusion.png`` into ``run_dir/plots/``.

    A plot whose data is missing (no eval lines, a regression run, no summary) is skipped.

    Args:
        run_dir: The run directory.

    Returns:
        The paths written, in the order above.
    """
    run_dir = Path(run_dir)
    if (run_dir / "plots").is_symlink():
        raise CheckpointError(f"{run_dir / 'plots'}: a symbolic link; gradwise never writes through links")
    train, evals = read_metrics(run_dir)
    summary = _read_summary(run_dir)
    name = str(summary.get("name") or run_dir.name)
    figures = {
        "loss.png": _loss_figure(name, train, evals, summary, _loss_label(run_dir, summary)),
        "metrics.png": _metrics_figure(name, evals, summary),
        "lr.png": _lr_figure(name, train),
        "confusion.png": _confusion_figure(name, summary),
    }
    written = []
    for filename, fig in figures.items():
        if fig is not None:
            written.append(_save(fig, run_dir / "plots" / filename))
    return written


def write_comparison_plot(runs: dict[str, Path], out: Path, metric: str) -> Path:
    """Overlay several runs: train-loss EMA vs step on the left, ``metric`` vs step on the right.

    Args:
        runs: Run label → run directory, in legend order.
        out: The PNG to write (parent directories are created).
        metric: An eval metric as logged, e.g. ``"val_accuracy"``; its best value
            (min or max as ``stop.mode: auto`` would choose) goes in the legend.

    Returns:
        ``out``.

    Raises:
        ValueError: ``runs`` is empty.
        CheckpointError: a run directory does not exist.
    """
    if not runs:
        raise ValueError("write_comparison_plot needs at least one run")
    data = {label: read_metrics(Path(d)) for label, d in runs.items()}
    # a run without summary or config (killed early) should not blank the shared label
    loss_labels = {_loss_label(Path(d), _read_summary(Path(d))) for d in runs.values()} - {"loss"}
    fig = _comparison_figure(data, metric, loss_labels.pop() if len(loss_labels) == 1 else "loss")
    return _save(fig, Path(out))


def _comparison_figure(data: dict[str, tuple[list[dict], list[dict]]], metric: str, loss_label: str) -> Figure:
    beta = _ema_beta(max(len(train) for train, _ in data.values()))
    mode = monitor_mode(metric, "auto")
    cmap = matplotlib.colormaps["tab10" if len(data) <= 10 else "tab20"]
    fig = _figure((12.5, 4.8))
    ax_loss, ax_metric = fig.subplots(1, 2)
    losses = []
    for i, (label, (train, evals)) in enumerate(data.items()):
        color = cmap(i % cmap.N)
        steps, loss = _series(train, "loss")
        losses.append(loss)
        ax_loss.plot(steps, _ema(loss, beta), color=color, lw=1.6, label=label)
        steps, values = _series(evals, metric)
        best = _best_index(values, mode)
        note = f"best {values[best]:.4g} @ step {steps[best]}" if best is not None else f"no {metric}"
        ax_metric.plot(steps, values, "o-", ms=3, lw=1.3, color=color, label=f"{label} ({note})")
        if best is not None:
            ax_metric.plot([steps[best]], [values[best]], "*", ms=12, color=color, mec="black", mew=0.5, zorder=5)
    if _spans_decades(*losses):
        ax_loss.set_yscale("log")
    ax_loss.set(title=f"train loss (EMA, β={beta:.2f})", xlabel=_STEP, ylabel=loss_label)
    ax_metric.set(title=f"{metric} ({mode} is best)", xlabel=_STEP, ylabel=_metric_label(metric))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    names = ", ".join(data)
    fig.suptitle(f"Runs compared: {names if len(names) <= 90 else names[:87] + '...'}")
    return fig


def _loss_figure(name: str, train: list[dict], evals: list[dict], summary: dict, ylabel: str) -> Figure | None:
    steps, loss = _series(train, "loss")
    split_series = {s: _series(evals, f"{s}_loss") for s in _splits(evals)}
    split_series = {s: xy for s, xy in split_series.items() if len(xy[0])}
    if not len(steps) and not split_series:
        return None
    fig = _figure((8, 4.6))
    ax = fig.subplots()
    if len(steps):
        beta = _ema_beta(len(steps))
        ax.plot(steps, loss, color="C0", alpha=0.3, lw=0.8, label="train (raw)")
        ax.plot(steps, _ema(loss, beta), color="C0", lw=1.8, label=f"train (EMA, β={beta:.2f})")
    for i, (split, (x, y)) in enumerate(split_series.items()):
        ax.plot(x, y, "o-" if len(x) > 1 else "s", color=f"C{i + 1}", ms=4, lw=1.3, label=split)
    _mark_best(ax, summary, {f"{s}_loss" for s in split_series})
    if _spans_decades(loss, *(y for _, y in split_series.values())):
        ax.set_yscale("log")
    ax.set(title=f"{name}: loss", xlabel=_STEP, ylabel=ylabel)
    _finish(ax)
    return fig


def _metrics_figure(name: str, evals: list[dict], summary: dict) -> Figure | None:
    splits = _splits(evals)
    bases: list[str] = []
    for line in evals:
        prefix = f"{line.get('split', 'val')}_"
        for key, value in line.items():
            base = key[len(prefix) :]
            if key.startswith(prefix) and base != "loss" and _is_number(value) and base not in bases:
                bases.append(base)
    if not bases:
        return None
    cols = min(len(bases), 3)
    rows = math.ceil(len(bases) / cols)
    fig = _figure((4.4 * cols + 0.6, 3.5 * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, base in zip(axes, bases, strict=False):
        for i, split in enumerate(splits):
            x, y = _series(evals, f"{split}_{base}")
            if len(x):
                ax.plot(x, y, "o-" if len(x) > 1 else "s", color=f"C{i + 1}", ms=4, lw=1.3, label=split)
        _mark_best(ax, summary, {f"{s}_{base}" for s in splits})
        title = _metric_label(base).split(" (")[0]
        if summary.get("monitor") in {f"{s}_{base}" for s in splits}:
            title += " (monitored)"
        ax.set(title=title, xlabel=_STEP, ylabel=_metric_label(base))
        _finish(ax)
    for ax in axes[len(bases) :]:
        ax.set_visible(False)
    fig.suptitle(f"{name}: evaluation metrics")
    return fig


def _lr_figure(name: str, train: list[dict]) -> Figure | None:
    steps, lr = _series(train, "lr")
    if not len(steps):
        return None
    fig = _figure((8, 4.2))
    ax = fig.subplots()
    ax.plot(steps, lr, color="C0", lw=1.6, label="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set(title=f"{name}: learning rate", xlabel=_STEP, ylabel="learning rate (optim.lr × schedule)")
    # The short last batch of an epoch is not a batch-size change: leave epoch-closing steps out.
    planned = [line for line in train if not float(line.get("epoch", 0.5)).is_integer()] or train
    bs_steps, bs = _series(planned, "batch_size")
    if len(np.unique(bs[np.isfinite(bs)])) > 1:
        twin = ax.twinx()
        twin.plot(bs_steps, bs, color="C1", lw=1.4, drawstyle="steps-post", label="batch size")
        twin.set_ylabel("batch size (examples per step)")
        handles, labels = ax.get_legend_handles_labels()
        more_handles, more_labels = twin.get_legend_handles_labels()
        # below the axes: a twin axis's lines would hide under (or hide) an in-plot legend
        ax.legend(
            handles + more_handles, labels + more_labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2
        )
        ax.set_title(f"{name}: learning rate and batch size")
    ax.grid(alpha=0.3)
    return fig


def _confusion_figure(name: str, summary: dict) -> Figure | None:
    cm = summary.get("confusion_matrix")
    if summary.get("task") == "regression" or not isinstance(cm, dict):
        return None
    try:
        labels = [str(label) for label in cm["labels"]]
        counts = np.asarray(cm["matrix"], dtype=float)
    except (KeyError, TypeError, ValueError):
        return None
    n = len(labels)
    if n == 0 or counts.shape != (n, n):
        return None
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = min(14.0, max(5.0, 0.5 * n + 3.0))
    fig = _figure((side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of the true class", fraction=0.046, pad=0.04)
    if n <= 50:
        rotate = n > 6 or max(map(len, labels)) > 6
        ax.set_xticks(range(n), labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
        ax.set_yticks(range(n), labels)
    if n <= 15:
        for (i, j), count in np.ndenumerate(counts):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(count)}", ha="center", va="center", color=color, fontsize=max(7, 12 - n // 3))
    accuracy = np.trace(counts) / counts.sum() if counts.sum() else float("nan")
    ax.set(xlabel="predicted class", ylabel="true class")
    shown = "; counts shown" if n <= 15 else ""
    ax.set_title(f"{name}: confusion matrix (rows normalized{shown})\naccuracy {accuracy:.3f}")
    return fig


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a killed run has no summary yet; plot what the metrics alone show
    return summary if isinstance(summary, dict) else {}


def _loss_label(run_dir: Path, summary: dict) -> str:
    loss = summary.get("loss")
    if loss not in _LOSS_NAMES:
        try:
            loss = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["task"]["loss"]
        except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):  # ValueError: not UTF-8
            loss = None
    if loss not in _LOSS_NAMES:
        # loss "auto" resolves to cross-entropy for classification and MSE for regression
        loss = {"classification": "cross_entropy", "regression": "mse"}.get(summary.get("task"))
    return f"loss ({_LOSS_NAMES[loss]})" if loss in _LOSS_NAMES else "loss"


def _metric_label(metric: str) -> str:
    base = metric.split("_", 1)[1] if metric.startswith(("val_", "test_")) else metric
    return _METRIC_LABELS.get(base, base.replace("_", " "))


def _splits(evals: list[dict]) -> list[str]:
    return list(dict.fromkeys(str(line.get("split", "val")) for line in evals))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _series(lines: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and float values of ``key`` over the lines that carry it; inf and NaN become NaN gaps."""
    pairs = [(line["step"], float(line[key])) for line in lines if _is_number(line.get(key))]
    steps = np.array([p[0] for p in pairs], dtype=int)
    values = np.array([p[1] for p in pairs], dtype=float)
    values[~np.isfinite(values)] = np.nan
    return steps, values


def _ema_beta(n: int) -> float:
    # a window of ~n/50 steps: smooth enough to read the trend, short enough not to lag behind a fast drop
    return min(0.98, max(0.0, 1.0 - 50.0 / max(n, 1)))


def _ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as in Adam), skipping NaNs so one bad step leaves no hole."""
    out = np.full(len(values), np.nan)
    mean = weight = 0.0
    for i, value in enumerate(values):
        if np.isfinite(value):
            mean = beta * mean + (1.0 - beta) * value
            weight = beta * weight + (1.0 - beta)
        if weight > 0.0:
            out[i] = mean / weight
    return out


def _spans_decades(*arrays: np.ndarray, decades: float = 2.0) -> bool:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    if not len(values) or (values <= 0).any():
        return False
    return bool(np.log10(values.max() / values.min()) > decades)


def _best_index(values: np.ndarray, mode: str) -> int | None:
    if not np.isfinite(values).any():
        return None
    return int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))


def _mark_best(ax: Axes, summary: dict, metrics: set[str]) -> None:
    """Star the best point of the monitored metric, if ``metrics`` (drawn on ``ax``) holds it."""
    best = summary.get("best")
    if summary.get("monitor") not in metrics or not isinstance(best, dict):
        return
    step, value = best.get("step"), best.get("value")
    if _is_number(step) and _is_number(value):
        label = f"best {summary['monitor']} {value:.4g} @ step {step}"
        ax.plot([step], [value], "*", color="crimson", ms=14, zorder=5, label=label)


def _finish(ax: Axes) -> None:
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize="small")


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG atomically: temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report served to others must be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
