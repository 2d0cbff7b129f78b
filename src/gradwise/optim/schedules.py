"""Learning-rate schedules as a multiplier on each parameter group's base lr.

:func:`schedule_multiplier` is a pure function of the optimizer step (the
0-based index of the step about to be taken) and the run length; the loop sets
``group["lr"] = group["base_lr"] * multiplier * batch_lr_scale`` before every
step. Only ``plateau`` reacts to evaluations, through :class:`LRSchedule`, whose
small state is checkpointed.

A linear warmup of W steps, (step + 1) / W, goes in front of any schedule; the
main schedule then runs over t = step − W of T' = total_steps − W steps (t is
clipped to T'), with r = ``min_lr_ratio`` as its floor. Step counts in the
config (``step_size``, ``milestones``) count t, i.e. steps after the warmup.
exponential/step/multistep are γ-powers floored at r (torch's, when r = 0);
linear/cosine/polynomial reach r at t = T', one past the last step, as torch's
LinearLR/CosineAnnealingLR/PolynomialLR do; onecycle is torch's OneCycleLR curve
with its momentum cycling left out (the optimizer's own momentum is kept).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any, Literal

from gradwise.config import ScheduleConfig

# torch.optim.lr_scheduler.ReduceLROnPlateau ignores reductions smaller than this (its `eps`).
_PLATEAU_EPS = 1e-8


def schedule_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The lr multiplier for optimizer step ``step`` (everything except the plateau factor).

    Args:
        step: 0-based index of the step about to be taken.
        total_steps: Optimizer steps in the whole run.
        cfg: The schedule section.

    Returns:
        The multiplier; 1 means ``base_lr``.

    References:
        cosine: Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts";
        warmup: Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour";
        wsd: Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
        Training Durations"; Hu et al. 2024, "MiniCPM". onecycle: Smith & Topin 2019,
        "Super-Convergence".
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = warmup_length(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    t = min(step - warmup, span)
    return _main(t, span, cfg)


def warmup_length(cfg: ScheduleConfig, total_steps: int) -> int:
    """Warmup steps: ``warmup_steps``, or ``warmup_fraction`` of ``total_steps`` (rounded, at least 1 when > 0)."""
    if cfg.warmup_fraction > 0:
        return max(1, round(cfg.warmup_fraction * total_steps))
    return cfg.warmup_steps


def _main(t: int, span: int, cfg: ScheduleConfig) -> float:
    r = cfg.min_lr_ratio
    name = cfg.name
    if name in ("constant", "plateau"):
        return 1.0
    if name == "exponential":
        return max(_gamma(cfg) ** t, r)
    if name == "step":
        assert cfg.step_size is not None  # the config requires it for 'step'
        return max(_gamma(cfg) ** (t // cfg.step_size), r)
    if name == "multistep":
        return max(_gamma(cfg) ** bisect_right(cfg.milestones, t), r)
    if name == "linear":
        return 1.0 - (1.0 - r) * t / span
    if name == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t / span))
    if name == "polynomial":
        return r + (1.0 - r) * (1.0 - t / span) ** cfg.power
    if name == "wsd":
        return _wsd(t, span, cfg)
    if name == "onecycle":
        return _onecycle(min(t, span - 1), span, cfg)
    raise ValueError(f"schedule.name: unknown schedule {name!r}")


def _gamma(cfg: ScheduleConfig) -> float:
    return 0.1 if cfg.gamma is None else cfg.gamma


def _wsd(t: int, span: int, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay: 1 until the last ceil(decay_fraction·T') steps, then down to r."""
    r = cfg.min_lr_ratio
    decay_steps = max(math.ceil(cfg.decay_fraction * span), 1)
    start = span - decay_steps
    if t < start:
        return 1.0
    # s is 0 on the first decay step and reaches 1 at t = T' (one past the last step), like
    # 'linear'/'cosine' and torch's CosineAnnealingLR, which also end just above r.
    s = min((t - start) / decay_steps, 1.0)
    if cfg.decay_shape == "linear":
        return 1.0 - (1.0 - r) * s
    if cfg.decay_shape == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * s))
    return r + (1.0 - r) * (1.0 - math.sqrt(s))


def _onecycle(t: int, span: int, cfg: ScheduleConfig) -> float:
    """torch OneCycleLR's two-phase cosine lr curve with max_lr = 1 (momentum is not cycled here)."""
    initial = 1.0 / cfg.div_factor
    final = initial / cfg.final_div_factor
    peak_step = float(cfg.pct_start * span) - 1
    if t <= peak_step:
        start_step, end_step, start, end = 0.0, peak_step, initial, 1.0
    else:
        start_step, end_step, start, end = peak_step, float(span - 1), 1.0, final
    # torch divides by zero when a phase has no length; such a phase is taken as finished.
    pct = (t - start_step) / (end_step - start_step) if end_step > start_step else 1.0
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class LRSchedule:
    """A schedule for one run: :func:`schedule_multiplier` times the plateau factor.

    For ``plateau`` the main multiplier is 1 (after any warmup) and every
    :meth:`on_eval` follows torch's ReduceLROnPlateau with ``threshold_mode='rel'``:
    an evaluation that does not beat the best by the relative ``threshold`` is bad;
    after more than ``patience`` bad evaluations the factor is multiplied by
    ``factor`` (floored at ``min_lr_ratio``) and ``cooldown`` evaluations are ignored.
    Other schedules ignore :meth:`on_eval`.

    Args:
        cfg: The schedule section.
        total_steps: Optimizer steps in the whole run.
        mode: ``min`` when lower monitored values are better, ``max`` otherwise.
    """

    def __init__(self, cfg: ScheduleConfig, total_steps: int, mode: Literal["min", "max"]) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.mode = mode
        self.scale = 1.0
        self.best = self._worst
        self.num_bad_evals = 0
        self.cooldown_counter = 0

    def multiplier(self, step: int) -> float:
        """The lr multiplier for optimizer step ``step`` (0-based)."""
        return schedule_multiplier(step, self.total_steps, self.cfg) * self.scale

    def on_eval(self, value: float) -> None:
        """Record an evaluation of the monitored metric (only ``plateau`` reacts)."""
        if self.cfg.name != "plateau":
            return
        current = float(value)
        if self._is_better(current):
            self.best = current
            self.num_bad_evals = 0
        else:
            self.num_bad_evals += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_evals = 0
        if self.num_bad_evals > self.cfg.patience:
            reduced = max(self.scale * self.cfg.factor, self.cfg.min_lr_ratio)
            if self.scale - reduced > _PLATEAU_EPS:
                self.scale = reduced
            self.cooldown_counter = self.cfg.cooldown
            self.num_bad_evals = 0

    def _is_better(self, current: float) -> bool:
        if self.mode == "min":
            return current < self.best * (1.0 - self.cfg.threshold)
        return current > self.best * (1.0 + self.cfg.threshold)

    @property
    def _worst(self) -> float:
        # torch's starting "best", which any finite value beats.
        return math.inf if self.mode == "min" else -math.inf

    def state_dict(self) -> dict[str, Any]:
        """The plateau state (JSON-safe: ``best`` is None until the first evaluation)."""
        return {
            "scale": self.scale,
            "best": None if self.best == self._worst else self.best,
            "num_bad_evals": self.num_bad_evals,
            "cooldown_counter": self.cooldown_counter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scale = float(state["scale"])
        self.best = self._worst if state["best"] is None else float(state["best"])
        self.num_bad_evals = int(state["num_bad_evals"])
        self.cooldown_counter = int(state["cooldown_counter"])
