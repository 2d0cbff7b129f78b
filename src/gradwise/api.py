"""The Python API for notebooks and scripts: ``gradwise.train`` and ``gradwise.load`` return a :class:`Run`.

It is the CLI's work without the command line: ``train`` validates the same
config (a bundled recipe's name, a YAML file or a dict, with overrides), trains
with the one loop into a run directory and returns that directory as a
:class:`Run`; ``load`` opens a finished (or compressed) run. A run predicts
new rows as ``gradwise predict`` does and evaluates its splits as ``gradwise
eval`` does. Errors are raised as :class:`gradwise.errors.GradwiseError`
(``ConfigError``, ``DataError`` …) with the one-line message the CLI prints.

Example::

    import gradwise

    run = gradwise.train("tabular", stop={"epochs": 20}, name="penguins")
    run.summary["final"]["test_accuracy"]
    run.predict("new_penguins.csv")  # a DataFrame: 'prediction' per row
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradwise.train as _train_package  # the loop's package: also the name of the API's entry point, below
from gradwise.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from torch import nn

    from gradwise.config import RunConfig


def train(recipe: str | Path | Mapping[str, Any], **overrides: Any) -> Run:
    """Train ``recipe`` and return its run.

    Args:
        recipe: A bundled recipe's name (``"tabular"``, see ``gradwise recipes``), a YAML file, or the
            config itself as a dict.
        overrides: Config fields to change, as the CLI's ``key.path=value``: a section as a dict
            (``optim={"name": "adamw", "lr": 3e-3}``), a field with ``__`` for the dot
            (``optim__lr=3e-3``), or top-level fields (``seed=1``, ``name="mine"``, ``out_dir="runs"``).

    Raises:
        ConfigError: a bad recipe or override (the message names the key); ``variants`` (a comparison
            of several runs) and several processes are the CLI's (``gradwise train``, ``--nproc``).
        DataError: the data cannot be read; the message names the file and row.
    """
    from gradwise.config import deep_copy, read_yaml, set_path, validate
    from gradwise.experiments.recipes import find_recipe

    if isinstance(recipe, Mapping):
        raw, source, stem = deep_copy(dict(recipe)), "config", "run"
    else:
        path = find_recipe(str(recipe))
        raw, source, stem = read_yaml(path), str(path), path.stem
    for key, value in _flat_overrides(overrides):
        set_path(raw, key, value)
    cfg = validate(raw, source=source)
    if cfg.variants:
        raise ConfigError(f"{source}: variants compare several runs; use the CLI: gradwise train {source}")
    from gradwise.report.hooks import plotting_hooks
    from gradwise.store.rundir import check_resumable, new_run_dir
    from gradwise.train.loop import fit
    from gradwise.train.tracking import require_extras

    require_extras(cfg)
    if cfg.resume is not None:
        check_resumable(cfg.resume, cfg)
        fit(cfg, cfg.resume, resume=True, hooks=plotting_hooks(cfg.log.plots))
        return Run(cfg.resume)
    run_dir = new_run_dir(cfg, stem)
    fit(cfg, run_dir, hooks=plotting_hooks(cfg.log.plots))
    return Run(run_dir)


def load(run_dir: str | Path) -> Run:
    """Open a run directory (a trained run, or a compressed variant under ``RUN/compressed/``).

    Raises:
        CheckpointError: ``run_dir`` is not a run directory.
    """
    return Run(Path(run_dir))


class Run:
    """A run directory and what can be done with it from Python.

    Attributes:
        dir: The run directory.
    """

    def __init__(self, run_dir: Path) -> None:
        from gradwise.store.rundir import CONFIG_FILE

        if not (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
        self.dir = run_dir
        self._model: nn.Module | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    @property
    def summary(self) -> dict[str, Any]:
        """The run's ``summary.json``: status, final metrics, parameters, timings (read fresh on each access)."""
        from gradwise.store.rundir import SUMMARY_FILE

        path = self.dir / SUMMARY_FILE
        if not path.is_file():
            raise CheckpointError(f"{self.dir}: no {SUMMARY_FILE} (the run has not finished; resume it)")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable summary ({exc})") from None

    @property
    def config(self) -> RunConfig:
        """The validated config the run was trained with."""
        from gradwise.config import read_saved_config, validate
        from gradwise.store.rundir import CONFIG_FILE

        return validate(read_saved_config(self.dir / CONFIG_FILE), source=str(self.dir / CONFIG_FILE))

    @property
    def model(self) -> nn.Module:
        """The model with the best checkpoint's weights, in eval mode (loaded once)."""
        if self._model is None:
            from gradwise.compress.runs import load_run_model

            self._model = load_run_model(self.dir, "best", with_data=False)[2]
        return self._model

    def predict(
        self,
        data: str | Path | pd.DataFrame | np.ndarray | Mapping[str, Any],
        *,
        checkpoint: str = "best",
        proba: bool = False,
    ) -> pd.DataFrame:
        """Predict new rows, as ``gradwise predict`` does.

        Args:
            data: A file (CSV, JSONL, Parquet, NPZ), a DataFrame, a mapping of columns, or an array of
                images / feature rows for a run on arrays.
            checkpoint: ``best`` or ``last``.
            proba: Add one ``probability_<class>`` column per class.

        Returns:
            A DataFrame in the input's row order: the run's id columns, ``prediction`` and the probabilities;
            ``.attrs["metrics"]`` holds the metrics when ``data`` has the target column (else None) and
            ``.attrs["unknown"]`` the per-column count of categories never seen in training.
        """
        import pandas as pd

        from gradwise.experiments.predict import predict_table

        predictions = predict_table(self.dir, _as_table(data), checkpoint, proba=proba)
        # A DataFrame's own index comes back, so predictions align with (and can be assigned to) its rows.
        frame = pd.DataFrame(predictions.columns, index=data.index if isinstance(data, pd.DataFrame) else None)
        frame.attrs["metrics"] = predictions.metrics
        frame.attrs["unknown"] = predictions.unknown
        return frame

    def evaluate(self, split: str = "test", *, checkpoint: str = "best") -> dict[str, float]:
        """The metrics of ``split`` (``test``, ``val`` or ``train``), as ``gradwise eval --json`` prints them."""
        from gradwise.experiments.evaluation import evaluate_run

        if split not in ("test", "val", "train"):
            raise ConfigError(f"split {split!r}: expected test, val or train")
        return evaluate_run(self.dir, checkpoint=checkpoint, split=split).metrics


def _flat_overrides(overrides: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"optim": {"lr": 1}, "stop__epochs": 3}`` as ``[("optim.lr", 1), ("stop.epochs", 3)]``, a component's
    ``name`` first (switching a component drops the old one's fields, so the new fields must come after)."""
    flat: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        path = prefix + key.replace("__", ".")
        if isinstance(value, Mapping) and value:
            flat += _flat_overrides(value, path + ".")
        else:
            flat.append((path, value))
    return sorted(flat, key=lambda item: not item[0].endswith(".name"))


def _as_table(data: Any) -> Any:
    """``data`` as a :class:`gradwise.data.readers.Table` (files are read by their suffix)."""
    import numpy as np
    import pandas as pd

    from gradwise.data.files import frame_table
    from gradwise.data.readers import Table, detect_format, read_table

    if isinstance(data, (str, Path)):
        path = Path(data)
        return read_table(path, detect_format(path, "auto"))
    if isinstance(data, pd.DataFrame):
        return frame_table(data, "DataFrame")
    if isinstance(data, np.ndarray):
        return Table("array", {"x": data}, lambda i: f"index {i}")
    if isinstance(data, Mapping):
        return frame_table(pd.DataFrame(dict(data)), "columns")
    raise ConfigError(
        f"predict: expected a file, a DataFrame, a mapping of columns or an array; got {type(data).__name__}"
    )


class _TrainPackage(types.ModuleType):
    """``gradwise.train`` is both the loop's package and the API's entry point.

    Importing any ``gradwise.train.*`` module binds the package as the attribute ``gradwise.train``,
    so a plain function of that name could never be reached; the package is made callable instead:
    ``gradwise.train("tabular")`` calls :func:`train` and ``gradwise.train.loop`` is still the loop.
    """

    def __call__(self, recipe: str | Path | Mapping[str, Any], **overrides: Any) -> Run:
        return train(recipe, **overrides)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickled by name (a process pool handed gradwise.train): unpickling imports the same package.
        import importlib

        return importlib.import_module, (self.__name__,)


_TrainPackage.__call__.__doc__ = train.__doc__
sys.modules[_train_package.__name__].__class__ = _TrainPackage
