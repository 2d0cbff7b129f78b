"""Tracking the best evaluation and deciding when to stop early.

The decision logic follows Lightning's ``EarlyStopping`` (monitor, mode,
patience, min_delta) without its coupling: the loop calls :meth:`update`
itself after every evaluation and reads :attr:`should_stop`.
"""

from __future__ import annotations

import math
from typing import Any, Literal


class EarlyStopping:
    """Best-so-far tracking of one monitored metric, with optional patience.

    Args:
        monitor: Name of the metric (for messages only).
        mode: ``min`` if smaller is better, ``max`` otherwise.
        patience: Evaluations without improvement before stopping; None never stops.
        min_delta: Smallest change that counts as an improvement.
    """

    def __init__(self, monitor: str, mode: Literal["min", "max"], patience: int | None, min_delta: float) -> None:
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stop_reason: str | None = None

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if self.best is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; returns True when it is the new best."""
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        if self.patience is not None and self.bad_evals >= self.patience:
            self.stop_reason = (
                f"early stop: {self.monitor} did not improve for {self.bad_evals} evaluations "
                f"(best {self.best:.6g} at step {self.best_step})"
            )
        return False

    def stop(self, reason: str) -> None:
        """End the run at this evaluation for an outside judge's ``reason`` (a sweep's pruner)."""
        self.stop_reason = reason

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_step = state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.stop_reason = state["stop_reason"]
