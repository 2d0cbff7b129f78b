"""The command line: subcommands, one-line errors with exit status 2, resume, eval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradwise.cli import build_parser, main
from gradwise.experiments.recipes import list_recipes
from gradwise.store.checkpoint import load_model_state

QUICK = ["data.limit=300", "stop.epochs=1", "log.progress=false", "log.plots=false"]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_recipe(tmp_path: Path, text: str) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    return recipe


def test_train_writes_a_run_directory(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, "train", "digits-mlp", *QUICK, "log.plots=true")
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("digits-mlp-")
    assert str(run_dir.relative_to(tmp_path)) in out
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last/model.safetensors",
        "checkpoints/best/model.safetensors",
        "plots/loss.png",
        "plots/lr.png",
        "plots/confusion.png",
    ):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert {"test_accuracy", "test_macro_f1", "val_loss"} <= set(summary["final"])
    assert len(summary["confusion_matrix"]["matrix"]) == 10

    code, out, _ = run_main(capsys, "eval", str(run_dir), "--json")
    assert code == 0
    assert json.loads(out)["test_accuracy"] == pytest.approx(summary["final"]["test_accuracy"])


def test_named_run_and_refusing_to_overwrite(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(capsys, "train", "digits-mlp", *QUICK, "name=mine")[0] == 0
    assert (tmp_path / "runs" / "mine" / "summary.json").exists()
    code, _, err = run_main(capsys, "train", "digits-mlp", *QUICK, "name=mine")
    assert code == 2 and "a run with this name exists" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["train", "digits-mlp", "optim.name=adamx"],
            "optim.name: got 'adamx'; expected one of 'adadelta', 'adafactor'",
        ),
        (["train", "digits-mlp", "optim.weight_decay=0.1"], "optim.weight_decay: unknown key"),
        (["train", "digits-mlp", "optim.lr=-3"], "optim.lr: got -3; expected greater than 0"),
        (["train", "no-such-recipe"], "recipe no-such-recipe: no such file, and no bundled recipe"),
        (["train", "digits-mlp", "stop.monitor=val_acc"], "stop.monitor: got 'val_acc'; available: val_loss"),
        (["eval", "does/not/exist"], "not a run directory"),
        (["resume", "does/not/exist"], "does/not/exist: not a run directory"),
        (["recipes", "copy", "nope", "x.yaml"], "no bundled recipe 'nope'"),
    ],
)
def test_user_errors_are_one_line_with_status_2(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_data_file_names_file_and_column(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,x\n3,4,y\n")
    recipe = write_recipe(tmp_path, "data: {name: file, path: d.csv, target: lbl}\n")
    code, _, err = run_main(capsys, "train", str(recipe))
    assert code == 2 and "d.csv" in err and "lbl" in err and err.count("\n") == 1


def test_corrupt_checkpoint_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_main(capsys, "train", "digits-mlp", *QUICK, "name=r")
    best = tmp_path / "runs" / "r" / "checkpoints" / "best"
    (best / "model.safetensors").write_bytes(b"truncated")
    code, _, err = run_main(capsys, "eval", "runs/r")
    assert code == 2 and "model.safetensors: 9 bytes, the manifest says" in err and err.count("\n") == 1


def test_resume_refuses_a_changed_optimization(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_main(capsys, "train", "digits-mlp", *QUICK, "name=r")
    code, _, err = run_main(capsys, "resume", "runs/r", "optim.lr=0.5")
    assert code == 2 and "cannot resume with optim.lr=0.5" in err
    code, _, _ = run_main(capsys, "resume", "runs/r", "stop.epochs=2")  # training longer is allowed
    assert code == 0
    assert json.loads((tmp_path / "runs/r/summary.json").read_text())["epochs"] == pytest.approx(2.0)
    # How processes share the run may change (it stays the same optimization); FSDP's numerics may not.
    code, _, err = run_main(capsys, "resume", "runs/r", "distributed.strategy=fsdp", "distributed.mixed_precision=bf16")
    assert code == 2 and "cannot resume with distributed.mixed_precision='bf16'" in err
    code, _, _ = run_main(capsys, "resume", "runs/r", "distributed.strategy=fsdp", "stop.epochs=3")
    assert code == 0 and (tmp_path / "runs/r/checkpoints/last/shards").is_dir()  # sharded from now on


def test_recipes_list_and_copy(capsys, tmp_path):
    code, out, _ = run_main(capsys, "recipes")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == len(list_recipes()) >= 5
    for line in lines:
        name, command, description = line.split(maxsplit=2)
        assert (Path(__file__).parents[1] / "recipes" / f"{name}.yaml").exists()
        assert command == ("compress" if name.startswith("compress-") else "train")
        assert len(description) > 20
    code, out, _ = run_main(capsys, "recipes", "copy", "digits-cnn", str(tmp_path))
    assert code == 0 and (tmp_path / "digits-cnn.yaml").exists()


def test_train_refuses_a_compression_recipe_with_the_command_that_reads_it(capsys):
    code, _, err = run_main(capsys, "train", "compress-digits-mlp")
    assert code == 2
    assert err.strip().count("\n") == 0 and "gradwise compress RUN_DIR compress-digits-mlp" in err


def test_every_subcommand_has_help_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in sub.choices.items():
        text = subparser.format_help()
        assert "example" in text, name


def test_python_dash_m_and_sigkill_then_resume_is_bit_exact(tmp_path: Path):
    """A real process killed with SIGKILL mid-run resumes to the same weights as an uninterrupted run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [
        "data.limit=600",
        "model.dropout=0.1",
        "stop.epochs=12",
        "eval.every_steps=4",
        "checkpoint.every_steps=1",
        "log.progress=false",
        "log.plots=false",
    ]
    cmd = [sys.executable, "-m", "gradwise", "train", "digits-mlp", *args]
    subprocess.run([*cmd, "name=whole"], cwd=tmp_path, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [*cmd, "name=killed"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = tmp_path / "runs" / "killed" / "checkpoints" / "last"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (last.exists() and os.readlink(last) >= "step-00000030"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(
        [sys.executable, "-m", "gradwise", "resume", "runs/killed"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    whole = load_model_state(tmp_path / "runs" / "whole" / "checkpoints" / "last")
    resumed = load_model_state(last)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    # The metrics log survives the kill too: every step exactly once, the same losses.
    logs = {}
    for name in ("whole", "killed"):
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        logs[name] = [json.loads(line) for line in lines if '"train"' in line]
    assert [r["step"] for r in logs["killed"]] == list(range(1, len(logs["whole"]) + 1))
    assert [r["loss"] for r in logs["killed"]] == [r["loss"] for r in logs["whole"]]
