"""A user's file as numeric features and a clean target column.

``data.features`` names the feature columns (None: every column except
``data.target``, those in ``data.exclude`` and those that look like row ids,
which are left out with a warning: on a file sorted by class an id column
alone predicts the label). A feature must hold finite numbers in every row; the target
may hold numbers, strings or booleans but no empty cells. In an NPZ archive a
2-D array used as a feature contributes all its columns (named ``key[j]``); a
3-D ``(N, H, W)`` or 4-D ``(N, C, H, W)`` array that is the only feature is an
image, flattened, and its shape is kept for the CNN.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from gradwise.data.readers import Table, detect_format, read_table
from gradwise.data.sources import FileData, TableData
from gradwise.data.types import RawData
from gradwise.errors import ConfigError, DataError, GradwiseWarning

_MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "null", "none", "#n/a"})


@dataclass(frozen=True)
class FileColumns:
    """A file's table with the columns a run reads from it.

    Attributes:
        table: Every column as read.
        features: The feature columns, in the file's order (or ``data.features``' order).
        target: The target column.
        rows: How many rows are used (the first ``data.limit``, or all).
        left_out: Columns left out of the features because they look like row ids: ``{"name", "kind", "reason"}``.
    """

    table: Table
    features: list[str]
    target: str
    rows: int
    left_out: list[dict[str, str]]
    kept: np.ndarray | None = None

    def values(self, name: str) -> np.ndarray:
        """Column ``name``'s used rows."""
        values = np.asarray(self.table.column(name))[: self.rows]
        return values if self.kept is None else values[self.kept]

    def locate(self, i: int) -> str:
        """Where the user finds used row ``i`` in the file."""
        return self.table.locate(i if self.kept is None else int(self.kept[i]))

    def file_rows(self, rows: np.ndarray) -> np.ndarray:
        """Used row indices as row indices of the table as read (they differ when rows were dropped)."""
        return rows if self.kept is None else self.kept[rows]

    def with_target(self) -> FileColumns:
        """The rows whose target has a value (rows without one are left out, with a warning)."""
        target = np.asarray(self.table.column(self.target))[: self.rows]
        if target.ndim != 1:
            return self
        values = target.tolist()
        missing = np.array([_no_value(v) for v in values], dtype=bool)
        # "NA" may name a class, but in a column of numbers it is R's (or a spreadsheet's) gap.
        tokens = np.array([_is_missing(v) for v in values], dtype=bool) & ~missing
        if tokens.any():
            rest = np.array([v for v, gap in zip(values, missing | tokens, strict=True) if not gap], dtype=object)
            if rest.size and np.isfinite(_parse_numbers(rest)).all():
                missing |= tokens
        if not missing.any():
            return self
        kept = np.flatnonzero(~missing)
        gaps = int(missing.sum())
        rows = "1 row has" if gaps == 1 else f"{gaps} rows have"
        first = "" if gaps == 1 else "the first: "
        warnings.warn(
            f"{self.table.source}: {rows} no value in the target {self.target!r} "
            f"({first}{self.table.locate(int(np.flatnonzero(missing)[0]))}); "
            f"{'it is' if gaps == 1 else 'they are'} left out",
            GradwiseWarning,
            stacklevel=2,
        )
        return replace(self, kept=kept)

    def is_array_block(self) -> bool:
        """Whether some feature is a 2-D or larger NPZ array (a matrix or an image), not a table column."""
        return any(np.asarray(self.table.column(name)).ndim > 1 for name in self.features)


def read_file(cfg: FileData) -> Table:
    """The table at ``cfg.path``."""
    if cfg.path is None:  # the config validator already demands it; this keeps the type checker honest
        raise ConfigError("data.path is required when data.name is 'file'")
    return read_table(cfg.path, detect_format(cfg.path, cfg.format))


def select_columns(cfg: TableData, table: Table) -> FileColumns:
    """Pick a table's target and feature columns as ``cfg`` says.

    Raises:
        DataError: a named column is missing or unusable; the message names the file and column.
        ConfigError: ``data.features`` contradicts itself (repeats a name or includes the target).
    """
    target = _target_name(cfg, table)
    for name in cfg.columns:
        if name not in table.names:
            raise DataError(
                f"{table.source}: no column {name!r} (data.columns); available columns: {available(table.names)}"
            )
        if name == target:
            raise ConfigError(f"data.columns.{name}: {name!r} is the target (data.target); its kind is the task's")
    features, left_out = _feature_names(cfg, table, target)
    n_rows = _common_length(table, [*features, target])
    if n_rows == 0:
        raise DataError(f"{table.source}: has columns but no rows")
    keep = n_rows if cfg.limit is None else min(cfg.limit, n_rows)
    return FileColumns(table, features, target, keep, left_out)


def frame_table(frame: pd.DataFrame, source: str) -> Table:
    """A pandas frame as a Table: numeric and boolean columns keep their dtype, others are object arrays."""
    columns: dict[str, np.ndarray] = {}
    for name in frame.columns:
        series = frame[name]
        kind = series.dtype.kind
        columns[str(name)] = series.to_numpy() if kind in "biufM" else series.to_numpy(dtype=object)
    return Table(source, columns, lambda i: f"row {i + 1}")


def load_file(cfg: FileData) -> RawData:
    """Read ``cfg.path`` as numeric features and its target (first ``cfg.limit`` rows if set).

    For files whose features are numeric arrays (NPZ matrices and images); a table's columns of any
    kind go through :mod:`gradwise.data.tabular` instead.

    Raises:
        DataError: the file, a column or a value is unusable; the message names the file, column and row.
        ConfigError: ``data.features`` contradicts itself (repeats a name or includes the target).
    """
    return numeric_raw(select_columns(cfg, read_file(cfg)), cfg)


def numeric_raw(picked: FileColumns, cfg: FileData) -> RawData:
    """The picked columns as finite float64 features (every value must be a number) and the target."""
    table, source = picked.table, picked.table.source
    hint = "" if cfg.features is not None else " (set data.features to choose numeric columns)"
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for feature in picked.features:
        block, block_names = feature_block(picked.values(feature), feature, source, table.locate, hint)
        blocks.append(block)
        names.extend(block_names)
    return RawData(
        x=np.concatenate(blocks, axis=1),
        y=clean_target(picked.values(picked.target), picked.target, source, table.locate),
        feature_names=names,
        target_name=picked.target,
        source=source,
        name=cfg.path.name if cfg.path is not None else source,
        image_shape=_image_shape(table, picked.features),
        locate=table.locate,
    )


def feature_block(
    values: np.ndarray, name: str, source: str, locate: Callable[[int], str], hint: str = ""
) -> tuple[np.ndarray, list[str]]:
    """One feature column (or NPZ array) as a float64 ``(N, k)`` block and its ``k`` column names."""
    if values.ndim == 1:
        return to_numbers(values, name, source, locate, hint)[:, None], [name]
    flat = values.reshape(values.shape[0], -1)
    names = [f"{name}[{j}]" for j in range(flat.shape[1])]
    if flat.dtype.kind in "biuf":  # the common case (an NPZ matrix), checked in one pass
        block = flat.astype(np.float64)
        bad = np.argwhere(~np.isfinite(block))
        if bad.size:
            i, j = (int(k) for k in bad[0])
            raise DataError(f"{source}: column {names[j]!r} {locate(i)}: {_describe_bad(flat[i, j])}{hint}")
        return block, names
    columns = [to_numbers(flat[:, j], names[j], source, locate, hint) for j in range(flat.shape[1])]
    return np.stack(columns, axis=1), names


def to_numbers(
    values: np.ndarray, column: str, source: str, locate: Callable[[int], str], hint: str = ""
) -> np.ndarray:
    """A 1-D column as finite float64, or a DataError naming the first bad row and its value."""
    kind = values.dtype.kind
    if kind in "biuf":
        numbers = values.astype(np.float64)
    elif kind in "OUS":
        numbers = _parse_numbers(values)
    else:
        raise DataError(f"{source}: column {column!r} holds {values.dtype} values, not numbers{hint}")
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{source}: column {column!r} {locate(i)}: {_describe_bad(values[i])}{hint}")
    return numbers


def clean_target(values: np.ndarray, column: str, source: str, locate: Callable[[int], str]) -> np.ndarray:
    """The target column, one value per row with none missing; strings are stripped of spaces."""
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        shape = tuple(values.shape)
        raise DataError(f"{source}: target {column!r} has shape {shape}; expected one value per row")
    kind = values.dtype.kind
    if kind in "biuf":
        bad = np.flatnonzero(~np.isfinite(values.astype(np.float64)))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{source}: column {column!r} {locate(i)}: {_describe_bad(values[i])} in the target")
        return values
    if kind not in "OUS":
        raise DataError(f"{source}: target {column!r} holds {values.dtype} values; expected labels or numbers")
    cleaned = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str):
            value = value.strip()
        # Only a truly empty cell is missing here: "NA" or "None" may well be a class name.
        if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
            raise DataError(f"{source}: column {column!r} {locate(i)}: {_describe_bad(value)} in the target")
        if isinstance(value, (list, dict)):
            raise DataError(f"{source}: column {column!r} {locate(i)}: {_show(value)} is not a label or a number")
        cleaned[i] = value
    return cleaned


def parse_number(value: Any) -> float:
    """One value as a float the way a column is parsed: NaN unless it is a number or numeric text."""
    cell = np.empty(1, dtype=object)
    cell[0] = value
    return float(_parse_numbers(cell)[0])


def available(names: list[str], limit: int = 30) -> str:
    """Names for an error message, shortened when there are many."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names)} in all)"


# --------------------------------------------------------------------------- helpers


def _target_name(cfg: TableData, table: Table) -> str:
    names = table.names
    if cfg.target is None:
        raise DataError(f"{table.source}: data.target is required for data.name 'file'; columns: {available(names)}")
    if cfg.target not in names:
        raise DataError(
            f"{table.source}: no column {cfg.target!r} (data.target); available columns: {available(names)}"
        )
    return cfg.target


def _feature_names(cfg: TableData, table: Table, target: str) -> tuple[list[str], list[dict[str, str]]]:
    if cfg.features is None:
        for name in cfg.exclude:
            if name not in table.names:
                names = available(table.names)
                raise DataError(f"{table.source}: no column {name!r} (data.exclude); available columns: {names}")
        features = [name for name in table.names if name != target and name not in cfg.exclude]
        left_out: list[dict[str, str]] = []
        for name in features:
            # A kind set in data.columns is the user's word: only an unset one may be taken for an id.
            reason = _id_reason(table, name) if cfg.columns.get(name, "id") == "id" else None
            if reason is not None:
                left_out.append({"name": name, "kind": "id", "reason": reason})
        features = [name for name in features if name not in {c["name"] for c in left_out}]
        if not features:
            raise DataError(f"{table.source}: no columns besides the target {target!r} to use as features")
        return features, left_out
    if not cfg.features:
        raise ConfigError("data.features is empty; name at least one column (or leave it unset for all)")
    repeated = sorted({name for name in cfg.features if cfg.features.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.features: {repeated[0]!r} is listed more than once")
    if target in cfg.features:
        raise ConfigError(f"data.features includes the target column {target!r} (data.target)")
    for name in cfg.features:
        if name not in table.names:
            names = available(table.names)
            raise DataError(f"{table.source}: no column {name!r} (data.features); available columns: {names}")
    return list(cfg.features), []


def _common_length(table: Table, names: list[str]) -> int:
    lengths = {name: int(table.column(name).shape[0]) for name in names}
    first = names[-1]  # the target
    for name, length in lengths.items():
        if length != lengths[first]:
            raise DataError(f"{table.source}: {name!r} has {length} rows but {first!r} has {lengths[first]}")
    return lengths[first]


def _image_shape(table: Table, features: list[str]) -> tuple[int, int, int] | None:
    if len(features) != 1:
        return None
    shape = table.column(features[0]).shape[1:]
    if len(shape) == 2:
        return (1, int(shape[0]), int(shape[1]))
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    return None


def _parse_numbers(values: np.ndarray) -> np.ndarray:
    """Parse text or JSON values as numbers (JSON true/false as 1/0); anything else becomes NaN."""
    texts = np.empty(len(values), dtype=object)
    texts[:] = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in values.tolist()]
    numbers = np.full(len(values), np.nan)
    flags = np.array([isinstance(v, bool) for v in texts], dtype=bool)
    numbers[flags] = texts[flags].astype(np.float64)
    plain = np.array([isinstance(v, str | int | float) and not isinstance(v, bool) for v in texts], dtype=bool)
    if plain.any():
        numbers[plain] = pd.to_numeric(pd.Series(texts[plain], dtype=object), errors="coerce").to_numpy(np.float64)
    return numbers


def _no_value(value: Any) -> bool:
    """An empty target cell: None, NaN or blank text (a text such as "NA" may be a class name)."""
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_TOKENS


def _describe_bad(value: Any) -> str:
    if isinstance(value, str) and not value.strip():
        return "empty cell"
    if _is_missing(value) or (isinstance(value, np.floating) and np.isnan(value)):
        return f"missing value ({_show(value)})"
    if np.isinf(parse_number(value)):
        return f"{_show(value)} is not a finite number"
    return f"{_show(value)} is not a number"


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Column names that say "row number" (R's write.csv writes "rownames", pandas' to_csv an unnamed index).
_ID_NAMES = frozenset({"id", "rownames", "row", "row_id", "index", "unnamed: 0", ""})
# Rows a column's values need before they can mark it as an id.
_ID_ROWS = 20


def row_id_reason(name: str, values: np.ndarray) -> str | None:
    """Why the column looks like a row id (named like one; over at least ``_ID_ROWS`` rows, integers that
    rise or fall by one every row, or a distinct text in every row), or None. Unique floats are not ids:
    a continuous measurement is unique per row too; and a handful of rows says nothing either way."""
    if values.ndim != 1:
        return None
    key = name.strip().lower()
    if key in _ID_NAMES or key.endswith("_id"):
        return "named like an id"
    if len(values) < _ID_ROWS:
        return None
    numbers = _parse_numbers(values.astype(object))
    if np.all(np.isfinite(numbers)):
        steps = np.diff(numbers)
        if np.all(steps == 1) or np.all(steps == -1):
            return "an integer counting the rows"
        return None
    # A distinct one-word text in every row ("A7-113") is a key; distinct sentences are free text.
    if np.all(np.isnan(numbers)) and len({str(v) for v in values}) == len(values):
        from gradwise.data.columns import looks_like_dates, texts  # columns builds on this module

        cells = [c for c in texts(values) if c is not None]
        if np.median([len(c.split()) for c in cells]) < 2 and not looks_like_dates(cells):
            return "a different text in every row"  # one date per row is a daily series, not a key
    return None


def _id_reason(table: Table, name: str) -> str | None:
    """Why a column is left out as a row id (warned about once), or None to keep it."""
    reason = row_id_reason(name, np.asarray(table.column(name)))
    if reason is None:
        return None
    warnings.warn(
        f"{table.source}: column {name!r} looks like a row id ({reason}); it is left out of the features "
        "(set data.columns.NAME to its kind to keep it, or name it in data.exclude to say so)",
        GradwiseWarning,
        stacklevel=3,
    )
    return reason
