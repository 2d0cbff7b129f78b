"""Regression losses and meter against torch.nn.functional and sklearn.metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from gradwise.config import TaskConfig
from gradwise.data import DataInfo
from gradwise.errors import ConfigError
from gradwise.tasks import RegressionTask, build_task

UNEVEN = [3, 64, 1, 90, 42]


def info(kind: str = "regression") -> DataInfo:
    return DataInfo(
        kind=kind,
        n_features=2,
        image_shape=None,
        n_outputs=1 if kind == "regression" else 3,
        class_names=None if kind == "regression" else ["a", "b", "c"],
        feature_names=["a", "b"],
        target_name="y",
        source="test",
        name="toy",
    )


def random_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    targets = 5.0 + 3.0 * torch.randn(sum(UNEVEN), 1, generator=gen)
    outputs = targets + 2.0 * torch.randn(sum(UNEVEN), 1, generator=gen)
    return outputs, targets


def run_meter(task: RegressionTask, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    meter = task.new_meter()
    start = 0
    for size in UNEVEN:
        meter.update(outputs[start : start + size], targets[start : start + size])
        start += size
    return meter.compute()


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("mse", lambda o, t: F.mse_loss(o, t)),
        ("mae", lambda o, t: F.l1_loss(o, t)),
        ("huber", lambda o, t: F.huber_loss(o, t, delta=1.5)),
    ],
)
def test_meter_matches_sklearn_over_uneven_batches(name, reference):
    outputs, targets = random_problem()
    metrics = run_meter(RegressionTask(name, huber_delta=1.5), outputs, targets)
    y, p = targets.numpy().ravel(), outputs.numpy().ravel()
    assert metrics["mse"] == pytest.approx(mean_squared_error(y, p), rel=1e-6)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-6)
    assert metrics["r2"] == pytest.approx(r2_score(y, p), rel=1e-6)
    assert 0.2 < metrics["r2"] < 0.9
    assert metrics["loss"] == pytest.approx(reference(outputs.double(), targets.double()).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["mse", "mae", "huber"])
def test_loss_and_loss_sum_match_torch_functional(name: str):
    outputs, targets = random_problem(1)
    outputs.requires_grad_(True)
    task = RegressionTask(name, huber_delta=0.7)
    reference = {
        "mse": F.mse_loss(outputs, targets),
        "mae": F.l1_loss(outputs, targets),
        "huber": F.huber_loss(outputs, targets, delta=0.7),
    }[name]
    loss = task.loss(outputs, targets)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(task.loss_sum(outputs, targets) / len(targets), loss)
    loss.backward()
    assert outputs.grad is not None and outputs.grad.abs().sum() > 0


def test_flat_targets_are_reshaped_not_broadcast():
    outputs, targets = random_problem(2)
    task = RegressionTask("mse")
    torch.testing.assert_close(task.loss(outputs, targets.ravel()), F.mse_loss(outputs, targets))
    with pytest.raises(ValueError, match=r"do not match"):
        task.loss(outputs, targets[:5])


def test_r2_of_a_constant_target_follows_sklearn():
    targets = torch.full((6, 1), 2.0)
    for outputs in (targets.clone(), targets + 0.5):
        metrics = run_meter_simple(outputs, targets)
        assert metrics["r2"] == r2_score(targets.numpy().ravel(), outputs.numpy().ravel())


def run_meter_simple(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    meter = RegressionTask().new_meter()
    meter.update(outputs, targets)
    return meter.compute()


def test_summed_stats_of_two_meters_equal_one_meter_over_everything():
    outputs, targets = random_problem(3)
    task = RegressionTask("huber")
    whole, first, second, merged = (task.new_meter() for _ in range(4))
    whole.update(outputs, targets)
    first.update(outputs[:17], targets[:17])
    second.update(outputs[17:], targets[17:])
    merged.load_stats(first.stats() + second.stats())
    torch.testing.assert_close(merged.stats(), whole.stats())
    assert merged.compute() == pytest.approx(whole.compute())
    assert merged.confusion() is None
    n, _, sse, sae, sy, syy = whole.stats().tolist()
    err = (outputs - targets).double()
    assert (n, sse, sae) == pytest.approx((len(targets), (err**2).sum().item(), err.abs().sum().item()))
    assert (sy, syy) == pytest.approx((targets.double().sum().item(), (targets.double() ** 2).sum().item()))


def test_empty_meter_reports_nan():
    assert all(math.isnan(v) for v in RegressionTask().new_meter().compute().values())


def test_build_task_picks_the_loss_and_rejects_mismatches():
    task = build_task(TaskConfig(), info())
    assert (task.kind, task.loss_name, task.default_monitor) == ("regression", "mse", "val_loss")
    huber = build_task(TaskConfig(loss="huber", huber_delta=2.0), info())
    assert isinstance(huber, RegressionTask) and huber.huber_delta == 2.0
    outputs, targets = random_problem(4)
    torch.testing.assert_close(huber.loss(outputs, targets), F.huber_loss(outputs, targets, delta=2.0))
    with pytest.raises(ConfigError, match=r"task\.kind 'classification'.*regression dataset"):
        build_task(TaskConfig(kind="classification"), info())
    with pytest.raises(ConfigError, match=r"task\.loss 'cross_entropy'"):
        build_task(TaskConfig(loss="cross_entropy"), info())
    with pytest.raises(ConfigError, match=r"task\.label_smoothing"):
        build_task(TaskConfig(label_smoothing=0.1), info())
