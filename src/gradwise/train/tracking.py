"""Experiment trackers: TensorBoard event files and MLflow runs, fed from the metrics log.

The run directory stays the record; a tracker only mirrors it. Each tracker
gets every ``metrics.jsonl`` record as the loop writes it (``log``) and the
summary at the end (``finish``):

- kind ``train`` → scalars ``train/loss``, ``train/lr``, ``train/batch_size``,
  ``train/grad_norm`` at the record's ``step``;
- kind ``eval`` → every ``val_*`` metric as ``eval/<metric>`` (e.g.
  ``eval/val_accuracy``);
- at the end, the summary's final metrics as ``final/<metric>`` and the best
  monitored value as ``best/<monitor>``.

Resuming (``resume=True``) continues the same history without duplicates: the
first record after a resume tells the step the run restarts at, and everything
before it is re-read from ``metrics.jsonl`` (already cut back to the
checkpoint), so nothing a kill lost from a tracker's buffer is missing.
TensorBoard's writer purges what the killed process had written
(``purge_step``) and gets the whole history again; MLflow keeps what it has and
skips every (metric, step) it already holds — a resumed run is bit-for-bit the
same, so the skipped values are equal.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from gradwise.config import RunConfig
from gradwise.errors import ConfigError
from gradwise.store.rundir import read_metrics

MLFLOW_RUN_ID_FILE = "mlflow_run_id"
TRAIN_SCALARS = ("loss", "lr", "batch_size", "grad_norm")
# MLflow's log_batch accepts at most 1000 metrics and 100 params per call.
_METRIC_BATCH = 500
_PARAM_BATCH = 100
_PARAM_MAX_CHARS = 6000
# new_run_dir appends -YYYYmmdd-HHMMSS[-N] to the recipe's name; the experiment is the recipe.
_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")


class Tracker(Protocol):
    """What the loop calls: one ``log`` per metrics record, one ``finish`` at the end."""

    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None: ...


# Optional extras: config switch -> (module that must import, the extra that installs it).
_EXTRAS = {"log.tensorboard": ("tensorboard", "tracking"), "log.mlflow": ("mlflow", "tracking")}


def require_extras(cfg: RunConfig) -> None:
    """Refuse, before anything is written, a tracker whose library is not installed (one line: what to install).

    Raises:
        ConfigError: naming the switch and the ``pip install 'gradwise[...]'`` that provides it.
    """
    import importlib.util

    asked = {"log.tensorboard": cfg.log.tensorboard, "log.mlflow": bool(cfg.log.mlflow)}
    for switch, (module, extra) in _EXTRAS.items():
        if asked[switch] and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{switch} needs the {module} package, which is not installed: pip install 'gradwise[{extra}]'"
            )


def open_trackers(cfg: RunConfig, run_dir: Path, *, resume: bool) -> list[Tracker]:
    """The trackers ``cfg.log`` asks for, opened (MLflow checked) before training starts.

    Args:
        cfg: The run config (``log.tensorboard``, ``log.mlflow``, ``out_dir``, ``name``).
        run_dir: The run directory; TensorBoard writes to ``run_dir/tensorboard``.
        resume: The run continues from a checkpoint; continue the same tracker runs.

    Returns:
        Zero, one or two trackers.

    Raises:
        ConfigError: ``log.mlflow`` names an unsupported or unreachable tracking store.
    """
    require_extras(cfg)
    trackers: list[Tracker] = []
    if cfg.log.mlflow:
        # First: a bad URI must fail before TensorBoard creates any file.
        trackers.append(MlflowTracker(cfg, run_dir, resume=resume))
    if cfg.log.tensorboard:
        trackers.insert(0, TensorBoardTracker(run_dir, resume=resume))
    return trackers


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracker scalars of one metrics record (tag → value); non-numbers and other kinds give none."""
    kind = record.get("kind")
    if kind == "train":
        picked = {f"train/{k}": record.get(k) for k in TRAIN_SCALARS}
    elif kind == "eval":
        picked = {f"eval/{k}": v for k, v in record.items() if k.startswith("val_")}
    else:
        return {}
    return {tag: float(v) for tag, v in picked.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """``final/<metric>`` for each final metric, ``best/<monitor>`` and the run's speed and length."""
    out: dict[str, float] = {}
    for key, value in (summary.get("final") or {}).items():
        if _is_number(value):
            out[f"final/{key}"] = float(value)
    best = summary.get("best") or {}
    if summary.get("monitor") and _is_number(best.get("value")):
        out[f"best/{summary['monitor']}"] = float(best["value"])
    for key in ("wall_time_s", "examples_per_s", "steps"):
        if _is_number(summary.get(key)):
            out[f"run/{key}"] = float(summary[key])
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Backfill:
    """On resume, replays the ``metrics.jsonl`` records before the first new step exactly once."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.run_dir = run_dir
        self.pending = resume

    def before(self, step: int | None) -> list[dict[str, Any]]:
        """Records older than ``step`` (all of them when None) the first time after a resume, else none."""
        if not self.pending:
            return []
        self.pending = False
        train, evals = read_metrics(self.run_dir)
        records = sorted(train + evals, key=lambda r: (r["step"], r.get("kind") == "eval"))
        return [r for r in records if step is None or r["step"] < step]


class TensorBoardTracker:
    """Scalars into ``run_dir/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, run_dir: Path, *, resume: bool) -> None:
        self.log_dir = run_dir / "tensorboard"
        self._backfill = _Backfill(run_dir, resume)
        self._resume = resume
        self._writer: Any = None

    def _open(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, purge_step=1 hides everything the earlier process wrote (TensorBoard drops events at
        # steps >= 1 written before this file); the full history is written again below.
        return SummaryWriter(str(self.log_dir), purge_step=1 if self._resume else None)

    def log(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._open()
            for old in self._backfill.before(record.get("step")):
                self._write(old)
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=record["step"])
        if record.get("kind") == "eval":
            self._writer.flush()  # evaluations are rare: keep the files current for a live TensorBoard

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        if self._writer is None:  # a resumed run that had nothing left to do still gets its history
            self._writer = self._open()
            for old in self._backfill.before(None):
                self._write(old)
        step = int(summary.get("steps") or 0)
        for tag, value in summary_scalars(summary).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.add_text("run/status", f"{summary.get('status')}: {summary.get('stop_reason', '')}", step)
        self._writer.close()


class MlflowTracker:
    """One MLflow run per run directory: config as params, every metric, summary and plots as artifacts.

    Talks to the store through ``MlflowClient`` only (no ``mlflow.start_run`` global state), so runs in
    parallel threads of one process do not mix.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool) -> None:
        self.uri = tracking_uri(cfg.log.mlflow or "local", cfg.out_dir)
        self._backfill = _Backfill(run_dir, resume)
        self._buffer: list[Any] = []
        self._logged: dict[str, int] = {}  # metric → last step the store holds (resume)
        self.client, self.run_id = self._start(cfg, run_dir, resume)

    def _start(self, cfg: RunConfig, run_dir: Path, resume: bool) -> tuple[Any, str]:
        _check_reachable(self.uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        id_file = run_dir / MLFLOW_RUN_ID_FILE
        try:
            client = MlflowClient(tracking_uri=self.uri)
            if resume and id_file.is_file():
                run_id = id_file.read_text().strip()
                try:
                    run = client.get_run(run_id)
                except MlflowException:
                    run = None  # deleted from the store, or another store: start a new run below
                if run is not None:
                    client.update_run(run_id, status="RUNNING")
                    self._logged = {key: _last_step(client, run_id, key) for key in run.data.metrics}
                    self._log_params(client, run_id, cfg, skip=set(run.data.params))
                    return client, run_id
            experiment_id = _experiment(client, self.uri, experiment_name(cfg, run_dir))
            run = client.create_run(experiment_id, run_name=run_dir.name, tags={"gradwise.run_dir": str(run_dir)})
            run_id = run.info.run_id
            self._log_params(client, run_id, cfg, skip=set())
        except Exception as exc:  # a bad store surfaces as MlflowException, SQLAlchemy or OS errors alike
            raise ConfigError(f"log.mlflow: {cfg.log.mlflow!r} cannot be used: {_first_line(str(exc))}") from None
        from gradwise.store.files import atomic_write_text

        atomic_write_text(id_file, run_id + "\n")
        return client, run_id

    def _log_params(self, client: Any, run_id: str, cfg: RunConfig, skip: set[str]) -> None:
        from mlflow.entities import Param

        # Params are immutable in MLflow: on resume only keys it lacks are added (stop.* may change).
        params = [Param(k, v) for k, v in flatten_config(cfg).items() if k not in skip]
        for i in range(0, len(params), _PARAM_BATCH):
            client.log_batch(run_id, params=params[i : i + _PARAM_BATCH])

    def log(self, record: dict[str, Any]) -> None:
        for old in self._backfill.before(record.get("step")):
            self._add(old)
        self._add(record)
        # Flushed at evaluations (rare) and in batches: one database round trip per step would slow the loop.
        if record.get("kind") == "eval" or len(self._buffer) >= _METRIC_BATCH:
            self._flush()

    def _add(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(record["step"]), int(time.time() * 1000)
        for key, value in scalars(record).items():
            if step > self._logged.get(key, 0):
                self._buffer.append(Metric(key, value, now, step))

    def _flush(self) -> None:
        for i in range(0, len(self._buffer), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=self._buffer[i : i + _METRIC_BATCH])
        self._buffer = []

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        from mlflow.entities import Metric, RunTag

        for old in self._backfill.before(None):
            self._add(old)
        step, now = int(summary.get("steps") or 0), int(time.time() * 1000)
        self._buffer += [Metric(k, v, now, step) for k, v in summary_scalars(summary).items()]
        self._flush()
        status = str(summary.get("status", ""))
        tags = [RunTag("gradwise.status", status), RunTag("gradwise.stop_reason", str(summary.get("stop_reason", "")))]
        self.client.log_batch(self.run_id, tags=tags)
        for name in ("config.yaml", "summary.json"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "plots"), artifact_path="plots")
        # An interrupted run is KILLED: resuming it sets it RUNNING again and continues the same history.
        ended = {"failed": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED")
        self.client.set_terminated(self.run_id, status=ended)


def tracking_uri(value: str, out_dir: Path) -> str:
    """``log.mlflow`` as a tracking URI; ``local`` is an SQLite store ``<out_dir>/mlruns.db``.

    MLflow 3 refuses its file store (``./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE=true`` (it is in
    maintenance mode), so the local default is its recommended SQLite database instead.
    """
    if value == "local":
        path = Path(out_dir).resolve() / "mlruns.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return value


def experiment_name(cfg: RunConfig, run_dir: Path) -> str:
    """The recipe/run name: ``cfg.name``, else the run directory's name without its timestamp."""
    return cfg.name or _STAMP.sub("", run_dir.name) or run_dir.name


def flatten_config(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as ``section.key → text`` params (lists and mappings as their repr)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = str(node)[:_PARAM_MAX_CHARS]

    walk(cfg.model_dump(mode="json", exclude={"resume", "variants"}), "")
    return out


def _experiment(client: Any, uri: str, name: str) -> str:
    """The experiment's id, created when missing (artifacts beside an SQLite store, not in the cwd)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):
        # MLflow's default artifact root is ./mlruns relative to the working directory.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:  # created meanwhile by a parallel run (a sweep with jobs > 1)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _last_step(client: Any, run_id: str, key: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


def _check_reachable(uri: str) -> None:
    """Fail fast on an HTTP store nobody answers at: MLflow's own retries take minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
    except urllib.error.HTTPError:
        return  # something answered; MLflow reports what is wrong with it
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"log.mlflow: tracking server {uri} is unreachable ({reason})") from None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line if len(line) <= 300 else line[:297] + "..."
