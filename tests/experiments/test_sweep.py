"""Sweeps: a real Optuna study in SQLite whose trials are ordinary runs of the one loop."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from gradwise.config import read_yaml, validate
from gradwise.errors import ConfigError
from gradwise.experiments.sweep import run_sweep
from gradwise.store.rundir import read_summary
from gradwise.train.loop import fit

# digits-mlp made small: ~0.5 s a trial. Its default LR is made weak so that a search has room to win.
FAST = ["model.hidden=[32]", "data.limit=600", "schedule.step_size=10", "log.progress=false"]
SPACE = "optim.name: [sgd, adam]\noptim.lr: loguniform(1e-4, 1e-1)\n"


def make_space(tmp_path: Path, text: str = SPACE) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def overrides(tmp_path: Path, epochs: int = 3, *extra: str) -> list[str]:
    return [*FAST, f"stop.epochs={epochs}", f"out_dir={tmp_path / 'runs'}", *extra]


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_sweep_beats_the_recipe_and_best_yaml_reproduces_the_best_trial(tmp_path: Path):
    sweep_dir = run_sweep(
        Path("digits-mlp"), make_space(tmp_path), overrides=overrides(tmp_path, 3, "optim.lr=0.0001"), trials=6
    )
    assert sweep_dir == tmp_path / "runs" / "sweep-digits-mlp"
    study = load(sweep_dir)
    assert len(study.trials) == 6
    # Trial 0 is the recipe's own values; the search must find better.
    recipe_trial = study.trials[0]
    assert recipe_trial.params == {"optim.name": "adam", "optim.lr": 0.0001}
    recipe_value = read_summary(sweep_dir / "trial-0000")["best"]["value"]
    best = study.best_trial
    assert best.value > recipe_value
    trial_summary = read_summary(sweep_dir / f"trial-{best.number:04d}")
    assert trial_summary["best"]["value"] == best.value

    # best.yaml is a plain recipe: the base with the best values, which reproduces the trial exactly.
    raw = read_yaml(sweep_dir / "best.yaml")
    assert "variants" not in raw
    assert raw["optim"]["name"] == best.params["optim.name"] and raw["optim"]["lr"] == best.params["optim.lr"]
    again = fit(validate(raw, source="best.yaml"), tmp_path / "rerun")
    assert again["best"] == trial_summary["best"]
    assert again["final"] == trial_summary["final"]

    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert [r["trial"] for r in rows] == list(range(6))
    assert rows[best.number]["value"] == best.value and rows[best.number]["params"] == best.params
    assert all(r["run_dir"] == f"trial-{r['trial']:04d}" and r["steps"] for r in rows)
    table = (sweep_dir / "trials.md").read_text()
    assert f"best: trial {best.number}, val_accuracy {best.value:.4g}" in table
    assert table.count("\n| ") == 7  # header + 6 trials
    assert (sweep_dir / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert meta["status"] == "finished" and meta["finished"] == 6 and meta["best"]["trial"] == best.number


def test_rerunning_continues_the_same_study_and_refuses_a_different_space(tmp_path: Path):
    args = (Path("digits-mlp"), make_space(tmp_path))
    kwargs = {"overrides": overrides(tmp_path, 1), "sampler": "random", "pruner": "none"}
    sweep_dir = run_sweep(*args, trials=2, **kwargs)
    first = [t.params for t in load(sweep_dir).trials]
    run_sweep(*args, trials=4, **kwargs)
    trials = load(sweep_dir).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.params for t in trials[:2]] == first
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # The continued sampler does not replay the first run's draws.
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
    run_sweep(*args, trials=4, **kwargs)  # already done: nothing more runs
    assert len(load(sweep_dir).trials) == 4

    other = make_space(tmp_path, "optim.name: [sgd, adam]\noptim.lr: loguniform(1e-3, 1e-1)\n")
    with pytest.raises(ConfigError, match=r"was started with space.optim.lr='loguniform\(0.0001, 0.1\)'"):
        run_sweep(Path("digits-mlp"), other, trials=5, **kwargs)
    with pytest.raises(ConfigError, match=r"was started with config.model.hidden=\[32\], not \[16\]"):
        run_sweep(*args, trials=5, **{**kwargs, "overrides": [*kwargs["overrides"], "model.hidden=[16]"]})


def test_grid_runs_every_combination_once(tmp_path: Path):
    space = make_space(tmp_path, "optim.name: [sgd, adam]\noptim.lr: [0.01, 0.1]\n")
    sweep_dir = run_sweep(Path("digits-mlp"), space, overrides=overrides(tmp_path, 1), trials=10, sampler="grid")
    trials = load(sweep_dir).trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    combos = sorted((t.params["optim.name"], t.params["optim.lr"]) for t in trials)
    assert combos == sorted(itertools.product(["sgd", "adam"], [0.01, 0.1]))


def test_hyperband_pruner_runs_the_requested_trials(tmp_path: Path):
    space = make_space(tmp_path)
    sweep_dir = run_sweep(
        Path("digits-mlp"), space, overrides=overrides(tmp_path, 3), trials=5, sampler="random", pruner="hyperband"
    )
    trials = load(sweep_dir).trials
    assert len(trials) == 5 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # Intermediate values are keyed by evaluation count (1, 2, 3 for 3 epochs), not by optimizer step.
    assert sorted(trials[0].intermediate_values) == [1, 2, 3]


def test_median_pruner_prunes_a_clearly_bad_trial(tmp_path: Path):
    sweep_dir = tmp_path / "runs" / "sweep-digits-mlp"
    sweep_dir.mkdir(parents=True)
    # The study exists before the sweep: five good trials queued, then one whose LR is far too small.
    study = optuna.create_study(
        storage=f"sqlite:///{sweep_dir / 'study.db'}", study_name=sweep_dir.name, direction="maximize"
    )
    for lr in (0.01, 0.02, 0.005, 0.03, 0.015, 1e-6):
        study.enqueue_trial({"optim.name": "adam", "optim.lr": lr})
    space = make_space(tmp_path, "optim.name: [sgd, adam]\noptim.lr: loguniform(1e-6, 1e-1)\n")
    run_sweep(Path("digits-mlp"), space, overrides=overrides(tmp_path, 5), trials=6, sampler="random")
    trials = load(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5 + [TrialState.PRUNED]
    summary = read_summary(sweep_dir / "trial-0005")
    assert summary["status"] == "early_stopped"
    assert summary["stop_reason"].startswith("pruned by the median pruner at evaluation 2")
    assert summary["steps"] < summary["total_steps"]
    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert rows[5]["outcome"] == "pruned" and rows[5]["value"] == summary["best"]["value"]


SWEEP_SCRIPT = """
from pathlib import Path
from gradwise.experiments.sweep import run_sweep
run_sweep(Path("digits-mlp"), Path({space!r}), overrides={overrides!r}, trials={trials}, sampler="random")
"""


def start_sweep(tmp_path: Path, trials: int, epochs: int) -> tuple[subprocess.Popen, list[str]]:
    args = overrides(tmp_path, epochs)
    code = textwrap.dedent(SWEEP_SCRIPT).format(space=str(make_space(tmp_path)), overrides=args, trials=trials)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    return process, args


def wait_for_running_trial(process: subprocess.Popen, db: Path, done: int) -> int:
    """Wait until ``done`` trials completed and another one is training; return its number.

    Reads the database with sqlite3, read-only: opening it with Optuna while the sweep
    creates its tables would race with that creation.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the sweep ended before it could be stopped: {process.stderr.read()}"
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                states = dict(con.execute("SELECT number, state FROM trials").fetchall())
                # Every value drawn (both of SPACE's): a kill between two draws would leave a partial set.
                with_params = {
                    n
                    for (n,) in con.execute(
                        "SELECT t.number FROM trials t JOIN trial_params p ON p.trial_id = t.trial_id "
                        "GROUP BY t.number HAVING COUNT(*) = 2"
                    )
                }
        except sqlite3.OperationalError:  # not created yet
            states, with_params = {}, set()
        running = [n for n, state in states.items() if state == "RUNNING" and n in with_params]
        if sum(state == "COMPLETE" for state in states.values()) >= done and running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("no trial was running in time")


def test_a_killed_sweep_continues_without_losing_or_repeating_a_trial(tmp_path: Path):
    process, args = start_sweep(tmp_path, trials=4, epochs=6)
    sweep_dir = tmp_path / "runs" / "sweep-digits-mlp"
    killed = wait_for_running_trial(process, sweep_dir / "study.db", done=2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = load(sweep_dir).trials
    assert before[killed].state == TrialState.RUNNING  # what a killed process leaves behind

    run_sweep(Path("digits-mlp"), make_space(tmp_path), overrides=args, trials=4, sampler="random")
    trials = load(sweep_dir).trials
    assert len(trials) > len(before)
    assert trials[killed].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retry) == 1 and retry[0].params == before[killed].params
    done = finished(load(sweep_dir))
    assert len(done) == 4 and all(t.state == TrialState.COMPLETE for t in done)
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == 4  # none run twice
    assert {t.params["optim.lr"] for t in before if t.state == TrialState.COMPLETE} <= {
        t.params["optim.lr"] for t in done
    }
    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert rows[killed]["outcome"] == "killed" and f"retried as trial {retry[0].number}" in rows[killed]["note"]


def test_sigterm_checkpoints_the_trial_queues_it_again_and_writes_the_tables(tmp_path: Path):
    process, _ = start_sweep(tmp_path, trials=3, epochs=6)
    sweep_dir = tmp_path / "runs" / "sweep-digits-mlp"
    stopped = wait_for_running_trial(process, sweep_dir / "study.db", done=1)
    metrics = sweep_dir / f"trial-{stopped:04d}" / "metrics.jsonl"
    while process.poll() is None and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.02)  # the first evaluation is flushed: the trial is inside the training loop
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr
    study = load(sweep_dir)
    trial = study.trials[stopped]
    assert trial.state == TrialState.FAIL and trial.user_attrs["result"]["outcome"] == "interrupted"
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == stopped
    assert waiting[0].system_attrs["fixed_params"] == trial.params  # queued with the same values
    assert read_summary(sweep_dir / f"trial-{stopped:04d}")["status"] == "interrupted"
    assert json.loads((sweep_dir / "sweep.json").read_text())["status"] == "interrupted"


def test_bad_arguments_are_one_line_errors(tmp_path: Path):
    space = make_space(tmp_path)
    with pytest.raises(ConfigError, match="sampler must be one of"):
        run_sweep(Path("digits-mlp"), space, sampler="bayes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--trials and --jobs must be >= 1"):
        run_sweep(Path("digits-mlp"), space, trials=0)
    with pytest.raises(ConfigError, match=r"--heartbeat must be >= 1 second \(got 0\)"):
        run_sweep(Path("digits-mlp"), space, heartbeat=0)
    with pytest.raises(ConfigError, match="has variants; a sweep searches one recipe"):
        run_sweep(Path("optimizer-tour"), space, overrides=[f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"optim.lr: the grid sampler needs a list of choices"):
        run_sweep(Path("digits-mlp"), space, sampler="grid", overrides=[f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"sweep storage nosuchdb://host/db: cannot open \(NoSuchModuleError"):
        run_sweep(Path("digits-mlp"), space, storage="nosuchdb://host/db", overrides=[f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"sweep storage postgresql://me:\*\*\*@localhost:9/db: cannot open") as info:
        run_sweep(
            Path("digits-mlp"),
            space,
            storage="postgresql://me:secret@localhost:9/db",
            overrides=[f"out_dir={tmp_path}"],
        )
    assert "secret" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_parallel_workers_share_the_study_and_split_the_grid(tmp_path: Path):
    space = make_space(tmp_path, "optim.name: [sgd, adam]\noptim.lr: [0.01, 0.1]\n")
    sweep_dir = run_sweep(
        Path("digits-mlp"), space, overrides=overrides(tmp_path, 2), trials=10, jobs=2, sampler="grid"
    )
    trials = load(sweep_dir).trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted((t.params["optim.name"], t.params["optim.lr"]) for t in trials) == sorted(
        itertools.product(["sgd", "adam"], [0.01, 0.1])
    )
    assert (
        len({t.user_attrs["worker"]["pid"] for t in trials} - {os.getpid()}) == 2
    )  # two spawned workers, not this process
    assert all((sweep_dir / f"trial-{t.number:04d}" / "summary.json").exists() for t in trials)
