"""The learning-rate range test: one short run with an exponentially rising LR.

The range test is an ordinary run of the recipe through the one loop, with
``optim.lr=min_lr`` and an ``exponential`` schedule whose per-step factor takes
the LR to ``max_lr`` in ``steps`` steps. A :class:`~gradwise.train.loop.FitHooks`
``after_step`` hook stops it once the smoothed loss exceeds four times its
minimum (diverged). The losses and LRs are read back from ``metrics.jsonl``;
the suggestion is the LR where the smoothed loss falls fastest (per unit of
log LR) before its minimum. The range test trains in its own run directory
(``out``, by default a new ``<out_dir>/<recipe>-lr-find-<time>`` beside the
recipe's runs), which holds the plot ``lr_find.png`` and ``lr_find.json``; the
recipe's own runs, model and optimizer are untouched.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradwise.config import RunConfig, apply_overrides, read_yaml, set_path, validate
from gradwise.errors import ConfigError, TrainingError
from gradwise.store.files import atomic_write_text
from gradwise.store.rundir import METRICS_FILE, new_run_dir, read_metrics
from gradwise.train.loop import FitHooks, fit

# fastai's smoothing factor and divergence threshold (LRFinder: stop when smoothed loss > 4 x best).
SMOOTHING = 0.98
DIVERGENCE_FACTOR = 4.0
PLOT_FILE = "lr_find.png"
RESULT_FILE = "lr_find.json"


@dataclass(frozen=True)
class LRFindResult:
    """What a range test measured and suggests.

    Attributes:
        suggestion: The suggested ``optim.lr`` (steepest descent of the smoothed loss).
        lrs: The LR of every optimizer step taken.
        losses: The training loss of every step.
        smoothed: The bias-corrected exponential moving average of ``losses``.
        plot: The loss-vs-LR plot (PNG).
        run_dir: The range test's run directory.
        stop_reason: Why the range test ended (budget reached, or the divergence).
    """

    suggestion: float
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    plot: Path
    run_dir: Path
    stop_reason: str = ""

    def __str__(self) -> str:
        return "\n".join(
            [
                f"LR range test: {len(self.lrs)} steps, lr {self.lrs[0]:.3g} -> {self.lrs[-1]:.3g} "
                f"({self.stop_reason})",
                f"suggested optim.lr: {self.suggestion:.3g} (steepest descent of the smoothed loss)",
                f"plot: {self.plot}",
                f"run: {self.run_dir}",
            ]
        )


def lr_find(
    recipe: Path,
    overrides: list[str] | None = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 100,
    out: Path | None = None,
) -> LRFindResult:
    """Run the LR range test on ``recipe`` and suggest a learning rate.

    Args:
        recipe: The recipe file (a bundled name is resolved by the caller with ``find_recipe``).
        overrides: ``key.path=value`` overrides applied to the recipe first.
        min_lr: The LR of the first step.
        max_lr: The LR the exponential ramp reaches after ``steps`` steps.
        steps: Optimizer steps of the ramp (fewer when the loss diverges first).
        out: The range test's run directory (must not hold a run yet); default a new
            ``<out_dir>/<recipe stem>-lr-find-<timestamp>`` in the recipe's ``out_dir``.

    Returns:
        The suggestion, the measured curve, the plot and the run directory.

    Raises:
        ConfigError: A bad argument or recipe, or a curve with no descent to pick from.

    References:
        Smith 2017, "Cyclical Learning Rates for Training Neural Networks" (the LR range test);
        smoothing and divergence stop as in fastai's ``LRFinder`` (Howard & Gugger 2020, "fastai").
    """
    if not min_lr > 0:
        raise ConfigError(f"lr_find min_lr: must be > 0 (got {min_lr})")
    if not max_lr > min_lr:
        raise ConfigError(f"lr_find max_lr: must be above min_lr {min_lr} (got {max_lr})")
    if steps < 5:
        raise ConfigError(f"lr_find steps: must be >= 5 to draw a curve (got {steps})")
    if out is not None:
        run_dir = Path(out)
        if (run_dir / METRICS_FILE).exists():
            raise ConfigError(f"lr_find out {run_dir}: already holds a run ({METRICS_FILE}); pass a new directory")
    else:
        run_dir = _default_run_dir(recipe, overrides or [])
    try:
        cfg = range_test_config(recipe, overrides or [], min_lr=min_lr, max_lr=max_lr, steps=steps, run_dir=run_dir)
    except ConfigError:
        if out is None:
            run_dir.rmdir()  # made just now, still empty: a mistake leaves nothing behind
        raise

    watcher = _DivergenceWatch()
    try:
        summary = fit(cfg, run_dir, hooks=FitHooks(after_step=watcher))
        stop_reason = str(summary.get("stop_reason", ""))
    except TrainingError as exc:  # a NaN/inf loss at a high LR is the end of the test, not a failure
        stop_reason = f"loss not finite: {str(exc).split(';')[0]}"
    # The weights after a ramp to divergence are of no use; keep the log, drop the checkpoints.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    train, _ = read_metrics(run_dir)
    lrs = [float(line["lr"]) for line in train]
    losses = [float(line["loss"]) for line in train]
    smoothed = smooth_losses(losses)
    index = steepest_descent(lrs, smoothed)
    plot = write_lr_plot(lrs, losses, smoothed, index, run_dir / PLOT_FILE, title=f"LR range test: {recipe.stem}")
    result = LRFindResult(
        suggestion=lrs[index],
        lrs=tuple(lrs),
        losses=tuple(losses),
        smoothed=tuple(smoothed),
        plot=plot,
        run_dir=run_dir,
        stop_reason=stop_reason,
    )
    record = {"suggestion": result.suggestion, "stop_reason": stop_reason, "lrs": lrs, "losses": losses}
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    return result


def _default_run_dir(recipe: Path, overrides: list[str]) -> Path:
    """A new ``<out_dir>/<recipe stem>-lr-find-<timestamp>`` for the range test, in the recipe's ``out_dir``."""
    raw = apply_overrides(read_yaml(recipe), overrides)
    raw.pop("variants", None)
    cfg = validate(raw, source=str(recipe))
    return new_run_dir(cfg.model_copy(update={"name": None}), f"{recipe.stem}-lr-find")


def range_test_config(
    recipe: Path, overrides: list[str], *, min_lr: float, max_lr: float, steps: int, run_dir: Path
) -> RunConfig:
    """The recipe turned into a range test: exponential LR ramp, fixed step budget, one final evaluation."""
    raw = apply_overrides(read_yaml(recipe), overrides)
    raw.pop("variants", None)  # the range test is of the base recipe
    validate(raw, source=str(recipe))  # the recipe's own mistakes are reported against the recipe
    gamma = (max_lr / min_lr) ** (1.0 / steps)
    changes: dict[str, Any] = {
        "name": run_dir.name,
        "out_dir": str(run_dir.parent),
        "optim.lr": min_lr,
        "schedule": {"name": "exponential", "gamma": gamma, "warmup_steps": 0},
        "batch.ramp": None,  # the test is at the recipe's final batch size
        "batch.at_epochs": None,
        "stop.epochs": None,
        "stop.max_steps": steps,
        "stop.patience": None,
        "eval.every_steps": steps,  # evaluated once, at the end
        "checkpoint.keep_best": False,
        "log.plots": False,
        "log.tensorboard": False,
        "log.mlflow": None,
    }
    for path, value in changes.items():
        set_path(raw, path, value)
    source = f"{recipe} (LR range test)"
    try:
        return validate(raw, source=source)
    except ConfigError as exc:
        if "schedule.gamma" not in str(exc):
            raise
    # The schema caps schedule.gamma at 1 (a decay); the range test needs a growth factor. Validate
    # with a neutral factor, then set the real one: the schedule is gamma**t for any gamma.
    set_path(raw, "schedule.gamma", 1.0)
    cfg = validate(raw, source=source)
    return cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"gamma": gamma})})


def smooth_losses(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average: a_i = β·a_(i-1) + (1-β)·l_i, s_i = a_i / (1 - β^(i+1)).

    Args:
        losses: Raw losses in step order.
        beta: The smoothing factor (0 = no smoothing).

    Returns:
        The smoothed losses, one per raw loss.

    References:
        Kingma & Ba 2015, "Adam" (the bias correction of a zero-initialised average).
    """
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1.0 - beta) * loss
        smoothed.append(average / (1.0 - beta ** (i + 1)))
    return smoothed


def steepest_descent(lrs: list[float], smoothed: list[float]) -> int:
    """Index of the most negative slope d(smoothed loss)/d(log lr), among the points up to the loss minimum.

    Args:
        lrs: LRs in step order (increasing).
        smoothed: The smoothed loss at each LR.

    Returns:
        The index into ``lrs`` of the suggestion.

    Raises:
        ConfigError: The loss never fell (the minimum is among the first points).
    """
    values = np.asarray(smoothed, dtype=float)
    lowest = int(np.argmin(values))
    if lowest < 2:
        raise ConfigError(
            f"lr_find: the smoothed loss did not fall (lowest at step {lowest + 1} of {len(values)}, "
            f"lr {lrs[lowest]:.3g}); lower min_lr or raise steps"
        )
    region = values[: lowest + 1]
    slopes = np.gradient(region, np.log(np.asarray(lrs[: lowest + 1], dtype=float)))
    return int(np.argmin(slopes))


class _DivergenceWatch:
    """The ``after_step`` hook: smooths the losses as they come and stops past 4 x the lowest."""

    def __init__(self, beta: float = SMOOTHING, factor: float = DIVERGENCE_FACTOR) -> None:
        self.beta, self.factor = beta, factor
        self.average, self.count, self.best = 0.0, 0, math.inf

    def __call__(self, step: int, loss: float) -> str | None:
        self.count += 1
        self.average = self.beta * self.average + (1.0 - self.beta) * loss
        value = self.average / (1.0 - self.beta**self.count)
        self.best = min(self.best, value)
        if value > self.factor * self.best:
            return f"loss diverged at step {step}: smoothed {value:.4g} > {self.factor:g} x its minimum {self.best:.4g}"
        return None


def write_lr_plot(
    lrs: list[float], losses: list[float], smoothed: list[float], index: int, path: Path, *, title: str
) -> Path:
    """Loss vs LR (log x): raw and smoothed loss, the suggestion marked; written atomically as PNG."""
    from gradwise.report.plots import _figure, _save  # matplotlib is slow to import; only when plotting

    fig = _figure((8, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(lrs, losses, color="0.7", linewidth=0.8, label="loss per step")
    ax.plot(lrs, smoothed, color="C0", linewidth=1.8, label=f"smoothed (EMA, β={SMOOTHING})")
    ax.axvline(lrs[index], color="C3", linestyle="--", linewidth=1)
    ax.plot([lrs[index]], [smoothed[index]], "o", color="C3", label=f"suggestion {lrs[index]:.3g} (steepest descent)")
    ax.set_xscale("log")
    # The diverged tail would squash the interesting part; show up to a little above the starting loss.
    top = max(smoothed[: int(np.argmin(smoothed)) + 1]) * 1.25
    ax.set_ylim(min(min(losses), min(smoothed)) * 0.9, top)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (per example)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)
