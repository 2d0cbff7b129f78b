"""Live console progress: a rich progress bar plus one line per evaluation.

Updates are throttled by wall time so that drawing never shows up in the
step time, however short the step.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_MIN_INTERVAL_S = 0.2


class ProgressReporter:
    """Shows step/total, loss and LR while training, and prints each evaluation."""

    def __init__(self, name: str, total: int, start: int, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._last_draw = 0.0
        self._status = ""
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=5,
            )
            self._task = self._progress.add_task(name, total=total, completed=start, status="")

    def __enter__(self) -> ProgressReporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, step: int, loss: float, lr: float) -> None:
        if self._progress is None:
            return
        # Kept even when not drawn: the bar's last frame (finish) shows the last step's loss and LR, not
        # those of the last step that happened to be drawn (an LR range test moves the LR every step).
        self._status = f"loss {loss:.4g}  lr {lr:.3g}"
        now = time.monotonic()
        if now - self._last_draw >= _MIN_INTERVAL_S:
            self._last_draw = now
            self._progress.update(self._task, completed=step, status=self._status)

    def note(self, message: str) -> None:
        """Print a line above the bar (evaluations, checkpoints, stops)."""
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    def finish(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=self._status)
