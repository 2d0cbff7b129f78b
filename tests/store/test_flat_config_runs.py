"""A run directory written before components owned their config sections still loads, evaluates and resumes.

The fixture was trained by gradwise at c642d93~1 (one flat model/data/optim section, every field
written to config.yaml, most of them ignored by the chosen component): wine, an MLP of 8 units,
4 steps, with gradient noise so the checkpoint holds a hook's state under its old key.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gradwise.cli import main
from gradwise.config import read_saved_config, validate

FIXTURE = Path(__file__).parent / "fixtures" / "flat-config-run"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run, symlinks=True)
    return run


def test_the_flat_config_reads_as_the_chosen_components_sections(old_run):
    raw = read_saved_config(old_run / "config.yaml")
    assert "n_layer" not in raw["model"] and "vocab_size" not in raw["data"] and "betas" in raw["optim"]
    cfg = validate(raw)
    assert cfg.model.hidden == [8] and cfg.data.name == "wine" and cfg.noise.eta == 0.01


def test_eval_and_a_branch_from_last_work_on_the_old_run(old_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(old_run)]) == 0
    assert main(["resume", str(old_run), "--from-checkpoint", "last", "stop.max_steps=6", "log.plots=false"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out
