"""Evaluating a model on one split with the task's metric meter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradwise.data import Split
from gradwise.tasks import Task
from gradwise.train.batching import gather
from gradwise.train.device import autocast, to_device


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one split, keyed ``<split>_<metric>``, and the confusion matrix if any."""

    metrics: dict[str, float]
    confusion: list[list[int]] | None


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, split: Split, name: str, batch_size: int, device: torch.device, precision: str
) -> Evaluation:
    """Run ``model`` in eval mode over ``split`` and summarise it; the train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    meter = task.new_meter()
    dtype = next(model.parameters()).dtype
    for start in range(0, len(split.y), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split.y)))
        x = to_device(gather(split.x, split.lengths, rows), device, dtype)
        y = to_device(split.y[start : start + batch_size], device, dtype)
        with autocast(device, precision):
            outputs = model(x)
        meter.update(outputs.to(dtype), y)
    model.train(was_training)
    metrics = {f"{name}_{key}": float(value) for key, value in meter.compute().items()}
    return Evaluation(metrics=metrics, confusion=meter.confusion())
