"""Sweeps across machines: one Optuna study on a real PostgreSQL server, workers in separate directories.

Each worker is its own process with its own sweep directory, as a worker on another machine
would be; they share nothing but the database. The server is the session's throw-away cluster
(tests/experiments/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from gradwise.errors import ConfigError
from gradwise.experiments import sweep
from gradwise.experiments.sweep import run_sweep

NAME = "shared"
# test_sweep.py's small digits MLP (~0.1 s an epoch) and space.
FAST = ["model.hidden=[32]", "data.limit=600", "schedule.step_size=10", "log.progress=false"]
SPACE = "optim.name: [sgd, adam]\noptim.lr: loguniform(1e-4, 1e-1)\n"
WORKER_SCRIPT = """
from pathlib import Path
from gradwise.experiments.sweep import run_sweep
run_sweep(Path("digits-mlp"), Path({space!r}), overrides={overrides!r}, trials={trials}, sampler="random",
          pruner="none", storage={url!r}, name={name!r}, heartbeat=1)
"""


def make_space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def worker_overrides(tmp_path: Path, worker: str, epochs: int) -> list[str]:
    """Every worker the same recipe (the study's signature), each its own out_dir (its own machine)."""
    return [*FAST, f"stop.epochs={epochs}", f"out_dir={tmp_path / worker / 'runs'}"]


def start_worker(tmp_path: Path, worker: str, url: str, trials: int, epochs: int) -> subprocess.Popen:
    (tmp_path / worker).mkdir(exist_ok=True)
    code = textwrap.dedent(WORKER_SCRIPT).format(
        space=str(make_space(tmp_path)),
        overrides=worker_overrides(tmp_path, worker, epochs),
        trials=trials,
        url=url,
        name=NAME,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several workers share this machine's cores
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path / worker,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 180) -> str:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stderr


def sweep_dir(tmp_path: Path, worker: str) -> Path:
    return tmp_path / worker / "runs" / NAME


def wait_for_training(process: subprocess.Popen, directory: Path) -> Path:
    """The first trial directory under ``directory`` whose run has written a metrics line and no summary yet."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the worker ended before it could be killed: {process.stderr.read()}"
        for trial_dir in sorted(directory.glob("trial-*")):
            metrics = trial_dir / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size and not (trial_dir / "summary.json").exists():
                return trial_dir
        time.sleep(0.02)
    raise AssertionError(f"no trial was training in {directory} in time")


def key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


@pytest.mark.slow
def test_a_worker_killed_on_one_machine_is_retried_once_by_the_other(tmp_path: Path, fresh_postgres_url: str):
    trials = 5
    first = start_worker(tmp_path, "a", fresh_postgres_url, trials, epochs=12)
    # The second machine joins once the first has made the study (a fresh database's tables are made once).
    killed_dir = wait_for_training(first, sweep_dir(tmp_path, "a"))
    second = start_worker(tmp_path, "b", fresh_postgres_url, trials, epochs=12)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not (killed_dir / "summary.json").exists()  # killed mid-trial, as intended
    killed = int(killed_dir.name.removeprefix("trial-"))
    finish(second)

    study = optuna.load_study(study_name=NAME, storage=fresh_postgres_url)
    trials_now = study.trials
    assert [t.number for t in trials_now] == list(range(trials + 1))  # none lost, the killed one plus its retry
    dead = trials_now[killed]
    assert dead.state == TrialState.FAIL and "result" not in dead.user_attrs
    retries = [t for t in trials_now if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1  # queued once, not by both the heartbeat and gradwise's own path
    retry = retries[0]
    assert retry.params == dead.params and retry.state == TrialState.COMPLETE
    assert retry.system_attrs["failed_trial"] == killed  # Optuna's stale-trial callback queued it
    assert retry.user_attrs["worker"]["dir"] == str(sweep_dir(tmp_path, "b").resolve())  # the live machine ran it
    done = [t for t in trials_now if t.state == TrialState.COMPLETE]
    assert len(done) == trials
    assert len({key(t.params) for t in done}) == trials  # no value set run twice, the killed one's once

    # Both directories tell the whole study; each names where the other's trials ran.
    rows = json.loads((sweep_dir(tmp_path, "b") / "trials.json").read_text())
    assert [r["trial"] for r in rows] == list(range(trials + 1))
    assert rows[killed]["outcome"] == "killed" and f"retried as trial {retry.number}" in rows[killed]["note"]
    assert rows[killed]["run_dir"] == f"{sweep_dir(tmp_path, 'a').resolve()}/{killed_dir.name}"
    assert rows[retry.number]["run_dir"] == f"trial-{retry.number:04d}"
    assert (sweep_dir(tmp_path, "b") / f"trial-{retry.number:04d}" / "summary.json").exists()
    # Re-running the killed machine's command runs nothing more and writes its tables.
    args = (Path("digits-mlp"), make_space(tmp_path))
    again = {"sampler": "random", "pruner": "none", "storage": fresh_postgres_url, "name": NAME, "heartbeat": 1}
    run_sweep(*args, overrides=worker_overrides(tmp_path, "a", 12), trials=trials, **again)
    assert len(optuna.load_study(study_name=NAME, storage=fresh_postgres_url).trials) == trials + 1
    meta = json.loads((sweep_dir(tmp_path, "a") / "sweep.json").read_text())
    assert meta["finished"] == trials and meta["counts"] == {"completed": trials, "killed": 1}


@pytest.mark.slow
def test_concurrent_workers_never_run_more_than_the_trials_asked_for(tmp_path: Path, fresh_postgres_url: str):
    trials, count = 6, 3
    workers = [start_worker(tmp_path, f"w{i}", fresh_postgres_url, trials, epochs=1) for i in range(count)]
    for process in workers:
        finish(process)
    study = optuna.load_study(study_name=NAME, storage=fresh_postgres_url)
    assert len(study.trials) == trials and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({key(t.params) for t in study.trials}) == trials
    ran_in = {t.user_attrs["worker"]["dir"] for t in study.trials}
    assert ran_in <= {str(sweep_dir(tmp_path, f"w{i}").resolve()) for i in range(count)}
    assert study.user_attrs["gradwise_workers"] == count


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # asks outside Study.optimize, as sweeps do
def test_a_trial_whose_worker_died_before_its_first_beat_is_queued_again_once(postgres_url: str):
    study = optuna.create_study(storage=sweep._storage(postgres_url, 1), study_name="orphan")
    orphan = study.ask()  # its worker died right after: no heartbeat, no worker mark
    orphan.suggest_float("x", 0.0, 1.0)
    live = study.ask()  # a live worker's trial: beating, then marked (what sweep._ask does)
    study._storage.record_heartbeat(live._trial_id)
    live.set_user_attr("worker", {"host": "elsewhere", "pid": 1, "heartbeat": 1})
    sweep._reclaim_dead(study)
    sweep._reclaim_dead(study)  # a second look queues nothing more
    trials = study.trials
    assert trials[orphan.number].state == TrialState.FAIL and trials[live.number].state == TrialState.RUNNING
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs == {"retry_of": orphan.number}
    assert waiting[0].params == trials[orphan.number].params
    # A dead trial that its worker had queued again (interrupted, then killed before the tell) is not queued twice.
    study._storage.get_heartbeat_stale_trial_callback()(study, trials[orphan.number])
    assert sum(t.state == TrialState.WAITING for t in study.trials) == 1


def test_the_study_lock_is_the_databases_own(tmp_path: Path, postgres_url: str):
    """While one worker holds the study lock, a connection from anywhere else cannot take it."""
    study = optuna.create_study(storage=postgres_url, study_name="lock-test", load_if_exists=True)
    space = None  # the lock needs none of the plan's search fields
    plan = sweep._Plan(tmp_path, postgres_url, "lock-test", {}, space, 1, "random", "none", 0, "loss", 1, 1)  # type: ignore[arg-type]
    engine = sqlalchemy.create_engine(postgres_url)  # another process's (another machine's) connection
    probe = sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:space, :study)")
    args = {"space": sweep._PG_LOCK_SPACE, "study": study._study_id}
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sweep._study_lock(study, plan):
            inside.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        with engine.connect() as connection, connection.begin():
            assert connection.execute(probe, args).scalar() is False
    finally:
        release.set()
        holder.join()
    with engine.connect() as connection, connection.begin():
        assert connection.execute(probe, args).scalar() is True
    assert not (tmp_path / ".ask.lock").exists()  # not the lock file, which only this machine sees
    engine.dispose()


def test_a_postgresql_url_with_no_server_is_a_one_line_error(tmp_path: Path, pg_cluster: ModuleType):
    port = pg_cluster._free_port()  # nothing listens there
    expected = rf"sweep storage postgresql://me:\*\*\*@127.0.0.1:{port}/db: cannot open \(OperationalError: "
    with pytest.raises(ConfigError, match=expected) as info:
        run_sweep(
            Path("digits-mlp"),
            make_space(tmp_path),
            storage=f"postgresql://me:secret@127.0.0.1:{port}/db",
            overrides=[f"out_dir={tmp_path}"],
        )
    assert "secret" not in str(info.value) and "\n" not in str(info.value)


def test_ensure_postgres_fails_with_the_installers_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_cluster: ModuleType, ensure_postgres: Callable
):
    installer = pg_cluster.INSTALLER
    assert os.access(installer, os.X_OK)
    ok = subprocess.run([str(installer)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "initdb, pg_ctl and postgres already" in ok.stdout
    # No apt-get on PATH: the installer says why on one line, and the fixture turns that into a failure, not a skip.
    env = {"GRADWISE_TEST_PG_BIN": str(tmp_path / "no-server"), "PATH": str(tmp_path)}
    failed = subprocess.run(["/bin/bash", str(installer)], env=env, capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().startswith("install-test-postgres: cannot install postgresql: apt-get not found")
    fake = tmp_path / "fake-installer.sh"
    fake.write_text("echo 'cannot install postgresql: no mirror' >&2\nexit 1\n")
    monkeypatch.setenv("GRADWISE_TEST_PG_BIN", str(tmp_path / "no-server"))
    with pytest.raises(pytest.fail.Exception, match=r"fake-installer\.sh failed: cannot install postgresql: no mirror"):
        ensure_postgres(fake)
