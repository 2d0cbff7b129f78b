"""Tests for gradwise.report.plots: PNGs from a synthetic run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from gradwise.errors import CheckpointError
from gradwise.report.plots import (
    _comparison_figure,
    _confusion_figure,
    _ema,
    _loss_figure,
    _lr_figure,
    _spans_decades,
    write_comparison_plot,
    write_run_plots,
)
from gradwise.store.rundir import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 200


def _train_lines(steps: int, seed: int, start: float = 2.3, floor: float = 0.05, ramp: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    lines = []
    for step in range(1, steps + 1):
        loss = (start - floor) * math.exp(-step / 40) + floor
        lines.append(
            {
                "kind": "train",
                "step": step,
                "epoch": step / 50,
                "examples": step * 32,
                "loss": float(loss * (1 + 0.15 * rng.standard_normal())),
                "lr": 0.5 * 3e-3 * (1 + math.cos(math.pi * step / steps)),
                "batch_size": 32 if not ramp or step <= steps // 2 else 64,
                "grad_norm": 1.0,
                "time": step * 0.01,
            }
        )
    return lines


def _eval_lines(steps: int, task: str, rate: float = 50.0) -> list[dict]:
    lines = []
    for step in range(20, steps + 1, 20):
        line: dict = {"kind": "eval", "step": step, "epoch": step / 50, "split": "val"}
        line["val_loss"] = 2.3 * math.exp(-step / rate) + 0.1
        if task == "classification":
            line |= {"val_accuracy": 1 - 0.6 * math.exp(-step / rate), "val_macro_f1": 1 - 0.7 * math.exp(-step / rate)}
        else:
            line |= {"val_mse": line["val_loss"], "val_mae": line["val_loss"] ** 0.5, "val_r2": 1 - line["val_loss"]}
        lines.append(line)
    return lines


def _make_run(
    root: Path, name: str, task: str = "classification", seed: int = 0, rate: float = 50.0, **train_kw
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = _train_lines(STEPS, seed, **train_kw) + _eval_lines(STEPS, task, rate)
    lines.sort(key=lambda line: (line["step"], line["kind"] == "eval"))
    text = "".join(json.dumps(line) + "\n" for line in lines)
    text += '{"kind": "train", "step": 201, "loss": 0.0'  # killed mid-write
    (run / "metrics.jsonl").write_text(text)
    summary: dict = {"name": f"{name}-run", "task": task, "stop_reason": "max_steps", "steps": STEPS}
    if task == "classification":
        summary |= {
            "monitor": "val_accuracy",
            "best": {"step": 180, "value": 1 - 0.6 * math.exp(-180 / 50)},
            "confusion_matrix": {"labels": ["cat", "dog", "bird"], "matrix": [[50, 3, 2], [4, 40, 6], [1, 2, 47]]},
        }
    else:
        summary |= {"monitor": "val_mse", "best": {"step": 200, "value": 2.3 * math.exp(-4) + 0.1}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _check_png(path: Path, min_px: int = 300, max_px: int = 2500) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    height, width = image.shape[:2]
    assert min_px <= width <= max_px and min_px <= height <= max_px, (path.name, image.shape)
    assert float(image[..., :3].std()) > 0.05, f"{path.name} looks blank"


def test_read_metrics_skips_truncated_line_and_keeps_last_of_a_resumed_step(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "a")
    train, evals = read_metrics(run)
    assert [line["step"] for line in train] == list(range(1, STEPS + 1))
    assert [line["step"] for line in evals] == list(range(20, STEPS + 1, 20))
    # a resume re-logs step 5 with a new loss; the later line wins and order stays by step
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write("\n" + json.dumps({"kind": "train", "step": 5, "loss": 9.0, "lr": 0.1}) + "\nnot json\n[1]\n")
    train, _ = read_metrics(run)
    assert len(train) == STEPS and train[4]["loss"] == 9.0


def test_read_metrics_missing_dir_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope: run directory not found"):
        read_metrics(tmp_path / "nope")


def test_classification_run_writes_four_readable_pngs(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "clf")
    written = write_run_plots(run)
    names = ["loss.png", "metrics.png", "lr.png", "confusion.png"]
    assert written == [run / "plots" / n for n in names]
    for path in written:
        _check_png(path)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(names)  # no temp files left behind
    assert imread(run / "plots" / "loss.png").shape[:2] == (506, 880)  # 4.6 x 8 inches at dpi 110


def test_regression_run_has_no_confusion_plot(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "reg", task="regression")
    written = write_run_plots(run)
    assert [p.name for p in written] == ["loss.png", "metrics.png", "lr.png"]
    for path in written:
        _check_png(path)
    assert not (run / "plots" / "confusion.png").exists()


def test_empty_metrics_does_not_crash(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert write_run_plots(run) == []
    # a summary alone still gives what it can: the confusion matrix
    cm = {"labels": ["a", "b"], "matrix": [[3, 1], [0, 4]]}
    (run / "summary.json").write_text(json.dumps({"task": "classification", "confusion_matrix": cm}))
    assert [p.name for p in write_run_plots(run)] == ["confusion.png"]


def test_missing_or_malformed_summary_keys_skip_plots(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "odd")
    bad = {"name": 3, "best": "x", "monitor": None, "confusion_matrix": {"labels": ["a"], "matrix": [[1, 2]]}}
    (run / "summary.json").write_text(json.dumps(bad))
    assert [p.name for p in write_run_plots(run)] == ["loss.png", "metrics.png", "lr.png"]
    (run / "summary.json").write_text("{trunc")
    assert len(write_run_plots(run)) == 3


def test_comparison_of_three_runs(tmp_path: Path) -> None:
    runs = {opt: _make_run(tmp_path, opt, seed=i, rate=30.0 + 40 * i) for i, opt in enumerate(["sgd", "adamw", "lion"])}
    out = write_comparison_plot(runs, tmp_path / "cmp" / "optimizers.png", "val_accuracy")
    assert out == tmp_path / "cmp" / "optimizers.png"
    _check_png(out)
    with pytest.raises(ValueError):
        write_comparison_plot({}, tmp_path / "x.png", "val_accuracy")
    with pytest.raises(CheckpointError):
        write_comparison_plot({"gone": tmp_path / "gone"}, tmp_path / "x.png", "val_accuracy")


def test_comparison_legend_has_each_runs_best_value(tmp_path: Path) -> None:
    sgd, adamw = _make_run(tmp_path, "sgd", rate=30.0), _make_run(tmp_path, "adamw", task="regression", rate=70.0)
    (tmp_path / "killed").mkdir()
    data = {"sgd": read_metrics(sgd), "adamw": read_metrics(adamw), "killed": read_metrics(tmp_path / "killed")}
    ax_loss, ax_metric = _comparison_figure(data, "val_loss", "loss (cross-entropy)").axes
    labels = [t.get_text() for t in ax_metric.get_legend().get_texts()]
    # val_loss is minimised; both synthetic curves fall, so the best is the last eval (step 200)
    best_sgd, best_adamw = 2.3 * math.exp(-200 / 30) + 0.1, 2.3 * math.exp(-200 / 70) + 0.1
    assert labels == [
        f"sgd (best {best_sgd:.4g} @ step 200)",
        f"adamw (best {best_adamw:.4g} @ step 200)",
        "killed (no val_loss)",
    ]
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["sgd", "adamw", "killed"]
    assert ax_metric.get_title() == "val_loss (min is best)"
    accuracy = _comparison_figure({"sgd": read_metrics(sgd)}, "val_accuracy", "loss").axes[1]
    assert (
        accuracy.get_legend().get_texts()[0].get_text() == f"sgd (best {1 - 0.6 * math.exp(-200 / 30):.4g} @ step 200)"
    )


def test_confusion_counts_annotated_up_to_15_classes() -> None:
    def summary(n: int) -> dict:
        matrix = (np.eye(n, dtype=int) * 9 + 1).tolist()
        return {"task": "classification", "confusion_matrix": {"labels": list(range(n)), "matrix": matrix}}

    ax = _confusion_figure("r", summary(3)).axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["1"] * 6 + ["10"] * 3
    np.testing.assert_allclose(ax.images[0].get_array()[0], [10 / 12, 1 / 12, 1 / 12])  # row-normalized
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert not _confusion_figure("r", summary(16)).axes[0].texts
    assert _confusion_figure("r", summary(3) | {"task": "regression"}) is None


def test_loss_figure_content() -> None:
    train = _train_lines(STEPS, 0, start=50.0, floor=0.01)  # spans > 2 decades
    evals = _eval_lines(STEPS, "classification")
    summary = {"monitor": "val_loss", "best": {"step": 200, "value": 0.13}}
    fig = _loss_figure("myrun", train, evals, summary, "loss (cross-entropy)")
    ax = fig.axes[0]
    assert "myrun" in ax.get_title()
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss (cross-entropy)"
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["train (raw)", "train (EMA, β=0.75)"] and "val" in labels
    assert any(label.startswith("best val_loss 0.13 @ step 200") for label in labels)
    narrow = _loss_figure("myrun", _train_lines(STEPS, 0), [], {}, "loss")
    assert narrow.axes[0].get_yscale() == "linear"


def test_lr_figure_twin_axis_only_when_batch_size_varies() -> None:
    assert len(_lr_figure("r", _train_lines(50, 0)).axes) == 1
    fig = _lr_figure("r", _train_lines(50, 0, ramp=True))
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "batch size (examples per step)"
    lr = fig.axes[0].lines[0].get_ydata()
    assert lr[0] == pytest.approx(0.5 * 3e-3 * (1 + math.cos(math.pi / 50)))


def test_ema_is_bias_corrected_and_skips_nan() -> None:
    # hand-computed with beta 0.5: 1; (0.25+1)/0.75; (0.625+1.5)/0.875
    got = _ema(np.array([1.0, 2.0, 3.0]), 0.5)
    np.testing.assert_allclose(got, [1.0, 1.25 / 0.75, 2.125 / 0.875])
    got = _ema(np.array([np.nan, 2.0, np.nan, 4.0]), 0.5)
    np.testing.assert_allclose(got, [np.nan, 2.0, 2.0, (0.5 + 2.0) / 0.75])


def test_spans_decades() -> None:
    assert _spans_decades(np.array([10.0, 0.05]))
    assert not _spans_decades(np.array([10.0, 0.2]))
    assert not _spans_decades(np.array([10.0, 0.0, 1e-5]))  # zero has no log
    assert _spans_decades(np.array([np.nan, 1.0]), np.array([1e-3]))


def test_lr_figure_ignores_the_short_last_batch_of_each_epoch() -> None:
    lines = [
        {"kind": "train", "step": s, "epoch": s / 5, "lr": 1e-3, "batch_size": 7 if s % 5 == 0 else 32}
        for s in range(1, 31)
    ]
    assert len(_lr_figure("r", lines).axes) == 1
