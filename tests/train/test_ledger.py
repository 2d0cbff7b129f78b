"""The loss ledger: records wait for their loss, are logged in order, and a non-finite loss names its step."""

from __future__ import annotations

import pytest
import torch

from gradwise.errors import TrainingError
from gradwise.train.distributed import Distributed
from gradwise.train.ledger import LossLedger


def record(step: int) -> dict:
    return {"kind": "train", "step": step, "epoch": step / 10, "loss": None, "lr": 0.1, "time": 0.0}


def test_a_window_of_steps_is_logged_in_order_with_its_losses():
    written, reported = [], []
    ledger = LossLedger(Distributed(), written.append, lambda *args: reported.append(args))
    assert ledger.settle(stop_asked=False) == (None, False)  # nothing pending
    for step, loss in ((1, 2.5), (2, 1.25), (3, 0.75)):
        ledger.add(record(step), torch.tensor(loss))
    assert written == []  # nothing is logged before it is settled
    assert ledger.settle(stop_asked=True) == (0.75, True)
    assert [(line["step"], line["loss"]) for line in written] == [(1, 2.5), (2, 1.25), (3, 0.75)]
    assert list(written[0]) == ["kind", "step", "epoch", "loss", "lr", "time"]  # the loss keeps its place
    assert reported == [(1, 2.5, 0.1), (2, 1.25, 0.1), (3, 0.75, 0.1)]
    assert ledger.settle(stop_asked=False) == (None, False)  # settled steps are not logged twice
    assert len(written) == 3


def test_a_non_finite_loss_names_the_first_bad_step_and_logs_the_good_ones_before_it():
    written: list[dict] = []
    ledger = LossLedger(Distributed(), written.append, lambda *args: None)
    for step, loss in ((7, 0.5), (8, float("nan")), (9, float("inf"))):
        ledger.add(record(step), torch.tensor(loss))
    with pytest.raises(TrainingError, match=r"training loss is nan at step 8 \(epoch 0\.80\)"):
        ledger.settle(stop_asked=False)
    assert [line["step"] for line in written] == [7]
