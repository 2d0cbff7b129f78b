"""The run directory: the contract between training and everything downstream.

``runs/<name>/`` holds ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one JSON object per optimizer step and per evaluation), ``summary.json``,
``checkpoints/`` and ``plots/``. Eval, compare, report and resume read this
directory and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from gradwise.config import RunConfig, to_yaml
from gradwise.errors import CheckpointError, GradwiseWarning
from gradwise.store import lock as run_lock
from gradwise.store.files import atomic_write_text, read_text, storage_error

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def new_run_dir(cfg: RunConfig, default_name: str) -> Path:
    """A fresh ``<out_dir>/<name>-<timestamp>`` directory (the name is used as-is when given).

    A named directory that holds a run refuses; one left by a run that never got to its first step
    (only gradwise's own files, no checkpoint, no summary) is cleared and reused.

    Raises:
        CheckpointError: a run of that name exists, or the directory holds files that are not a run's.
        StorageError: ``out_dir`` cannot be created (a file in the way, no permission, read-only).
    """
    try:
        if cfg.name:
            path = cfg.out_dir / cfg.name
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise CheckpointError(f"{path}: exists and is not a run directory; pick another name or out_dir")
            if path.is_dir() and any(path.iterdir()):
                if (path / "checkpoints").exists() or (path / SUMMARY_FILE).exists():
                    if not _has_commit(path / "checkpoints") and not (path / SUMMARY_FILE).exists():
                        raise CheckpointError(
                            f"{path}: a run of this name stopped before its first checkpoint (nothing to resume); "
                            "remove it or pick another name"
                        )
                    raise CheckpointError(
                        f"{path}: a run with this name exists; resume it with resume={path} or pick a name"
                    )
                with run_lock.holding(path):  # a run starting under this name right now holds it
                    discarded = discard_unstarted_run(path)
                if not discarded:
                    raise CheckpointError(f"{path}: exists and holds files that are not a run's; pick another name")
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            path = cfg.out_dir / f"{default_name}-{stamp}"
            suffix = 1
            while path.exists():
                suffix += 1
                path = cfg.out_dir / f"{default_name}-{stamp}-{suffix}"
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, exc.filename or cfg.out_dir) from None
    return path


def _has_commit(root: Path) -> bool:
    """Whether a ``checkpoints/`` directory holds a committed checkpoint (a manifest, or an old run's links)."""
    return (root / "manifest.json").is_file() or any((root / tag).is_symlink() for tag in ("last", "best"))


# What a run writes before its first step; a directory holding only these never trained.
_UNSTARTED_FILES = {CONFIG_FILE, METRICS_FILE, "data_info.json", "tokenizer", ".lock", "plots", "tensorboard"}


def clear_for_new_run(run_dir: Path) -> None:
    """Remove an earlier attempt's checkpoints and metrics from a directory a new run trains into.

    Callers that retrain a directory from scratch (a compare seed or a compress step whose first attempt
    was killed) must not have the old attempt's committed checkpoints reused as the new run's.
    """
    if (run_dir / "checkpoints").is_dir() and not (run_dir / "checkpoints").is_symlink():
        shutil.rmtree(run_dir / "checkpoints")
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def discard_unstarted_run(run_dir: Path) -> bool:
    """Remove a run directory that never reached its first step; False (and nothing removed) if it holds more.

    Only gradwise's own files are removed, so a directory a user named by mistake is never emptied.
    """
    if not run_dir.is_dir() or run_dir.is_symlink():
        return False
    entries = list(run_dir.iterdir())
    if any(entry.name not in _UNSTARTED_FILES for entry in entries):
        return False
    if (run_dir / METRICS_FILE).is_file() and '"kind": "train"' in (run_dir / METRICS_FILE).read_text(errors="replace"):
        return False  # it took steps: what it logged is worth keeping
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass
    return True


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, to_yaml(cfg))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(_finite(summary), indent=2) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    file = run_dir / SUMMARY_FILE
    try:
        return json.loads(read_text(file, what="summary"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the run has not finished") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: corrupt ({exc})") from None


def _finite(obj: Any) -> Any:
    # JSON has no NaN/Infinity; write null so every JSON reader can load the summary.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a run's ``metrics.jsonl`` into train lines and eval lines, each sorted by step.

    Unparseable lines (the truncated last line of a killed run) are skipped. A resumed
    run re-logs the steps after its last checkpoint; the later line of a step wins.

    Args:
        run_dir: The run directory.

    Returns:
        ``(train_lines, eval_lines)``; both empty when there is no ``metrics.jsonl``.

    Raises:
        CheckpointError: ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], []
    train: dict[int, dict[str, Any]] = {}
    evals: dict[tuple[int, str], dict[str, Any]] = {}
    with path.open(encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict) or not isinstance(line.get("step"), int):
                continue
            if line.get("kind") == "train":
                train[line["step"]] = line
            elif line.get("kind") == "eval":
                evals[(line["step"], str(line.get("split", "val")))] = line
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


class MetricsLog:
    """Appends one JSON line per record to ``metrics.jsonl``.

    Lines are buffered and flushed at evaluations and checkpoints, so logging
    every step costs almost nothing on the hot path. On resume the log is cut
    back to the checkpoint's step, so a killed run never leaves duplicates.
    Each record is also handed to every ``listeners`` callable (experiment
    trackers: TensorBoard, MLflow), so they see exactly what the file holds.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        listeners: Sequence[Callable[[dict[str, Any]], None]] = (),
        file: str = METRICS_FILE,
    ) -> None:
        self.path = run_dir / file
        self.listeners = list(listeners)
        if resume_step is not None:
            self._truncate_after(resume_step)
        try:
            self._handle: IO[str] = open(self.path, "a", buffering=1 << 16)  # closed in close()
        except OSError as exc:
            raise storage_error(exc, self.path) from None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise storage_error(exc, self.path) from None
        for listener in self.listeners:
            listener(record)

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError as exc:
            raise storage_error(exc, self.path) from None

    def sync(self) -> None:
        """Flush and fsync: every line written so far survives a crash."""
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            raise storage_error(exc, self.path) from None

    def close(self) -> None:
        """Close the log; lines that cannot be written any more (a full disk) are dropped, not raised again.

        Called on the way out of a failed run too, where the first error is the one to report.
        """
        try:
            self._handle.close()
        except OSError:
            pass


# Schedules whose shape is stretched over the whole run's length.
_BUDGET_SCHEDULES = ("linear", "cosine", "polynomial", "wsd", "onecycle")
# Fields a resumed run may change: the training budget and how it is shown.
# How the ranks share the run may change (started on one process, continued fully sharded); its numerics may not.
_RESUMABLE_CHANGES = (
    "stop.epochs",
    "stop.max_steps",
    "log.",
    "name",
    "out_dir",
    "description",
    "distributed.strategy",
    "distributed.reshard_after_forward",
    "distributed.cpu_offload",
    "distributed.timeout_s",
)


def check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume ``run_dir`` with a config that would change the optimization it started."""
    from gradwise.config import read_saved_config, validate

    saved_file = run_dir / CONFIG_FILE
    if not saved_file.exists():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    saved = validate(read_saved_config(saved_file), source=str(saved_file))
    for path, (old, new) in config_differences(saved.model_dump(mode="json"), cfg.model_dump(mode="json")).items():
        if path.startswith("stop.") and (cfg.schedule.name in _BUDGET_SCHEDULES or cfg.schedule.warmup_fraction):
            what = "schedule" if cfg.schedule.name in _BUDGET_SCHEDULES else "schedule's warmup (warmup_fraction)"
            warnings.warn(
                f"resuming with {path}={new!r} (was {old!r}) re-times the rest of the {cfg.schedule.name!r} "
                f"{what}, whose length follows the training budget",
                GradwiseWarning,
                stacklevel=2,
            )
        if path == "resume" or path.startswith(_RESUMABLE_CHANGES):
            continue
        raise CheckpointError(
            f"{run_dir}: cannot resume with {path}={new!r}; the run was started with {old!r} "
            f"(only {', '.join(_RESUMABLE_CHANGES)} may change)"
        )


def config_differences(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted path → (old, new) for every leaf where two dumped configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for key in old.keys() | new.keys():
            found.update(config_differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return found
    return {} if old == new else {prefix.rstrip("."): (old, new)}
