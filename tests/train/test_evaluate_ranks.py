"""Evaluation under torch.distributed: every rank runs as many forwards as rank 0, and meters only its own rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradwise.config import TaskConfig
from gradwise.data import DataInfo, Split
from gradwise.tasks import build_task
from gradwise.train.distributed import Distributed
from gradwise.train.evaluate import evaluate


@dataclass(frozen=True)
class Alone(Distributed):
    """One rank of a 2-process job whose collectives are not run (the sums here are this rank's own)."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class CountingModel(nn.Module):
    """Predicts the class stored in the input's first feature; counts forward calls and the rows it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return nn.functional.one_hot(x[:, 0].long(), 3).float() * 10 + self.weight


def test_a_rank_with_fewer_batches_pads_its_forwards_and_meters_only_its_rows():
    info = DataInfo(
        kind="classification",
        n_features=2,
        image_shape=None,
        n_outputs=3,
        class_names=["a", "b", "c"],
        feature_names=["a", "b"],
        target_name="y",
        source="test",
        name="toy",
    )
    # Rows 0..4; the model predicts the first feature, so a row is right when its label equals it.
    labels = torch.tensor([0, 1, 2, 1, 0])
    predicted = torch.tensor([0, 2, 2, 1, 1])
    split = Split(x=torch.stack([predicted.float(), torch.zeros(5)], dim=1), y=labels)
    task = build_task(TaskConfig(kind="classification"), info)
    results = {}
    for rank in (0, 1):
        model = CountingModel()
        result = evaluate(model, task, split, "val", 2, torch.device("cpu"), "fp32", ctx=Alone(rank=rank, world=2))
        results[rank] = (model.calls, result.metrics["val_accuracy"])
    # Rank 0 holds rows 0, 2, 4 (two batches); rank 1 holds rows 1, 3 (one batch) and repeats a row.
    assert results[0] == ([2, 1], 2 / 3)  # rows 0 and 2 right, row 4 wrong
    assert results[1] == ([2, 1], 1 / 2)  # row 3 right, row 1 wrong; the padding row is not counted
