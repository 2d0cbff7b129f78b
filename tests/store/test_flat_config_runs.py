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


def test_a_regression_run_from_before_target_standardization_evaluates_as_it_trained(tmp_path, capsys):
    """Its config has no data.standardize_target (every field is saved, so absent means older): it trained
    on the raw target, and must not be rebuilt with today's default (outputs mapped back a second time)."""
    import json

    args = ["diabetes-regression", "data.standardize_target=false", "stop.epochs=3", "log.progress=false"]
    assert main(["train", *args, "log.plots=false", f"out_dir={tmp_path}", "name=old"]) == 0
    run = tmp_path / "old"
    config = run / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(True) if "standardize_target" not in line))
    info = json.loads((run / "data_info.json").read_text())
    (run / "data_info.json").write_text(json.dumps({k: v for k, v in info.items() if not k.startswith("target_")}))
    assert read_saved_config(config)["data"]["standardize_target"] is False
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert evaluated["test_r2"] == pytest.approx(summary["final"]["test_r2"], abs=1e-9)


def test_an_old_classifier_config_is_left_as_written(tmp_path):
    """Only a regression was changed by target standardization: a classifier's old config is not migrated, so
    `gradwise train RECIPE resume=RUN` still matches it."""
    assert main(["train", "digits-mlp", "stop.max_steps=3", "log.progress=false", "log.plots=false",
                 f"out_dir={tmp_path}", "name=old"]) == 0  # fmt: skip
    config = tmp_path / "old" / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(True) if "standardize_target" not in line))
    assert "standardize_target" not in read_saved_config(config)["data"]
    assert main(["train", "digits-mlp", f"resume={tmp_path / 'old'}", "stop.max_steps=6", "log.progress=false",
                 "log.plots=false"]) == 0  # fmt: skip
