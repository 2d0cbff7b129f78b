"""Language-modeling loss, token count and meter against torch.nn.functional.cross_entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradwise.config import TaskConfig
from gradwise.data import DataInfo
from gradwise.errors import ConfigError
from gradwise.tasks.language_modeling import (
    IGNORE_INDEX,
    LanguageModelingMeter,
    LanguageModelingTask,
    build_language_modeling_task,
)

V = 11
UNEVEN = [1, 6, 2, 9]  # 18 sequences in batches of very different sizes


def corpus_info(vocab_size: int | None = V, kind: str = "language_modeling") -> DataInfo:
    return DataInfo(
        kind=kind,
        n_features=5,
        image_shape=None,
        n_outputs=vocab_size or 3,
        class_names=None,
        feature_names=["tokens"],
        target_name="next token",
        source="test",
        name="toy",
        vocab_size=vocab_size,
        pad_token_id=0,
    )


def problem(seed: int = 0, batch: int = 18, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (batch, length), generator=gen)
    # Logits that favour the right token somewhat, so accuracy is far from both 0 and 1.
    outputs = torch.randn(batch, length, V, generator=gen, dtype=torch.float64) + 1.2 * F.one_hot(targets, V)
    return outputs, targets


def reference(outputs: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    return F.cross_entropy(outputs.reshape(-1, V), targets.reshape(-1), **kwargs)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_and_loss_sum_are_token_cross_entropy(smoothing: float):
    task = LanguageModelingTask(V, label_smoothing=smoothing)
    outputs, targets = problem()
    expected = reference(outputs, targets, label_smoothing=smoothing)
    assert torch.allclose(task.loss(outputs, targets), expected, rtol=1e-12)
    total = task.loss_sum(outputs, targets)
    assert torch.allclose(total, expected * targets.numel(), rtol=1e-12)
    assert task.count(targets) == 90 and isinstance(task.count(targets), int)
    assert torch.allclose(total / task.count(targets), task.loss(outputs, targets), rtol=1e-12)


def test_ignored_targets_leave_loss_count_and_meter():
    task = LanguageModelingTask(V)
    outputs, targets = problem()
    masked = targets.clone()
    masked[:, -2:] = IGNORE_INDEX
    assert task.count(masked) == 18 * 3
    kept_out, kept_tgt = outputs[:, :3], targets[:, :3]
    assert torch.allclose(task.loss_sum(outputs, masked), reference(kept_out, kept_tgt, reduction="sum"))
    assert torch.allclose(task.loss(outputs, masked), reference(kept_out, kept_tgt))
    meter = task.new_meter()
    meter.update(outputs, masked)
    assert meter.stats()[0] == 54
    assert meter.compute()["loss"] == pytest.approx(float(reference(kept_out, kept_tgt)), rel=1e-12)


def test_meter_over_uneven_batches_matches_the_whole_and_ignores_smoothing():
    task = LanguageModelingTask(V, label_smoothing=0.3)
    outputs, targets = problem(seed=1)
    meter = task.new_meter()
    start = 0
    for size in UNEVEN:
        meter.update(outputs[start : start + size], targets[start : start + size])
        start += size
    metrics = meter.compute()
    plain = float(reference(outputs, targets))  # the meter's loss is never smoothed
    assert metrics["loss"] == pytest.approx(plain, rel=1e-12)
    assert metrics["perplexity"] == pytest.approx(math.exp(plain), rel=1e-12)
    accuracy = float((outputs.argmax(-1) == targets).double().mean())
    assert metrics["accuracy"] == pytest.approx(accuracy, rel=1e-12) and 0.1 < accuracy < 0.9
    assert meter.confusion() is None


def test_meter_by_hand():
    # Two tokens: uniform logits over 4 (loss ln 4, argmax 0) with target 0 (correct) and target 3 (wrong).
    meter = LanguageModelingMeter()
    meter.update(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
    assert meter.stats().tolist() == pytest.approx([2.0, 2 * math.log(4), 1.0])
    assert meter.compute() == pytest.approx({"loss": math.log(4), "perplexity": 4.0, "accuracy": 0.5})


def test_meter_state_round_trips_and_sums_like_ranks():
    outputs, targets = problem(seed=2)
    a, b, whole = LanguageModelingMeter(), LanguageModelingMeter(), LanguageModelingMeter()
    a.update(outputs[:7], targets[:7])
    b.update(outputs[7:], targets[7:])
    whole.update(outputs, targets)
    combined = LanguageModelingMeter()
    combined.load_stats(a.stats() + b.stats())
    assert combined.compute() == pytest.approx(whole.compute(), rel=1e-12)
    with pytest.raises(ValueError, match="expected 3 statistics"):
        combined.load_stats(torch.zeros(4))


def test_empty_meter_is_nan_and_bf16_logits_are_scored_in_fp32():
    assert all(math.isnan(v) for v in LanguageModelingMeter().compute().values())
    outputs, targets = problem(seed=3)
    meter = LanguageModelingMeter()
    meter.update(outputs.to(torch.bfloat16), targets)
    expected = float(reference(outputs.to(torch.bfloat16).double(), targets))
    assert meter.compute()["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_diverged_loss_reports_infinite_perplexity():
    meter = LanguageModelingMeter()
    meter.load_stats(torch.tensor([1.0, 1000.0, 0.0], dtype=torch.float64))
    assert meter.compute()["perplexity"] == math.inf


def test_build_checks_the_data_and_the_loss():
    task = build_language_modeling_task(TaskConfig(kind="language_modeling", label_smoothing=0.1), corpus_info())
    assert (task.kind, task.loss_name, task.default_monitor) == ("language_modeling", "cross_entropy", "val_loss")
    assert task.vocab_size == V and task.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="needs a token corpus; 'toy' is a classification dataset"):
        build_language_modeling_task(TaskConfig(), corpus_info(None, kind="classification"))
    with pytest.raises(ConfigError, match=r"task\.loss 'mse' does not apply"):
        build_language_modeling_task(TaskConfig.model_construct(kind="language_modeling", loss="mse"), corpus_info())
