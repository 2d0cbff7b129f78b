"""Classification loss and meter against torch.nn.functional and sklearn.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from gradwise.config import TaskConfig
from gradwise.data import DataInfo
from gradwise.errors import ConfigError
from gradwise.tasks import ClassificationTask, build_task

UNEVEN = [1, 50, 7, 100, 45]  # 203 examples in batches of very different sizes


def info(kind: str = "classification", n_outputs: int = 5) -> DataInfo:
    return DataInfo(
        kind=kind,
        n_features=3,
        image_shape=None,
        n_outputs=n_outputs,
        class_names=[str(k) for k in range(n_outputs)] if kind == "classification" else None,
        feature_names=["a", "b", "c"],
        target_name="y",
        source="test",
        name="toy",
    )


def batches(outputs: torch.Tensor, targets: torch.Tensor, sizes: list[int]):
    start = 0
    for size in sizes:
        yield outputs[start : start + size], targets[start : start + size]
        start += size
    assert start == len(targets)


def random_problem(n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, n_classes, (sum(UNEVEN),), generator=gen)
    # Logits that favour the right class somewhat, so accuracy and F1 are far from both 0 and 1.
    outputs = torch.randn(len(targets), n_classes, generator=gen) + 1.5 * F.one_hot(targets, n_classes)
    return outputs, targets


def scores(task: ClassificationTask, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[dict, list]:
    meter = task.new_meter()
    for out, tgt in batches(outputs, targets, UNEVEN):
        meter.update(out, tgt)
    return meter.compute(), meter.confusion()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_meter_matches_sklearn_and_torch_over_uneven_batches(smoothing: float):
    outputs, targets = random_problem(5)
    metrics, confusion = scores(ClassificationTask(5, smoothing), outputs, targets)
    y, p = targets.numpy(), outputs.argmax(1).numpy()
    assert 0.3 < metrics["accuracy"] < 0.95
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
    assert confusion == confusion_matrix(y, p, labels=range(5)).tolist()
    # The meter reports plain cross-entropy whatever the training loss's smoothing.
    expected_loss = F.cross_entropy(outputs.double(), targets).item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_macro_f1_counts_only_classes_seen_in_targets_or_predictions():
    # Class 5 never occurs; class 4 is predicted but never true (F1 0, which sklearn averages in).
    outputs, targets = random_problem(6, seed=1)
    targets = targets.clamp(max=3)
    outputs[:, 5] = -100.0
    outputs[::9, 4] = 100.0
    metrics, confusion = scores(ClassificationTask(6), outputs, targets)
    y, p = targets.numpy(), outputs.argmax(1).numpy()
    assert set(np.unique(p)) == {0, 1, 2, 3, 4}
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
    assert np.array(confusion)[5].sum() == 0 and np.array(confusion)[:, 5].sum() == 0


def test_loss_and_loss_sum_match_torch_functional():
    outputs, targets = random_problem(4)
    outputs.requires_grad_(True)
    task = ClassificationTask(4, label_smoothing=0.2)
    loss = task.loss(outputs, targets)
    torch.testing.assert_close(loss, F.cross_entropy(outputs, targets, label_smoothing=0.2))
    torch.testing.assert_close(task.loss_sum(outputs, targets) / len(targets), loss)
    loss.backward()
    assert outputs.grad is not None and outputs.grad.abs().sum() > 0


def test_summed_stats_of_two_meters_equal_one_meter_over_everything():
    outputs, targets = random_problem(3)
    task = ClassificationTask(3)
    whole, first, second = task.new_meter(), task.new_meter(), task.new_meter()
    whole.update(outputs, targets)
    first.update(outputs[:80], targets[:80])
    second.update(outputs[80:], targets[80:])
    merged = task.new_meter()
    merged.load_stats(first.stats() + second.stats())
    assert merged.stats().dtype == torch.float64
    torch.testing.assert_close(merged.stats(), whole.stats())
    assert merged.compute() == pytest.approx(whole.compute())
    assert merged.confusion() == whole.confusion()
    with pytest.raises(ValueError, match=r"expected 11"):
        merged.load_stats(torch.zeros(5))


def test_stats_layout_is_count_loss_then_confusion():
    task = ClassificationTask(2)
    meter = task.new_meter()
    outputs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    meter.update(outputs, targets)
    stats = meter.stats()
    assert stats[0] == 3
    assert stats[1].item() == pytest.approx(F.cross_entropy(outputs, targets, reduction="sum").item())
    assert stats[2:].tolist() == [1, 1, 1, 0]  # C[0,0], C[0,1], C[1,0], C[1,1]
    # By hand: class 0 has TP 1, FP 1, FN 1 → F1 0.5; class 1 has TP 0 → F1 0.
    assert meter.compute()["macro_f1"] == pytest.approx(0.25)
    assert meter.compute()["accuracy"] == pytest.approx(1 / 3)


def test_empty_meter_reports_nan_and_bf16_outputs_are_accepted():
    meter = ClassificationTask(3).new_meter()
    assert all(math.isnan(v) for v in meter.compute().values())
    outputs, targets = random_problem(3)
    meter.update(outputs.bfloat16(), targets)
    assert meter.compute()["accuracy"] == pytest.approx(
        accuracy_score(targets.numpy(), outputs.bfloat16().float().argmax(1).numpy())
    )


def test_build_task_follows_the_data_and_rejects_mismatches():
    task = build_task(TaskConfig(label_smoothing=0.1), info())
    assert isinstance(task, ClassificationTask)
    assert (task.kind, task.loss_name, task.default_monitor) == ("classification", "cross_entropy", "val_accuracy")
    assert task.label_smoothing == 0.1 and task.n_classes == 5
    with pytest.raises(ConfigError, match=r"task\.kind 'regression'.*'toy' is a classification"):
        build_task(TaskConfig(kind="regression"), info())
    with pytest.raises(ConfigError, match=r"task\.loss 'mse'"):
        build_task(TaskConfig(loss="mse"), info())
