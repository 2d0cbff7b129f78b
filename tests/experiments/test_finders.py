"""LR range test and batch-size search: the pure pieces against hand computations, then end to end."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from gradwise.config import BatchConfig, load_config
from gradwise.errors import ConfigError
from gradwise.experiments.batch_find import BatchProbe, batch_find, search_batch, suggest_plan
from gradwise.experiments.lr_find import _DivergenceWatch, lr_find, smooth_losses, steepest_descent
from gradwise.experiments.recipes import find_recipe
from gradwise.train.batching import BatchPlan
from gradwise.train.loop import fit

# --------------------------------------------------------------------------- LR finder: pure pieces


def test_smoothing_matches_hand_computation() -> None:
    # beta 0.5: a = 0.5, 1.25, 2.125; corrections 1 - 0.5^k = 0.5, 0.75, 0.875.
    assert smooth_losses([1.0, 2.0, 3.0], beta=0.5) == pytest.approx([1.0, 5 / 3, 2.125 / 0.875])
    # The bias correction makes a constant curve stay constant from the first step.
    assert smooth_losses([2.0] * 5) == pytest.approx([2.0] * 5)


def test_steepest_descent_on_a_synthetic_curve() -> None:
    lrs = np.logspace(-6, 0, 61)  # 10 points per decade; index 30 is lr 1e-3
    x = np.log10(lrs)
    loss = 1.5 - np.tanh(2 * (x + 3)) + 10 * np.maximum(x + 1.5, 0) ** 2
    loss[55:] = [9.0, 3.0, 20.0, 2.5, 30.0, 40.0]  # a steeper drop after the minimum must be ignored
    index = steepest_descent(list(lrs), list(loss))
    assert index == 30
    assert lrs[index] == pytest.approx(1e-3)


def test_steepest_descent_refuses_a_curve_that_never_falls() -> None:
    with pytest.raises(ConfigError, match="did not fall"):
        steepest_descent([1e-3, 1e-2, 1e-1, 1.0], [1.0, 1.1, 1.5, 3.0])


def test_divergence_stops_past_four_times_the_minimum() -> None:
    watch = _DivergenceWatch(beta=0.0)  # no smoothing: the rule on raw losses
    assert [watch(i + 1, loss) for i, loss in enumerate([1.0, 0.5, 1.9, 2.0])] == [None] * 4
    reason = watch(5, 2.01)
    assert reason is not None and "diverged at step 5" in reason


def test_bad_lr_find_arguments_are_one_line_errors(tmp_path: Path) -> None:
    recipe = find_recipe("digits-mlp")
    with pytest.raises(ConfigError, match="min_lr: must be > 0"):
        lr_find(recipe, min_lr=0.0)
    with pytest.raises(ConfigError, match="max_lr: must be above"):
        lr_find(recipe, min_lr=1e-3, max_lr=1e-4)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        lr_find(recipe, out=tmp_path)


# --------------------------------------------------------------------------- LR finder: the quality bar


@pytest.mark.slow
def test_lr_find_suggestion_trains_digits_mlp_to_95_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the recipe's out_dir (runs/) must stay untouched by the range test
    recipe = find_recipe("digits-mlp")
    min_lr, max_lr, steps = 1e-7, 10.0, 100
    result = lr_find(recipe, ["log.progress=false"], min_lr=min_lr, max_lr=max_lr, steps=steps, out=tmp_path / "lrf")

    assert not (tmp_path / "runs").exists()
    # The LR of step t is min_lr * gamma^t with gamma = (max/min)^(1/steps), as logged by the loop.
    gamma = (max_lr / min_lr) ** (1 / steps)
    assert result.lrs == pytest.approx([min_lr * gamma**t for t in range(len(result.lrs))], rel=1e-9)
    assert result.smoothed == pytest.approx(smooth_losses(list(result.losses)))
    assert "diverged" in result.stop_reason and len(result.lrs) < steps  # the divergence hook ended it
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.suggestion == result.lrs[steepest_descent(list(result.lrs), list(result.smoothed))]
    assert 1e-4 < result.suggestion < 0.1

    cfg = load_config(recipe, [f"optim.lr={result.suggestion}", "log.progress=false", "log.plots=false"])
    summary = fit(cfg, tmp_path / "train")
    assert summary["final"]["test_accuracy"] >= 0.95


# --------------------------------------------------------------------------- batch finder: pure pieces


def _fake_probe(capacity: int, n_train: int = 10**9, calls: list[int] | None = None) -> Callable[[int], BatchProbe]:
    def probe(batch: int) -> BatchProbe:
        if calls is not None:
            calls.append(batch)
        if batch > capacity:
            return BatchProbe(batch, error="out of memory")
        took = min(batch, n_train)
        return BatchProbe(took, examples_per_s=1.0, whole_set=took < batch)

    return probe


@pytest.mark.parametrize(
    ("capacity", "n_train", "max_batch", "expected"),
    [
        # doubling to the first failure (128), then bisecting 64..128 until the gap is <= 64/16
        (100, 10**9, 65536, [8, 16, 32, 64, 128, 96, 112, 104, 100]),
        # even the first batch fails: bisect between 0 and 8 down to the exact size
        (3, 10**9, 65536, [8, 4, 2, 3]),
        # the training set (300) is smaller than 512: that probe takes all 300 and the search ends
        (10**9, 300, 65536, [8, 16, 32, 64, 128, 256, 512]),
        # max_batch caps the doubling and is itself tried
        (10**9, 10**9, 100, [8, 16, 32, 64, 100]),
        (0, 10**9, 65536, [8, 4, 2, 1]),
    ],
)
def test_search_doubles_then_bisects(capacity: int, n_train: int, max_batch: int, expected: list[int]) -> None:
    calls: list[int] = []
    probes = search_batch(_fake_probe(capacity, n_train, calls), start=8, max_batch=max_batch)
    assert calls == expected
    fitting = [p.batch for p in probes if p.fits]
    failing = [p.batch for p in probes if not p.fits]
    if fitting:
        assert max(fitting) == min(capacity, n_train, max_batch)
        assert all(f > max(fitting) for f in failing)
    else:
        assert capacity == 0


@pytest.mark.parametrize(
    ("global_batch", "largest", "plan"),
    [(256, 100, (256, 3)), (32, 512, (32, 1)), (100, 100, (100, 1)), (1000, 7, (1000, 143)), (2048, 512, (2048, 4))],
)
def test_suggestion_keeps_the_global_batch(global_batch: int, largest: int, plan: tuple[int, int]) -> None:
    assert suggest_plan(global_batch, largest) == plan
    size, accumulate = plan
    # The loop's own split of such a step never makes a micro-batch above the largest that fits.
    micro = BatchPlan(BatchConfig(size=size, accumulate=accumulate), n_train=10**6).micro_batches(torch.arange(size))
    assert max(len(m) for m in micro) <= largest
    assert sum(len(m) for m in micro) == global_batch


# --------------------------------------------------------------------------- batch finder: real out-of-memory


@pytest.mark.slow
def test_batch_find_stops_below_a_real_out_of_memory(tmp_path: Path) -> None:
    # A wide MLP: ~100 KB of activations and gradients per example, so a 120 MB budget ends near a few hundred.
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(
        "data: {name: linear, n_samples: 20000}\n"
        "model: {name: mlp, hidden: [2048, 2048]}\n"
        "optim: {name: sgd, lr: 0.01}\n"
        "batch: {size: 4096}\n"
        "stop: {epochs: 1}\n"
    )
    result = batch_find(recipe, start=128, steps=2, memory_limit_mb=120)

    failed = [p.batch for p in result.probes if not p.fits]
    assert failed, "the memory limit never bit"
    assert all(p.error == "out of memory" for p in result.probes if not p.fits)
    assert result.largest is not None and result.largest < min(failed)
    assert all(p.examples_per_s and p.examples_per_s > 0 for p in result.probes if p.fits)
    assert (result.suggested_batch, result.suggested_accumulate) == (4096, math.ceil(4096 / result.largest))
    shown = str(result)
    assert "out of memory" in shown and "Traceback" not in shown
    assert f"batch.accumulate={result.suggested_accumulate}" in shown


# --------------------------------------------------------------------------- LR finder: where the plot goes


def test_lr_find_writes_its_plot_in_a_run_directory_under_out_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradwise.cli import main

    monkeypatch.chdir(tmp_path)  # the recipe's out_dir is runs/, relative to here
    argv = ["lr-find", "digits-mlp", "log.progress=false", "--min-lr", "1e-5", "--max-lr", "1", "--steps", "30"]
    assert main(argv) == 0
    printed = dict(
        line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if line[:5] in ("plot:", "run: ")
    )
    run_dir, plot = Path(printed["run"]), Path(printed["plot"])
    # Not a temporary directory: a run directory of its own in the recipe's out_dir, the plot and result inside.
    assert run_dir.resolve().parent == (tmp_path / "runs").resolve()
    assert run_dir.name.startswith("digits-mlp-lr-find-")
    assert plot == run_dir / "lr_find.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "lr_find.json").exists() and (run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):  # and --help says so, with the file's real name
        main(["lr-find", "--help"])
    assert "lr_find.png" in capsys.readouterr().out
