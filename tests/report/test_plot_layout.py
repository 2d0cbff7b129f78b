"""Plots a person can read: no two texts on top of each other, every text inside the figure.

Each plot is drawn from small synthetic inputs with the Agg renderer (the one the
files are written with); the figure is taken at the moment it is saved, and every
visible Text artist with non-empty text (titles, axis labels, annotations, legend
entries, tick labels) is measured with ``get_window_extent(renderer)``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

import gradwise.report.pareto as pareto_module
import gradwise.report.plots as plots_module
from gradwise.experiments.sweep_results import _plot as plot_trials
from gradwise.report.pareto import write_pareto_plot

# Antialiased glyph edges may touch; an overlap must be more than a pixel each way to count.
TOLERANCE_PX = 1.0


def text_boxes(fig: Figure) -> list[tuple[str, Bbox]]:
    """(text, window extent in pixels) of every visible, non-empty Text artist of ``fig``, after a draw."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    undrawn = set()  # tick labels of ticks outside the view limits: matplotlib keeps them but never draws them
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not low - 1e-12 * abs(high - low) <= tick.get_loc() <= high + 1e-12 * abs(high - low):
                    undrawn.update({id(tick.label1), id(tick.label2)})
    boxes = []
    for artist in fig.findobj(Text):
        if id(artist) in undrawn or not artist.get_visible() or not artist.get_text().strip():
            continue
        boxes.append((artist.get_text(), artist.get_window_extent(renderer)))
    return boxes


def _overlapping(boxes: list[tuple[str, Bbox]]) -> list[tuple[str, str]]:
    pairs = []
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1 :]:
            width = min(a.x1, b.x1) - max(a.x0, b.x0)
            height = min(a.y1, b.y1) - max(a.y0, b.y0)
            if width > TOLERANCE_PX and height > TOLERANCE_PX:
                pairs.append((text_a, text_b))
    return pairs


def _outside(fig: Figure, boxes: list[tuple[str, Bbox]]) -> list[str]:
    frame = fig.bbox
    return [
        text
        for text, box in boxes
        if box.x0 < frame.x0 - TOLERANCE_PX
        or box.y0 < frame.y0 - TOLERANCE_PX
        or box.x1 > frame.x1 + TOLERANCE_PX
        or box.y1 > frame.y1 + TOLERANCE_PX
    ]


def assert_readable(fig: Figure) -> None:
    boxes = text_boxes(fig)
    assert boxes, "the figure has no text at all"
    assert not _overlapping(boxes), f"texts overlap: {_overlapping(boxes)}"
    assert not _outside(fig, boxes), f"texts outside the figure: {_outside(fig, boxes)}"


def _capture(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Figure]:
    """Patch ``module._save`` to keep each figure it writes (still writing the PNG)."""
    saved: list[Figure] = []
    real = plots_module._save

    def keep(fig: Figure, path: Path) -> Path:
        saved.append(fig)
        return real(fig, path)

    monkeypatch.setattr(module, "_save", keep)
    return saved


# --------------------------------------------------------------------------- pareto.png


def _row(variant: str, status: str, metric: float, latency_ms: float, megabytes: float) -> dict[str, Any]:
    return {
        "variant": variant,
        "status": status,
        "metric": "test_accuracy",
        "metric_value": metric,
        "latency_ms": {"1": {"median": latency_ms, "p95": latency_ms * 1.1}, "64": {"median": latency_ms * 8}},
        "bytes_on_disk": int(megabytes * 1e6),
    }


def _crowded_rows() -> list[dict[str, Any]]:
    """A source run, variants bunched together (some at the very same spot), rejected ones far out."""
    return [
        _row("baseline", "source", 0.972, 1.00, 2.00),
        _row("baseline-onnx", "accepted", 0.972, 1.00, 2.00),  # an export: the source's own spot
        _row("dynamic-int8-quantization", "accepted", 0.970, 0.98, 0.55),
        _row("dynamic-int8-quantization-onnx", "accepted", 0.970, 0.97, 0.55),
        _row("magnitude-prune-50", "accepted", 0.969, 1.01, 1.98),
        _row("magnitude-prune-50-then-int8", "accepted", 0.968, 0.99, 0.54),
        _row("structured-prune-30", "accepted", 0.966, 0.80, 1.40),
        _row("distilled-small-student", "accepted", 0.961, 0.60, 0.50),
        _row("magnitude-prune-95", "rejected", 0.350, 1.00, 1.95),  # far below: would stretch the y axis
        _row("structured-prune-90-slow", "rejected", 0.500, 40.0, 0.21),  # far right and far left
    ]


def test_pareto_labels_do_not_overlap_and_stay_inside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saved = _capture(monkeypatch, pareto_module)
    write_pareto_plot(_crowded_rows(), tmp_path / "pareto.png")
    assert len(saved) == 1 and (tmp_path / "pareto.png").stat().st_size > 10_000
    assert_readable(saved[0])
    shown = " ".join(text for text, _ in text_boxes(saved[0]))
    for row in _crowded_rows():  # every variant is named somewhere (next to its point or in a legend)
        assert row["variant"] in shown


def test_pareto_axes_are_scaled_to_the_accepted_variants(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saved = _capture(monkeypatch, pareto_module)
    rows = _crowded_rows()
    write_pareto_plot(rows, tmp_path / "pareto.png")
    fig = saved[0]
    kept = [r for r in rows if r["status"] != "rejected"]
    low, high = min(r["metric_value"] for r in kept), max(r["metric_value"] for r in kept)
    latency, size = fig.axes[0], fig.axes[1]
    for ax in (latency, size):
        y0, y1 = ax.get_ylim()
        assert y0 <= low and y1 >= high
        assert y1 - y0 < 5 * (high - low), f"y axis {y0:.3f}..{y1:.3f} stretched by a rejected variant"
    assert latency.get_xlim()[1] < 5.0, f"latency axis {latency.get_xlim()} stretched by a rejected variant"
    assert size.get_xlim()[0] > 0.3 * 0.50, f"size axis {size.get_xlim()} stretched by a rejected variant"


def test_a_pareto_of_one_variant_is_readable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saved = _capture(monkeypatch, pareto_module)
    rows = [_row("baseline", "source", 0.90, 2.0, 1.0), _row("dynamic-int8", "rejected", 0.80, 1.5, 0.3)]
    write_pareto_plot(rows, tmp_path / "pareto.png")
    assert_readable(saved[0])


# --------------------------------------------------------------------------- trials.png


def _trial_rows() -> list[dict[str, Any]]:
    values = [0.91, 0.93, None, 0.89, 0.95, 0.94, None, 0.96]
    outcomes = ["completed", "completed", "error", "pruned", "completed", "pruned", "killed", "completed"]
    return [{"trial": i, "outcome": o, "value": v} for i, (o, v) in enumerate(zip(outcomes, values, strict=True))]


@pytest.mark.parametrize(
    "study_name",
    [
        "digits",
        "minilm-topics-learning-rate-weight-decay-and-warmup-search-on-the-shared-postgres-study-2026-12-04",
    ],
)
def test_trials_plot_title_fits(study_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saved = _capture(monkeypatch, plots_module)
    plan = SimpleNamespace(study_name=study_name, monitor="val_accuracy")
    plot_trials(_trial_rows(), plan, "maximize", tmp_path / "trials.png")  # type: ignore[arg-type]
    assert len(saved) == 1 and (tmp_path / "trials.png").exists()
    fig = saved[0]
    assert_readable(fig)
    assert study_name in fig.axes[0].get_title().replace("\n", "")  # wrapped, not cut


# --------------------------------------------------------------------------- a run's plots, comparisons, lr-find


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two short digits runs (10 classes: the confusion matrix has its full set of tick labels)."""
    from gradwise.cli import main

    tmp = tmp_path_factory.mktemp("runs")
    quick = ["stop.epochs=3", "log.progress=false", "log.plots=false", f"out_dir={tmp}"]
    assert main(["train", "digits-mlp", *quick, "name=adam-with-a-rather-long-strategy-name"]) == 0
    assert main(["train", "digits-mlp", *quick, "optim.name=sgd", "optim.lr=0.1", "name=sgd"]) == 0
    return tmp / "adam-with-a-rather-long-strategy-name", tmp / "sgd"


def test_a_runs_plots_are_readable(two_runs, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _capture(monkeypatch, plots_module)
    written = plots_module.write_run_plots(two_runs[0])
    assert {p.name for p in written} >= {"loss.png", "lr.png", "confusion.png"}
    assert len(saved) == len(written)
    for fig in saved:
        assert_readable(fig)


def test_comparison_and_seed_curves_are_readable(two_runs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gradwise.report.curves import write_compare_plot

    saved = _capture(monkeypatch, plots_module)
    import gradwise.report.curves as curves_module

    monkeypatch.setattr(curves_module, "_save", plots_module._save)  # curves imported _save by name
    adam, sgd = two_runs
    plots_module.write_comparison_plot({adam.name: adam, "sgd": sgd}, tmp_path / "comparison.png", "val_accuracy")
    write_compare_plot({adam.name: [adam], "sgd": [sgd]}, tmp_path / "compare.png", "val_accuracy",
                       target="val_accuracy>=0.9")  # fmt: skip
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "compare.png").exists()
    assert len(saved) == 2
    for fig in saved:
        assert_readable(fig)


def test_the_lr_finder_plot_is_readable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import numpy as np

    from gradwise.experiments.lr_find import smooth_losses, steepest_descent, write_lr_plot

    saved = _capture(monkeypatch, plots_module)
    lrs = list(np.geomspace(1e-6, 10, 100))
    losses = [2.3 - 1.5 / (1 + np.exp(-(np.log10(lr) + 3))) + (0.0 if lr < 1 else 5 * lr) for lr in lrs]
    smoothed = smooth_losses(losses)
    title = "LR range test of minilm-topics-lora-with-a-long-recipe-name: 100 steps from 1e-06 to 10"
    write_lr_plot(lrs, losses, smoothed, steepest_descent(lrs, smoothed), tmp_path / "lr_find.png", title=title)
    assert len(saved) == 1
    assert_readable(saved[0])
