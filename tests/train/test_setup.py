"""Building a run: the loaded data is shared by later runs of the same process, and only then."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gradwise.config import validate
from gradwise.train import setup
from gradwise.train.loop import fit
from gradwise.train.setup import build_model_and_data

QUIET = {"log": {"progress": False, "plots": False}}


def test_same_data_is_loaded_once_and_shared():
    first, _, _, _ = build_model_and_data(validate({"data": {"name": "digits"}, **QUIET}))
    again, _, _, _ = build_model_and_data(validate({"data": {"name": "digits"}, "optim": {"lr": 0.1}, **QUIET}))
    assert again is first  # other training settings, same data
    other_seed, _, _, _ = build_model_and_data(validate({"data": {"name": "digits"}, "seed": 1, **QUIET}))
    assert other_seed is not first  # the seed draws other splits
    assert not torch.equal(other_seed.test.y, first.test.y)


def test_a_changed_data_file_is_read_again(tmp_path: Path):
    file = tmp_path / "points.csv"
    file.write_text("x,y\n" + "".join(f"{i},{2 * i + 1}\n" for i in range(40)))
    cfg = validate({"data": {"name": "file", "path": str(file), "target": "y", "features": ["x"]}, **QUIET})
    first, _, _, _ = build_model_and_data(cfg)
    file.write_text("x,y\n" + "".join(f"{i},{3 * i}\n" for i in range(50)))
    os.utime(file, ns=(1, 1))  # a different modification time even on a coarse clock
    second, _, _, _ = build_model_and_data(cfg)
    assert second is not first and len(second.train.y) + len(second.val.y) + len(second.test.y) == 50


def test_a_run_on_shared_data_matches_one_on_freshly_loaded_data(tmp_path: Path):
    # The shared data must not change what a run computes: the same run on freshly loaded data and
    # then on the shared data ends with identical weights.
    cfg = validate(
        {"data": {"name": "digits", "limit": 300}, "model": {"hidden": [16]}, "stop": {"epochs": 2}, **QUIET}
    )
    setup._DATA_CACHE.clear()
    fit(cfg, tmp_path / "a")
    assert len(setup._DATA_CACHE) == 1
    fit(cfg, tmp_path / "b")
    from gradwise.store.checkpoint import load_model_state

    a, b = (load_model_state(tmp_path / r / "checkpoints" / "last") for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
