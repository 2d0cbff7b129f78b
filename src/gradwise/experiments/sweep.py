"""Hyperparameter sweeps: an Optuna study whose trials are ordinary runs of the one loop.

``run_sweep(recipe, space)`` keeps the study in a real database (SQLite in the
sweep directory unless ``storage`` names another Optuna storage URL, e.g.
PostgreSQL, so several machines can share one study: each runs the same command
in its own directory). Each trial trains the
recipe with the trial's values into ``<sweep_dir>/trial-NNNN/`` through
:func:`gradwise.train.loop.fit`; the objective is the run's best value of its
monitored metric. Pruning reuses the early stopper: the ``after_eval`` hook
reports each validation value to Optuna and, when the pruner says so, returns
a reason that stops the run like patience would.

Re-running the same command continues the same study until ``trials`` trials
have finished, never more: counting the trials and asking for the next one is one
step under a lock (a lock file for SQLite, an advisory lock of the database on
PostgreSQL). A trial left RUNNING by a killed worker is marked FAIL and its values
are queued again once, so no trial is lost or run twice: with SQLite when its
process on this machine is gone, with a server database when its worker, on any
machine, has sent no heartbeat for a while (Optuna's heartbeat).
At the end the sweep writes ``best.yaml`` (the recipe with the best values: it
reproduces the best trial, since every trial uses the recipe's seed),
``trials.md`` / ``trials.json``, ``trials.png`` and ``sweep.json`` (see
:mod:`gradwise.experiments.sweep_results`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

# Optuna's own heartbeat thread, as ``Study.optimize`` runs it around each trial (ask/tell gets none by itself).
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from gradwise.config import RunConfig, apply_overrides, monitor_mode, read_yaml, validate
from gradwise.errors import ConfigError, GradwiseError, TrainingError
from gradwise.experiments.recipes import find_recipe
from gradwise.experiments.space import Space, find_space, load_space
from gradwise.experiments.sweep_results import _masked, _outcome, _write_results
from gradwise.train.loop import FitHooks, fit

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
EXIT_INTERRUPTED = 130
# The first evaluations of a run are noisy; the median rule may prune from the second one on.
MEDIAN_WARMUP_EVALS = 2
MEDIAN_STARTUP_TRIALS = 5
# Fields that do not change what a trial optimizes: a re-run may differ in them and still continue the study.
_NOT_SEARCH = {"name", "description", "out_dir", "resume", "log"}
# A server database's workers beat this often; a trial silent for GRACE_BEATS beats has a dead worker.
HEARTBEAT_S = 20
GRACE_BEATS = 3
# Values are retried at most this often after their worker died (an OOM kill each time?), then given up.
MAX_RETRY = 2
# pg_advisory_xact_lock(space, study_id): the space keeps gradwise's locks apart from any other user's.
_PG_LOCK_SPACE = 0x67727764
# A machine that dies holding the lock must not block the others until TCP notices (hours).
_PG_LOCK_IDLE_TIMEOUT_S = 120


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to run trials (picklable: parallel workers are spawned processes)."""

    sweep_dir: Path
    storage: str
    study_name: str
    base_raw: dict[str, Any]
    space: Space
    trials: int
    sampler: Literal["tpe", "random", "grid"]
    pruner: Literal["median", "hyperband", "none"]
    seed: int
    monitor: str
    jobs: int
    heartbeat: int


def run_sweep(
    recipe: Path,
    space: Path,
    *,
    overrides: list[str] | None = None,
    trials: int = 20,
    jobs: int = 1,
    sampler: Literal["tpe", "random", "grid"] = "tpe",
    pruner: Literal["median", "hyperband", "none"] = "median",
    storage: str | None = None,
    name: str | None = None,
    seed: int = 0,
    heartbeat: int = HEARTBEAT_S,
) -> Path:
    """Search ``space`` around ``recipe`` with Optuna and return the sweep directory.

    Args:
        recipe: A recipe file, or the name of a bundled recipe.
        space: A space file (see :mod:`gradwise.experiments.space`), or a bundled space's name.
        overrides: ``key.path=value`` overrides applied to the recipe before the search.
        trials: How many trials the study should have finished (completed, pruned, or
            failed with an error such as divergence); trials already in the study count.
        jobs: Trials run at once, each in its own process (torch threads are split among them).
        sampler: ``tpe`` (Bergstra et al. 2011), ``random`` or ``grid`` (every combination
            of the choices once; ``trials`` is capped at their number).
        pruner: ``median`` (the median stopping rule of Golovin et al. 2017), ``hyperband``
            (Li et al. 2018) or ``none``; pruners compare runs at the same evaluation count.
        storage: An Optuna storage URL; default ``sqlite:///<sweep_dir>/study.db``.
        name: The sweep (and study) name; default ``sweep-<recipe stem>``. The sweep
            directory is ``<out_dir>/<name>``, so the same command continues the same sweep.
        seed: The sampler's seed (each trial uses the recipe's own seed).
        heartbeat: Seconds between a worker's heartbeats on a server database (not SQLite); a
            trial whose worker sent none for ``GRACE_BEATS`` times that is failed and queued again.

    Returns:
        The sweep directory.

    Raises:
        ConfigError: A bad argument, recipe or space, or a study that was started with a
            different recipe or space.
        KeyboardInterrupt: The sweep was interrupted (Ctrl-C/SIGTERM); the running trials
            are queued again and the tables are written first. Re-run to continue.

    References:
        Akiba et al. 2019, "Optuna: A Next-generation Hyperparameter Optimization Framework";
        Bergstra et al. 2011, "Algorithms for Hyper-Parameter Optimization" (TPE); Golovin et al.
        2017, "Google Vizier: A Service for Black-Box Optimization" (median stopping rule); Li et al.
        2018, "Hyperband: A Novel Bandit-Based Approach to Hyperparameter Optimization".
    """
    if trials < 1 or jobs < 1:
        raise ConfigError(f"sweep: --trials and --jobs must be >= 1 (got trials={trials}, jobs={jobs})")
    if heartbeat < 1:
        raise ConfigError(f"sweep: --heartbeat must be >= 1 second (got {heartbeat})")
    if sampler not in SAMPLERS or pruner not in PRUNERS:
        raise ConfigError(f"sweep: sampler must be one of {SAMPLERS} and pruner one of {PRUNERS}")
    recipe_path = find_recipe(str(recipe))
    base_raw = apply_overrides(read_yaml(recipe_path), list(overrides or []))
    base = validate(base_raw, source=str(recipe_path))
    if base.variants:
        raise ConfigError(f"{recipe_path}: has variants; a sweep searches one recipe (remove variants)")
    searched = load_space(find_space(str(space)), base_raw)
    if sampler == "grid":
        trials = min(trials, searched.grid_size())
    study_name = name or f"sweep-{recipe_path.stem}"
    sweep_dir = base.out_dir / study_name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    monitor = _monitor(base)
    direction = "maximize" if monitor_mode(monitor, base.stop.mode) == "max" else "minimize"
    study = _open_study(url, study_name, direction, heartbeat)
    plan = _Plan(
        sweep_dir, url, study_name, base_raw, searched, trials, sampler, pruner, seed, monitor, jobs, heartbeat
    )
    with _study_lock(study, plan):  # two machines starting one study at once: one signs it, one anchors it
        _check_same_search(study, base, searched, monitor, url)
        if not _beats(study):
            _recover_killed(study)
        if not study.get_trials(deepcopy=False) and sampler != "grid":
            _enqueue_recipe_values(study, base, searched)  # the recipe's own values first: never worse than it
    interrupted = False
    try:
        if jobs == 1:
            with _sigterm_interrupts():
                _work(plan, worker=0)
        else:
            _work_in_processes(plan)
    except KeyboardInterrupt:
        interrupted = True
    _write_results(study, plan, recipe_path, "interrupted" if interrupted else "finished")
    if interrupted:
        raise KeyboardInterrupt
    return sweep_dir


# --------------------------------------------------------------------------- the study


def _monitor(cfg: RunConfig) -> str:
    """The metric every trial is judged by, resolved as the loop resolves ``stop.monitor: auto``."""
    if cfg.stop.monitor != "auto":
        return cfg.stop.monitor
    from gradwise.data import load_dataset
    from gradwise.tasks import build_task
    from gradwise.train.adapt import model_dir

    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed, tokenizer_dir=model_dir(cfg))
    return build_task(cfg.task, data.info).default_monitor


def _open_study(url: str, study_name: str, direction: str, heartbeat: int) -> optuna.Study:
    try:
        with _creation_lock(url):
            storage = _storage(url, heartbeat)
            study = optuna.create_study(
                storage=storage, study_name=study_name, direction=direction, load_if_exists=True
            )
    except Exception as exc:  # SQLAlchemy raises many types: a bad URL, a missing driver, no server
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"sweep storage {_masked(url)}: cannot open ({type(exc).__name__}: {detail})") from None
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {study_name} in {_masked(url)} {study.direction.name.lower()}s its objective, "
            f"but this recipe's monitor wants to {direction} it; pass another --name"
        )
    return study


def _check_same_search(study: optuna.Study, base: RunConfig, searched: Space, monitor: str, url: str) -> None:
    """A study continues only with the recipe, overrides and space it was started with."""
    config = base.model_dump(mode="json", exclude=_NOT_SEARCH)
    signature = {"config": config, "space": searched.describe(), "monitor": monitor}
    stored = study.user_attrs.get("gradwise")
    if stored is None:
        study.set_user_attr("gradwise", signature)
        return
    old, new = _flat(stored), _flat(json.loads(json.dumps(signature)))
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            raise ConfigError(
                f"study {study.study_name} in {_masked(url)} was started with {key}={old.get(key)!r}, "
                f"not {new.get(key)!r}; re-run with the same recipe, overrides and space, or pass another --name"
            )


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _recover_killed(study: optuna.Study) -> None:
    """Mark FAIL the trials left RUNNING by a dead process on this machine and queue their values again.

    Trials RUNNING on other machines are left alone: their workers may be alive.
    """
    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        worker = trial.user_attrs.get("worker", {})
        if trial.state != TrialState.RUNNING or worker.get("host", host) != host or _alive(worker.get("pid")):
            continue
        # Queue first, then fail: a kill in between leaves a trial to recover next time, never none.
        if trial.params and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        study.tell(trial.number, state=TrialState.FAIL)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds that id
        return True
    return True


def _enqueue_recipe_values(study: optuna.Study, base: RunConfig, searched: Space) -> None:
    values = base.model_dump(mode="json")
    point = {}
    for param in searched.params:
        value: Any = values
        for key in param.path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if not param.contains(value):
            return  # the recipe lies outside the space: nothing to anchor on
        point[param.path] = param.encode(value)
    study.enqueue_trial(point, user_attrs={"recipe_values": True})


def _make_sampler(plan: _Plan, study: optuna.Study, joined: int) -> optuna.samplers.BaseSampler:
    """The worker's sampler; ``joined`` counts the workers that joined the study before this one.

    ``joined``, not the worker's index on its machine: two machines' first workers must not
    draw the same values. A single-worker sweep's first run has ``joined`` 0 (the plain seed).
    """
    if plan.sampler == "grid":  # the same shuffled order in every worker: trial n takes grid point n
        return _GridSampler(plan.space.grid(), seed=plan.seed)
    # A continued study must not replay the first run's random draws: the seed moves with its history.
    done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    seed = plan.seed + done + 7919 * joined
    if plan.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its ``study.stop()`` once the grid is done (allowed only inside
    ``Study.optimize``; with ask/tell the worker loop stops at the grid's size itself)."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        return None


def _make_pruner(plan: _Plan) -> optuna.pruners.BasePruner:
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_EVALS)
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def _taken(trials: list[FrozenTrial]) -> int:
    """Trials finished for good (completed, pruned, failed with an error) or running now."""
    return sum(1 for t in trials if _outcome(t) in ("completed", "pruned", "error", "running"))


# --------------------------------------------------------------------------- running trials


def _work(plan: _Plan, worker: int) -> None:
    """Ask for trials and run them until the study has ``plan.trials`` finished.

    With SQLite the worker stops once that many are finished or running (a trial it leaves
    RUNNING is recovered by the next run on this machine). On a server database it waits
    while other workers' trials run instead: one whose worker dies is retried here.
    """
    study = optuna.load_study(study_name=plan.study_name, storage=_storage(plan.storage, plan.heartbeat))
    with _study_lock(study, plan):
        joined = int(study.user_attrs.get("gradwise_workers", 0))
        study.set_user_attr("gradwise_workers", joined + 1)
    study.sampler = _make_sampler(plan, study, joined)
    study.pruner = _make_pruner(plan)
    while True:
        with _study_lock(study, plan):  # count and ask as one step among all the study's workers
            if _beats(study):
                _reclaim_dead(study)
            trials = study.get_trials(deepcopy=False)
            if _taken(trials) < plan.trials:
                trial = _ask(study, plan, worker)
                values = plan.space.suggest(trial)
            elif _finished(trials) >= plan.trials or not _beats(study):
                return
            else:
                trial = None
        if trial is None:  # the rest are running elsewhere: look again after a beat
            time.sleep(plan.heartbeat)
            continue
        with get_heartbeat_thread(trial._trial_id, study._storage):  # a NullHeartbeatThread on SQLite
            try:
                _run_trial(study, trial, values, plan)
            except UpdateFinishedTrialError:
                grace = GRACE_BEATS * plan.heartbeat
                print(
                    f"sweep: trial {trial.number} was failed by another worker (no heartbeat from here for {grace} s) "
                    "and its values queued again; going on",
                    file=sys.stderr,
                )


def _ask(study: optuna.Study, plan: _Plan, worker: int) -> optuna.trial.Trial:
    """A new trial, beating already, and then marked with its worker (called under the study lock).

    The first beat is recorded before the worker mark: a RUNNING trial without the mark,
    seen under the lock, lost its worker between the two (see :func:`_reclaim_dead`).
    """
    with warnings.catch_warnings():
        # "Heartbeat ... supposed to be used with Study.optimize": this loop runs the heartbeat itself.
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        trial = study.ask()
    if _beats(study):
        study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
    # The directory, resolved: the tables of a study shared by several directories say where each trial ran.
    here = {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker, "dir": str(plan.sweep_dir.resolve())}
    if _beats(study):
        here["heartbeat"] = plan.heartbeat  # beats were recorded first (see _reclaim_dead)
    trial.set_user_attr("worker", here)
    return trial


def _beats(study: optuna.Study) -> bool:
    """Whether the study's storage has a heartbeat (a server database; not SQLite)."""
    return study._storage.get_heartbeat_interval() is not None  # type: ignore[attr-defined]


def _finished(trials: list[FrozenTrial]) -> int:
    """Trials finished for good: completed, pruned, or failed with an error."""
    return sum(1 for t in trials if _outcome(t) in ("completed", "pruned", "error"))


def _reclaim_dead(study: optuna.Study) -> None:
    """Fail the trials whose worker died, on any machine, and queue their values again (under the study lock).

    Optuna fails a trial whose heartbeat stopped and runs the storage's :class:`_RequeueStale`.
    It skips a trial that never beat; here a trial beats before it gets its worker mark (with its
    ``heartbeat``), both under the lock this worker holds, so a RUNNING trial without that mark
    has lost its worker (or a worker that never beat: one of an older gradwise, left RUNNING).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # fail_stale_trials is "experimental" since 2.9
        optuna.storages.fail_stale_trials(study)
    requeue = study._storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
    for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not (isinstance(worker, dict) and worker.get("heartbeat")):
            study.tell(trial.number, state=TrialState.FAIL)
            requeue(study, trial)


class _RequeueStale:
    """Optuna's :class:`RetryHeartbeatStaleTrialCallback`, queuing a trial's values at most once.

    The queued trial gets gradwise's ``retry_of`` (the trial it retries, which the tables show)
    and no worker mark or result of the dead trial. A trial whose worker queued it again before
    it died (interrupted, then killed between the queuing and the tell) is not queued twice.
    """

    def __init__(self, max_retry: int) -> None:
        self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if any(t.user_attrs.get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)):
            return
        if not trial.params:  # died before its values were drawn: the sampler draws new ones anyway
            return
        kept = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "result")}
        trial.user_attrs = {**kept, "retry_of": trial.number}
        self._retry(study, trial)


def _storage(url: str, heartbeat: int) -> RDBStorage:
    """The study's storage; on a server database with Optuna's heartbeat and stale-trial retry.

    SQLite keeps the host + pid check instead (:func:`_recover_killed`): its file lives on one
    machine, where a dead process is known at once and exactly, with no grace period to wait
    out, and a heartbeat writer per trial would contend with the trials for its one write lock.
    """
    if url.startswith("sqlite"):
        # SQLite locks the whole file on a write; parallel workers wait for it instead of failing.
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is "experimental" since 2.9
        return RDBStorage(
            _driver_url(url),
            heartbeat_interval=heartbeat,
            grace_period=GRACE_BEATS * heartbeat,
            heartbeat_stale_trial_callback=_RequeueStale(MAX_RETRY),
        )


def _driver_url(url: str) -> str:
    """``postgresql://`` with the driver gradwise installs (extra ``postgres``), whatever SQLAlchemy's default."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


@contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Machines starting one sweep on a new PostgreSQL database make Optuna's tables one at a time.

    PostgreSQL fails a CREATE TABLE that races another one (a unique violation in its catalog)
    rather than waiting for it; under this lock the second worker finds the tables made.
    """
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(_driver_url(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection, connection.begin():
            # Key 0 of gradwise's lock space: study ids, the other keys, start at 1.
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:space, 0)"), {"space": _PG_LOCK_SPACE})
            yield
    finally:
        engine.dispose()


@contextmanager
def _study_lock(study: optuna.Study, plan: _Plan) -> Iterator[None]:
    """One worker at a time for this study: an advisory lock of PostgreSQL, held by every
    machine's workers, else a lock file in the sweep directory (this machine's workers only).

    The transaction-level lock is released by the commit, by a rollback, or by the server when
    the connection dies, so a killed worker never leaves it held.
    """
    storage = study._storage._backend if hasattr(study._storage, "_backend") else study._storage
    engine = storage.engine if isinstance(storage, RDBStorage) else None
    if engine is None or engine.dialect.name != "postgresql":
        with _lock(plan.sweep_dir / ".ask.lock"):
            yield
        return
    with engine.connect() as connection, connection.begin():
        connection.execute(
            sqlalchemy.text(f"SET LOCAL idle_in_transaction_session_timeout = '{_PG_LOCK_IDLE_TIMEOUT_S}s'")
        )
        connection.execute(
            sqlalchemy.text("SELECT pg_advisory_xact_lock(:space, :study)"),
            {"space": _PG_LOCK_SPACE, "study": study._study_id},
        )
        yield


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_trial(study: optuna.Study, trial: optuna.trial.Trial, values: dict[str, Any], plan: _Plan) -> None:
    """Train one trial and tell the study how it ended.

    What the run did goes in one ``result`` user attribute: each attribute is a database commit.
    """
    run_dir = plan.sweep_dir / f"trial-{trial.number:04d}"
    pruned: list[str] = []
    evals = [0]

    def after_eval(step: int, metrics: dict[str, float]) -> str | None:
        value = metrics.get(plan.monitor)
        if value is None or not math.isfinite(value):
            return None
        # Reported by evaluation count, not optimizer step: runs with different batch sizes line up by epoch.
        evals[0] += 1
        trial.report(value, evals[0])
        if trial.should_prune():
            pruned.append(f"pruned by the {plan.pruner} pruner at evaluation {evals[0]} (step {step})")
            return pruned[0]
        return None

    try:
        cfg = validate(plan.space.apply(plan.base_raw, values), source=f"trial {trial.number}")
        # Trials keep quiet and skip plots (a report regenerates them); neither changes the numbers.
        quiet = cfg.log.model_copy(update={"progress": False, "plots": False})
        cfg = cfg.model_copy(update={"name": run_dir.name, "out_dir": plan.sweep_dir, "log": quiet})
        summary = fit(cfg, run_dir, hooks=FitHooks(after_eval=after_eval))
    except GradwiseError as exc:  # a combination the config rejects, or a run that diverged
        trial.set_user_attr("result", {"outcome": "error", "error": str(exc)})
        study.tell(trial, state=TrialState.FAIL)
        return
    except KeyboardInterrupt:
        _give_back(study, trial, {"outcome": "interrupted", "error": "interrupted"})
        raise
    except BaseException as exc:
        _give_back(study, trial, {"outcome": "crashed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    value = summary["best"]["value"]
    result = {key: summary.get(key) for key in ("status", "stop_reason", "steps", "wall_time_s")}
    result.update(best_value=value, best_step=summary["best"]["step"])
    if summary["status"] == "interrupted":
        _give_back(study, trial, {**result, "outcome": "interrupted", "error": summary["stop_reason"]})
        raise KeyboardInterrupt
    if pruned:
        trial.set_user_attr("result", {**result, "outcome": "pruned"})
        study.tell(trial, state=TrialState.PRUNED)
    elif summary.get("monitor") != plan.monitor or value is None or not math.isfinite(value):
        error = f"no finite best {plan.monitor} (monitor {summary.get('monitor')}: {value})"
        trial.set_user_attr("result", {**result, "outcome": "error", "error": error})
        study.tell(trial, state=TrialState.FAIL)
    else:
        trial.set_user_attr("result", {**result, "outcome": "completed"})
        study.tell(trial, float(value))


def _give_back(study: optuna.Study, trial: optuna.trial.Trial, result: dict[str, Any]) -> None:
    """A trial that did not run to its end: fail it and queue its values again (once).

    Another worker may already have failed it as stale and queued its values (a long pause here, then
    Ctrl-C): then there is nothing left to give back, and the interrupt that brought us here must not be
    replaced by Optuna's error about a finished trial.
    """
    if study.get_trials(deepcopy=False)[trial.number].state.is_finished():
        return
    with contextlib.suppress(UpdateFinishedTrialError):
        trial.set_user_attr("result", result)
        if trial.params and not any(
            t.user_attrs.get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)
        ):
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        study.tell(trial, state=TrialState.FAIL)


def _work_in_processes(plan: _Plan) -> None:
    """``plan.jobs`` spawned workers on one study; Ctrl-C/SIGTERM here stop every worker's trial cleanly.

    Processes, not threads: a trial seeds torch's global generator and draws dropout
    masks from it, which threads would share and make irreproducible.
    """
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker_main, args=(plan, i), name=f"gradwise-sweep-{i}") for i in range(plan.jobs)]
    for process in workers:
        process.start()
    signals = [0]

    def forward(signum: int, frame: Any) -> None:
        signals[0] += 1
        for process in workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # the loop checkpoints and stops; a second one aborts

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for process in workers:
            process.join()
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
    codes = [p.exitcode for p in workers]
    if signals[0] or EXIT_INTERRUPTED in codes:
        raise KeyboardInterrupt
    failed = [f"worker {i} exit code {code}" for i, code in enumerate(codes) if code]
    if failed:
        raise TrainingError(f"sweep: {', '.join(failed)} (its error is printed above); re-run to continue")


def _worker_main(plan: _Plan, worker: int) -> None:
    import torch

    os.setpgrp()  # Ctrl-C reaches the parent alone, which forwards one SIGTERM per worker
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.jobs))

    try:
        with _sigterm_interrupts():
            _work(plan, worker)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM between trials raises KeyboardInterrupt (during one, the loop's own handler stops it cleanly)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
