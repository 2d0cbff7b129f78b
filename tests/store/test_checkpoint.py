"""Checkpoints: pickle-free round trips, atomic replacement, clear errors on corruption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gradwise.errors import CheckpointError
from gradwise.store.checkpoint import (
    flatten_state,
    load_model_state,
    load_training_state,
    load_weights_into,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_state,
)


def optimizer_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN == NaN here


def test_nested_state_round_trips_exactly():
    state = {
        "optimizer": optimizer_state(),
        "int_keys": {0: 1.5, 7: None},
        "tuple": (1, "a"),
        "nan": float("nan"),
        "rng": torch.get_rng_state(),
    }
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten_state(state, tensors)
    import json

    again = unflatten_state(json.loads(json.dumps(meta)), tensors)
    assert_same(state, again)


def test_pickle_only_objects_are_refused():
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"x": object()}, {})


def test_save_and_load(tmp_path: Path):
    model = torch.nn.Linear(3, 2)
    state = {"optimizer": optimizer_state(), "counters": {"step": 5}}
    save_checkpoint(tmp_path, 5, model.state_dict(), state, ["last", "best"])
    ckpt = tmp_path / "last"
    assert os.readlink(tmp_path / "last") == os.readlink(tmp_path / "best") == "step-00000005"
    loaded = load_training_state(ckpt)
    assert_same(state, loaded)
    other = torch.nn.Linear(3, 2)
    load_weights_into(other, load_model_state(ckpt), ckpt)
    assert torch.equal(other.weight, model.weight)


def test_old_steps_are_pruned_but_tagged_ones_kept(tmp_path: Path):
    model = torch.nn.Linear(2, 1)
    save_checkpoint(tmp_path, 1, model.state_dict(), {}, ["last", "best"])
    save_checkpoint(tmp_path, 2, model.state_dict(), {}, ["last"])
    save_checkpoint(tmp_path, 3, model.state_dict(), {}, ["last"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "last", "manifest.json", "step-00000001", "step-00000003"]


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = torch.nn.Linear(2, 1)
    save_checkpoint(tmp_path, 1, model.state_dict(), {"counters": {"step": 1}}, ["last"])
    import gradwise.store.checkpoint as ckpt_module

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies in the middle of writing

    monkeypatch.setattr(ckpt_module, "save_file", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model.state_dict(), {"counters": {"step": 2}}, ["last"])
    monkeypatch.undo()
    assert load_training_state(tmp_path / "last")["counters"]["step"] == 1
    # The next successful save cleans the torn temporary directory away.
    save_checkpoint(tmp_path, 3, model.state_dict(), {"counters": {"step": 3}}, ["last"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_corrupt_and_missing_files_are_one_line_errors(tmp_path: Path):
    model = torch.nn.Linear(2, 1)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model.state_dict(), {"a": torch.ones(2)}, ["last"])
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_model_state(ckpt)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"state\.json: corrupt"):
        load_training_state(ckpt)
    with pytest.raises(CheckpointError, match="no 'best' checkpoint"):
        resolve_checkpoint(tmp_path / "run", "best")
    with pytest.raises(CheckpointError, match="not a run directory"):
        resolve_checkpoint(tmp_path / "nope", "last")


def test_mismatched_weights_name_the_keys(tmp_path: Path):
    weights = torch.nn.Linear(3, 2).state_dict()
    with pytest.raises(CheckpointError, match=r"missing: 0\.bias, 0\.weight; unexpected: bias, weight"):
        load_weights_into(torch.nn.Sequential(torch.nn.Linear(3, 2)), weights, tmp_path)
    with pytest.raises(CheckpointError, match=r"weight has shape \(2, 3\) in the checkpoint but \(4, 3\)"):
        load_weights_into(torch.nn.Linear(3, 4), {"weight": weights["weight"], "bias": torch.zeros(4)}, tmp_path)
