"""``load_dataset``: from a data config to standardized tensors in train/val/test splits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gradwise.config.kinds import DATA, DataSection
from gradwise.data.bundled import load_bundled
from gradwise.data.files import load_file
from gradwise.data.sources import FileData, TabularData
from gradwise.data.splits import Standardizer, split_indices
from gradwise.data.targets import encode_target
from gradwise.data.types import DataInfo, Dataset, RawData, Split
from gradwise.errors import ConfigError

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
    """A file's rows: tokenized text when ``data.text`` names a column, numeric columns otherwise."""
    if cfg.text is not None:
        from gradwise.data.text import build_text_dataset

        return build_text_dataset(cfg, task_kind, seed, tokenizer_dir)
    return _tabular(load_file(cfg), cfg, task_kind, seed)


def load_tabular(cfg: TabularData, task_kind: TaskKindSetting, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """A bundled set (scikit-learn's, or the synthetic line), coded, split and standardized.

    The first ``cfg.limit`` rows are kept (if set), the target is coded (see
    :mod:`gradwise.data.targets` for how ``auto`` decides the kind), the rows are
    split by the seed (stratified for classification, see :mod:`gradwise.data.splits`)
    and, if ``cfg.standardize``, features are standardized with training statistics.
    """
    return _tabular(load_bundled(cfg, seed), cfg, task_kind, seed)


def _tabular(raw: RawData, cfg: TabularData, task_kind: TaskKindSetting, seed: int) -> Dataset:
    if task_kind in ("language_modeling", "ranking"):
        kind_needs = "a text corpus (data.name=python_source)" if task_kind == "language_modeling" else "interactions"
        raise ConfigError(f"task.kind {task_kind!r} needs {kind_needs}; data {cfg.name!r} is not one")
    y, kind, class_names = encode_target(raw, task_kind)
    train, val, test = split_indices(
        len(y),
        y if kind == "classification" else None,
        cfg.val_fraction,
        cfg.test_fraction,
        seed,
        raw.source,
        class_names,
    )
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
    )
    return Dataset(
        train=_split(x, y, train, kind),
        val=_split(x, y, val, kind),
        test=_split(x, y, test, kind),
        info=info,
    )


def _split(x: np.ndarray, y: np.ndarray, rows: np.ndarray, kind: str) -> Split:
    features = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32))
    if kind == "classification":
        return Split(x=features, y=torch.from_numpy(y[rows].astype(np.int64)))
    return Split(x=features, y=torch.from_numpy(y[rows].astype(np.float32).reshape(-1, 1)))
