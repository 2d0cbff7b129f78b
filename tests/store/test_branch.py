"""Branching a run: ``gradwise resume RUN --from-checkpoint last|best`` after a divergence.

A branch is a new run directory started from a checkpoint of its parent with a changed optimization; it
records its lineage, never writes the parent, refuses changes its checkpoint's state depends on, and then
behaves as any run (resumed after an interruption, it continues bit-exactly).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from gradwise.cli import main
from gradwise.store.checkpoint import load_model_state, load_training_state, read_manifest, resolve_checkpoint

QUIET = ["log.progress=false", "log.plots=false"]
# Healthy for the first epoch (40 steps of digits at batch 32, checkpointed at its evaluation), then the
# learning rate jumps 10⁴-fold at step 50 and the loss is NaN a few steps later.
DIVERGING = [
    "stop.epochs=4",
    "optim.name=momentum",
    "optim.lr=0.05",
    "schedule.name=multistep",
    "schedule.milestones=[50]",
    "schedule.gamma=10000",
    "checkpoint.min_interval_s=0",
    *QUIET,
]
# The branch: a lower learning rate, and no jump.
CALMER = ["optim.lr=0.01", "schedule.name=constant"]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def fingerprint(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, a link's target, a directory's mark."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def train_diverging_parent(tmp_path: Path, capsys, monkeypatch) -> tuple[Path, str]:
    """The parent run ``runs/p``, diverged after its first checkpoint; (its directory, the error line)."""
    monkeypatch.chdir(tmp_path)
    code = main(["train", "digits-mlp", *DIVERGING, "name=p"])
    _, err = capsys.readouterr()
    assert code == 2, err
    return tmp_path / "runs" / "p", one_line(err)


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"kind": "train"' in line]


@pytest.mark.slow
def test_divergence_then_branch_with_a_lower_lr(tmp_path: Path, capsys, monkeypatch):
    parent, line = train_diverging_parent(tmp_path, capsys, monkeypatch)
    kept = read_manifest(parent / "checkpoints").steps["last"]
    assert kept == 40
    assert "training loss is nan" in line
    assert f"checkpoint 'last' (step {kept}) is kept" in line
    assert f"gradwise resume {Path('runs/p')} --from-checkpoint last optim.lr=" in line
    before = fingerprint(parent)

    code = main(["resume", "runs/p", "--from-checkpoint", "last", *CALMER])
    out, err = capsys.readouterr()
    assert code == 0, err
    (branch,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "p"]
    assert branch.name.startswith("p-branch-")
    assert str(branch.relative_to(tmp_path)) in out
    assert fingerprint(parent) == before  # the parent is only read

    lineage = json.loads((branch / "lineage.json").read_text())
    assert lineage["parent"] == str(parent.resolve())
    assert lineage["checkpoint"] == "last"
    assert lineage["step"] == kept
    assert lineage["changes"]["optim.lr"] == {"from": 0.05, "to": 0.01}
    assert lineage["changes"]["schedule.name"] == {"from": "multistep", "to": "constant"}

    summary = json.loads((branch / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["test_accuracy"] > 0.9
    # Every step once: the parent's up to the checkpoint, then the branch's (none of the diverged ones).
    assert train_steps(branch) == list(range(1, summary["steps"] + 1))
    state = load_training_state(resolve_checkpoint(branch, "last"))
    assert [group["base_lr"] for group in state["optimizer"]["param_groups"]] == [0.01] * len(
        state["optimizer"]["param_groups"]
    )


@pytest.fixture
def weights_only_best(tmp_path: Path, capsys, monkeypatch) -> Path:
    """A run whose ``best`` is weights only: found at step 10, between the full writes at steps 5 and 12."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "digits-mlp", "data.limit=300", "stop.max_steps=12", "eval.every_steps=5", *QUIET]
    # After step 10 the learning rate is ~0, so the last evaluation cannot improve on step 10's.
    argv += ["checkpoint.min_interval_s=1000", "schedule.name=multistep", "schedule.milestones=[10]"]
    assert main([*argv, "schedule.gamma=1e-9", "name=r"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "r"
    manifest = read_manifest(run_dir / "checkpoints")
    assert manifest.tags == {"best": "weights-00000010", "last": "step-00000012"}
    return run_dir


@pytest.mark.parametrize(
    ("override", "named"),
    [("data.limit=200", "data.limit (300 → 200)"), ("model.hidden=[64]", "model.hidden"), ("seed=1", "seed")],
)
def test_a_branch_refuses_changing_data_or_model(weights_only_best: Path, capsys, override: str, named: str):
    before = fingerprint(weights_only_best.parent)
    code = main(["resume", "runs/r", "--from-checkpoint", "last", "optim.lr=0.01", override])
    _, err = capsys.readouterr()
    assert code == 2
    line = one_line(err)
    assert f"a branch cannot change {named}" in line
    assert "runs/r" in line
    assert fingerprint(weights_only_best.parent) == before  # no branch directory, the parent untouched


def test_a_branch_from_a_weights_only_best_is_refused(weights_only_best: Path, capsys):
    before = fingerprint(weights_only_best.parent)
    code = main(["resume", "runs/r", "--from-checkpoint", "best", "optim.lr=0.01"])
    _, err = capsys.readouterr()
    assert code == 2
    line = one_line(err)
    assert "runs/r/checkpoints/weights-00000010" in line and "weights only" in line and "branch from last" in line
    assert fingerprint(weights_only_best.parent) == before


@pytest.mark.slow
def test_an_interrupted_branch_resumes_bit_exactly(tmp_path: Path, capsys, monkeypatch):
    parent, _ = train_diverging_parent(tmp_path, capsys, monkeypatch)
    before = fingerprint(parent)
    branch = ["resume", "runs/p", "--from-checkpoint", "last", *CALMER]
    assert main([*branch, "name=whole"]) == 0, capsys.readouterr().err
    assert main([*branch, "stop.max_steps=100", "name=cut"]) == 0, capsys.readouterr().err
    cut = tmp_path / "runs" / "cut"
    assert read_manifest(cut / "checkpoints").steps["last"] == 100
    assert main(["resume", "runs/cut", "stop.max_steps=160"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    whole = tmp_path / "runs" / "whole"
    assert json.loads((cut / "summary.json").read_text())["steps"] == 160
    assert fingerprint(parent) == before

    a, b = (load_model_state(resolve_checkpoint(run, "last")) for run in (whole, cut))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    a_opt, b_opt = (load_training_state(resolve_checkpoint(run, "last"))["optimizer"] for run in (whole, cut))
    for index, slot in a_opt["state"].items():
        for name, value in slot.items():
            assert torch.equal(value, b_opt["state"][index][name]), (index, name)
    logs = {}
    for run in (whole, cut):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        logs[run.name] = [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]
    assert logs["cut"] == logs["whole"]
    assert [step for step, _ in logs["whole"]] == list(range(1, 161))
