"""Evaluating a model on one split with the task's metric meter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradwise.data import Split
from gradwise.data.batches import take
from gradwise.tasks import Task
from gradwise.train.device import autocast, to_device
from gradwise.train.distributed import Distributed


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one split, keyed ``<split>_<metric>``, and the confusion matrix if any."""

    metrics: dict[str, float]
    confusion: list[list[int]] | None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    split: Split,
    name: str,
    batch_size: int,
    device: torch.device,
    precision: str,
    *,
    ctx: Distributed | None = None,
) -> Evaluation:
    """Run ``model`` in eval mode over ``split`` and summarise it; the train/eval mode is restored after.

    Under torch.distributed (``ctx``) each rank evaluates its stride of the split and the meters'
    sufficient statistics are summed over ranks, so every rank gets the metrics of the whole split.
    Every rank runs the same number of forward passes (a sharded model's forwards are collectives).
    """
    was_training = model.training
    model.eval()
    meter = task.new_meter()
    dtype = next(model.parameters()).dtype
    everything = torch.arange(len(split.y))
    mine = ctx.shard(everything) if ctx is not None else everything
    # A fully sharded model all-gathers its weights inside every forward, so every rank must run as many
    # forwards as the rank with the most rows (rank 0); a rank that has run out repeats a row, unmetered.
    longest = len(everything[:: ctx.world]) if ctx is not None and ctx.active else len(mine)
    for start in range(0, longest, batch_size):
        rows = mine[start : start + batch_size]
        padding = len(rows) == 0
        if padding:
            rows = everything[:1]
        x, y = to_device(take(split, rows), device, dtype)
        with autocast(device, precision):
            outputs = model(x)
        if not padding:
            meter.update(outputs.to(dtype), y)
    if ctx is not None and ctx.active:
        meter.load_stats(ctx.sum(meter.stats()))
    model.train(was_training)
    metrics = {f"{name}_{key}": float(value) for key, value in meter.compute().items()}
    return Evaluation(metrics=metrics, confusion=meter.confusion())
