"""The report layer's part in a run: its plots, drawn when the run finishes (the loop itself never plots)."""

from __future__ import annotations

from pathlib import Path

from gradwise.train.loop import FitHooks


def plotting_hooks(enabled: bool) -> FitHooks:
    """Hooks for ``fit`` that draw the run's plots at its end when ``enabled`` (``log.plots``)."""
    return FitHooks(finished=_draw if enabled else None)


def _draw(run_dir: Path) -> None:
    from gradwise.report.plots import plot_finished_run  # matplotlib loads only when plotting

    plot_finished_run(run_dir)
