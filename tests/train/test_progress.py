"""The console progress bar: throttled drawing, and a last frame that shows the last step."""

from __future__ import annotations

import io

from rich.console import Console

from gradwise.train.progress import ProgressReporter


def test_the_last_frame_shows_the_last_steps_loss_and_lr_even_when_it_was_not_drawn():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with ProgressReporter("run", total=3, start=0, enabled=True, console=console) as reporter:
        reporter.step(1, 2.0, 0.001)  # drawn
        reporter.step(2, 1.5, 0.01)  # within the throttle interval: not drawn
        reporter.step(3, 1.25, 0.464)
        reporter.finish(3)
        task = reporter._progress.tasks[0]
        assert task.completed == 3
        assert task.fields["status"] == "loss 1.25  lr 0.464"
