"""When the keeper writes checkpoints, and that `last` is always a full checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gradwise.config import CheckpointConfig
from gradwise.store.checkpoint import load_model_state, load_training_state
from gradwise.train.keeper import CheckpointKeeper


def make_keeper(tmp_path: Path, **cfg) -> tuple[CheckpointKeeper, torch.nn.Linear, list[int]]:
    model = torch.nn.Linear(2, 1)
    writes: list[int] = []
    keeper = CheckpointKeeper(
        tmp_path,
        CheckpointConfig(**cfg),
        model,
        training_state=lambda: {"counters": {"n": len(writes)}},
        before_write=lambda: writes.append(1),
    )
    return keeper, model, writes


def test_first_eval_writes_then_the_interval_holds_writes_back(tmp_path: Path):
    keeper, _, writes = make_keeper(tmp_path, min_interval_s=1e9)
    keeper.after_eval(5, improved=True)
    assert os.readlink(tmp_path / "last") == os.readlink(tmp_path / "best") == "step-00000005"
    keeper.after_eval(10, improved=False)
    keeper.after_eval(15, improved=True)
    assert os.readlink(tmp_path / "last") == "step-00000005" and len(writes) == 1
    keeper.save(20)
    assert os.readlink(tmp_path / "last") == "step-00000020"
    assert os.readlink(tmp_path / "best") == "weights-00000015"
    assert len(writes) == 2


def test_pending_best_holds_the_weights_of_its_step(tmp_path: Path):
    keeper, model, _ = make_keeper(tmp_path, min_interval_s=1e9)
    keeper.after_eval(1, improved=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    keeper.after_eval(2, improved=True)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    keeper.save(3)
    assert torch.all(load_model_state(tmp_path / "best")["weight"] == 3.0)
    assert torch.all(load_model_state(tmp_path / "last")["weight"] == -1.0)


def test_a_full_checkpoint_never_reuses_a_weights_only_directory(tmp_path: Path):
    # A crash after the pending best was written but before `last`: the replay then saves `last` at that step.
    keeper, _, _ = make_keeper(tmp_path, min_interval_s=1e9)
    keeper.after_eval(1, improved=False)
    keeper.after_eval(4, improved=True)
    keeper.save(6)
    replay, _, _ = make_keeper(tmp_path, min_interval_s=0)
    replay.after_eval(4, improved=False)
    assert os.readlink(tmp_path / "last") == "step-00000004"
    assert "counters" in load_training_state(tmp_path / "last")


def test_every_steps_writes_without_an_eval(tmp_path: Path):
    keeper, _, writes = make_keeper(tmp_path, every_steps=3)
    for step in range(1, 8):
        keeper.after_step(step)
    assert len(writes) == 2 and os.readlink(tmp_path / "last") == "step-00000006"
