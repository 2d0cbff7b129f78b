"""Tabular preprocessing: a table's columns as model inputs, fitted on the training rows, saved as JSON.

Each feature column has a kind (:mod:`gradwise.data.columns`) that says how it becomes inputs:

- numeric: a missing cell is imputed with the training rows' median (or mean), and a 0/1 column
  ``name.missing`` records that it was, when the training rows had any missing cell (scikit-learn's
  ``SimpleImputer(add_indicator=True)``); then standardized with the training mean and standard
  deviation (``StandardScaler``), if ``data.standardize``. With ``data.numeric_transform=quantile``, a
  column of more than ``QUANTILE_MIN_DISTINCT`` different training values is instead mapped through its
  training quantiles onto a standard normal (``QuantileTransformer(output_distribution="normal")``),
  which tames long tails and outliers for an MLP (Gorishniy et al. 2021, "Revisiting Deep Learning
  Models for Tabular Data", preprocess numbers this way); a column of few values is standardized.
- boolean: 1/0; a missing cell takes the most frequent training value, plus the indicator.
- categorical: the training rows' categories in sorted order (``OneHotEncoder``); up to
  ``data.one_hot_max`` of them, one 0/1 column each; above it, an integer id per row for a learned
  embedding (1..K; 0 is the unknown bucket). A missing cell takes the most frequent category plus
  the indicator; a category the training rows never had sets no one-hot column (id 0) and is counted.
- datetime: days since 1970-01-01, month, day of the week (and hour, if the training rows have
  times of day) as numeric columns.
- text and id columns are left out.

The result is the dense float32 features, and when some column is embedded, the mapping
``{"features": dense, "categories": ids}``. The fitted state is a plain JSON mapping kept in the run's
``data_info.json`` (``DataInfo.preprocessing``), so eval, predict, export and compress apply exactly
what training fitted; nothing is pickled.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from gradwise.data.columns import (
    MISSING_TOKENS,
    ColumnKind,
    boolean_value,
    datetimes,
    is_missing_number_cell,
    numbers,
    texts,
)
from gradwise.data.readers import Table
from gradwise.data.splits import Standardizer
from gradwise.data.types import DataInfo
from gradwise.errors import DataError, GradwiseWarning

RECORD_VERSION = 1
# A date column may mark gaps with a few words ("unknown", "tbd") in a few cells; more means it is no date column.
_MAX_DATE_GAP_TOKENS = 5
_MAX_DATE_GAP_SHARE = 0.05
_DATE_PARTS = ("days", "month", "weekday", "hour")
# The quantile map: at most this many quantiles, over columns of more than this many distinct values (a
# column of few values, a flag or a small count, would have whole blocks of rows sent to the tails).
QUANTILE_COUNT = 1000
QUANTILE_MIN_DISTINCT = 10
# scikit-learn's margin at the ends of the quantile range: the normal's tails are clipped at ±5.2.
_QUANTILE_BOUND = 1e-7


@dataclass(frozen=True)
class Settings:
    """How columns are encoded (the ``data`` section's fields of the same names)."""

    standardize: bool = True
    impute: str = "median"  # numeric columns: "median" or "mean"
    missing_indicator: bool = True
    one_hot_max: int = 16
    numeric_transform: str = "standard"  # numeric columns: "standard" or "quantile"


@dataclass(frozen=True)
class Encoded:
    """A table's rows as model inputs.

    Attributes:
        dense: float64 ``(N, D)``, the columns named by the record's ``feature_names``.
        categories: int64 ``(N, E)`` ids of the embedded categorical columns, or None if there are none.
        unknown: Per categorical column, how many cells held a category the training rows did not have.
    """

    dense: np.ndarray
    categories: np.ndarray | None
    unknown: dict[str, int]

    def inputs(self, rows: np.ndarray | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """The rows as the model reads them: float32 features, or with ids the ``features``/``categories`` mapping."""
        dense = self.dense if rows is None else self.dense[rows]
        features = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
        if self.categories is None:
            return features
        ids = self.categories if rows is None else self.categories[rows]
        return {"features": features, "categories": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))}


def fit(
    columns: Mapping[str, np.ndarray],
    kinds: Mapping[str, ColumnKind],
    train: np.ndarray,
    settings: Settings,
    source: str,
    locate: Callable[[int], str] = lambda i: f"row {i + 1}",
) -> dict[str, Any]:
    """The preprocessing record for ``columns`` (the features, in order), fitted on rows ``train``.

    Raises:
        DataError: a column cannot be encoded (e.g. a numeric column with no number in the training rows).
    """
    fitted = [_fit_column(name, columns[name], kinds[name], train, settings, source, locate) for name in columns]
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "columns": fitted,
        "standardize": settings.standardize,
        "mean": [],
        "scale": [],
    }
    raw = _expand(record, columns, source, locate).dense
    scaled = np.array([s for col in fitted for s in _scaled_outputs(col)], dtype=bool)
    if settings.standardize and scaled.any():
        scaler = Standardizer.fit(raw[train])
        mean, scale = np.where(scaled, scaler.mean, 0.0), np.where(scaled, scaler.scale, 1.0)
    else:
        mean, scale = np.zeros(raw.shape[1]), np.ones(raw.shape[1])
    record["mean"], record["scale"] = mean.tolist(), scale.tolist()
    return record


def encode(
    record: Mapping[str, Any], columns: Mapping[str, np.ndarray], source: str, locate: Callable[[int], str]
) -> Encoded:
    """Apply a fitted record to a table's columns (every feature column the record names must be there).

    Raises:
        DataError: a column is missing or a cell cannot be read as its column's kind; names the row.
    """
    if record.get("version") != RECORD_VERSION:
        raise DataError(
            f"{source}: preprocessing record version {record.get('version')!r} is not one this gradwise reads"
        )
    expanded = _expand(record, columns, source, locate)
    dense = (expanded.dense - np.asarray(record["mean"])) / np.asarray(record["scale"])
    return Encoded(dense, expanded.categories, expanded.unknown)


_NEEDS = {
    "numeric": {"fill": (int, float)},
    "boolean": {"fill": (int, float)},
    "datetime": {"fill": list, "parts": list},
    "categorical": {"fill": str, "categories": list, "encoding": str},
}


def check_record(record: Any, source: str) -> None:
    """Refuse a damaged preprocessing record (a hand-edited or truncated ``data_info.json``) in one line.

    Raises:
        CheckpointError: a field is missing or of the wrong type, or the scaling lengths do not match.
    """
    from gradwise.errors import CheckpointError

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: the preprocessing record is damaged ({what})")

    if not isinstance(record, Mapping) or record.get("version") != RECORD_VERSION:
        raise bad(f"version {record.get('version') if isinstance(record, Mapping) else None!r}")
    columns = record.get("columns")
    if not isinstance(columns, list) or not columns:
        raise bad("no columns")
    for col in columns:
        if not isinstance(col, Mapping) or not isinstance(col.get("name"), str) or col.get("kind") not in _NEEDS:
            raise bad(f"column entry {str(col)[:60]!r}")
        if not isinstance(col.get("indicator"), bool):
            raise bad(f"column {col['name']!r}: indicator")
        for key, kind in _NEEDS[col["kind"]].items():
            if not isinstance(col.get(key), kind) or isinstance(col.get(key), bool):
                raise bad(f"column {col['name']!r}: {key}")
        if col["kind"] == "categorical" and col["encoding"] not in ("one_hot", "embedding"):
            raise bad(f"column {col['name']!r}: encoding {col['encoding']!r}")
        if col["kind"] == "categorical" and col["fill"] not in col["categories"]:
            raise bad(f"column {col['name']!r}: fill {col['fill']!r} is not one of its categories")
        if col["kind"] == "datetime" and (
            not set(col["parts"]) <= set(_DATE_PARTS) or len(col["fill"]) != len(col["parts"])
        ):
            raise bad(f"column {col['name']!r}: parts {col['parts']!r} and fill {col['fill']!r}")
        gaps = col.get("gaps", [])
        if not isinstance(gaps, list) or not all(isinstance(g, str) for g in gaps):
            raise bad(f"column {col['name']!r}: gaps")
        if col["kind"] in ("numeric", "boolean") and not math.isfinite(col["fill"]):
            raise bad(f"column {col['name']!r}: fill {col['fill']!r}")
        if "quantiles" in col and not _increasing_numbers(col["quantiles"]):
            raise bad(f"column {col['name']!r}: quantiles are not increasing numbers")
    width = len(feature_names(record))
    for key in ("mean", "scale"):
        values = record.get(key)
        if not isinstance(values, list) or len(values) != width or not all(isinstance(v, int | float) for v in values):
            raise bad(f"{key} does not hold {width} numbers")


def _increasing_numbers(values: Any) -> bool:
    if not isinstance(values, list) or not values:
        return False
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return False
    return all(a <= b for a, b in itertools.pairwise(values))


def feature_names(record: Mapping[str, Any]) -> list[str]:
    """One name per dense input column, in order (``bill_length_mm``, ``bill_length_mm.missing``, ``island=Biscoe``)."""
    return [name for col in record["columns"] for name in _output_names(col)]


def input_columns(record: Mapping[str, Any]) -> list[str]:
    """The table columns the record reads."""
    return [col["name"] for col in record["columns"]]


def describe(info: DataInfo) -> str:
    """The short table printed at the start of a run: each column, its kind, why, and what it became."""
    record = info.preprocessing
    if record is None:
        return ""
    rows: list[tuple[str, str, str]] = []
    for col in record["columns"]:
        kind, name = col["kind"], col["name"]
        if kind == "categorical":
            n = len(col["categories"])
            made = f"{n} one-hot columns" if col["encoding"] == "one_hot" else f"embedding of {n} + unknown"
        elif kind == "datetime":
            made = ", ".join(col["parts"])
        else:
            made = (
                "0/1" if kind == "boolean"
                else "quantiles -> normal" if "quantiles" in col
                else "standardized" if record["standardize"] else "as is"
            )  # fmt: skip
        if col["indicator"]:
            made += f"; missing -> {_show_fill(col['fill'])} + indicator"
        rows.append((name, kind, f"{made}  ({col['why']})" if col.get("why") else made))
    rows += [(c["name"], c["kind"], f"left out ({c['reason']})") for c in info.left_out or []]
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"  {'column':<{width}}  {'kind':<11}  encoding"]
    lines += [f"  {name:<{width}}  {kind:<11}  {made}" for name, kind, made in rows]
    return "\n".join(lines)


def _show_fill(fill: Any) -> str:
    if isinstance(fill, list):
        return "median"
    return f"{fill:.4g}" if isinstance(fill, float) else repr(fill)


def table_inputs(info: DataInfo, table: Table) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict[str, int]]:
    """A table's rows (all, in order) as a run's model reads them, and per column its unseen-category count.

    A run that recorded its preprocessing applies that record; an older run (or one on numeric arrays)
    takes its ``feature_names`` columns and standardizes them with its recorded statistics.

    Raises:
        DataError: a column the run needs is missing, or a cell cannot be read; the message names the row.
    """
    if info.preprocessing is not None:
        needed = input_columns(info.preprocessing)
        missing = [name for name in needed if name not in table.names]
        if missing:  # every missing column at once, before any cell is read
            shown = ", ".join(repr(name) for name in missing)
            present = ", ".join(table.names[:20])
            raise DataError(f"{table.source}: no column {shown}; the run was trained with it (columns: {present})")
        encoded = encode(info.preprocessing, {n: table.column(n) for n in needed}, table.source, table.locate)
        return encoded.inputs(), encoded.unknown
    blocks = [_feature_column(table, name) for name in info.feature_names]
    x = np.stack(blocks, axis=1) if blocks else np.zeros((0, 0))
    if info.feature_mean is not None and info.feature_std is not None:
        x = (x - np.asarray(info.feature_mean)) / np.asarray(info.feature_std)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), {}


def _feature_column(table: Table, name: str) -> np.ndarray:
    """A recorded feature as numbers: a column, or column ``j`` of an NPZ array named ``key[j]``."""
    from gradwise.data.files import to_numbers

    if name in table.names:
        return to_numbers(np.asarray(table.column(name)), name, table.source, table.locate)
    key, _, index = name.rpartition("[")
    if key in table.names and index.endswith("]") and index[:-1].isdigit():
        block = np.asarray(table.column(key))
        flat = block.reshape(block.shape[0], -1)[:, int(index[:-1])]
        return to_numbers(flat, name, table.source, table.locate)
    raise DataError(f"{table.source}: no column {name!r}; the run was trained with it")


# --------------------------------------------------------------------------- fitting one column


def _fit_column(
    name: str,
    values: np.ndarray,
    kind: ColumnKind,
    train: np.ndarray,
    settings: Settings,
    source: str,
    locate: Callable[[int], str],
) -> dict[str, Any]:
    if values.ndim != 1:
        raise DataError(
            f"{source}: column {name!r} has shape {tuple(values.shape)}; a table column holds one value per row"
        )
    col: dict[str, Any] = {"name": name, "kind": kind}
    if kind == "numeric":
        x = _numeric(name, values, source, locate)
        seen = x[train][np.isfinite(x[train])]
        if seen.size == 0:
            raise DataError(f"{source}: column {name!r} has no numbers in the training rows; exclude it (data.exclude)")
        col["fill"] = float(np.median(seen) if settings.impute == "median" else np.mean(seen))
        col["indicator"] = settings.missing_indicator and bool(np.isnan(x[train]).any())
        if settings.numeric_transform == "quantile" and len(np.unique(seen)) > QUANTILE_MIN_DISTINCT:
            col["quantiles"] = _fit_quantiles(seen, n_rows=len(train))
    elif kind == "boolean":
        x = _boolean(name, values, source, locate)
        seen = x[train][~np.isnan(x[train])]
        col["fill"] = float(np.mean(seen) > 0.5) if seen.size else 0.0  # most frequent; a tie takes 0, the smaller
        col["indicator"] = settings.missing_indicator and bool(np.isnan(x[train]).any())
    elif kind == "categorical":
        cells = _category_cells(values)
        picked = [cells[i] for i in train.tolist()]
        present = [c for c in picked if c is not None]
        if not present:
            raise DataError(f"{source}: column {name!r} has no values in the training rows; exclude it (data.exclude)")
        categories, counts = np.unique(np.array(present, dtype=object), return_counts=True)
        col["categories"] = [str(c) for c in categories]
        col["fill"] = str(categories[int(np.argmax(counts))])  # the first of the most frequent, as SimpleImputer
        col["encoding"] = "one_hot" if len(categories) <= settings.one_hot_max else "embedding"
        col["indicator"] = settings.missing_indicator and len(present) < len(picked)
    elif kind == "datetime":
        gaps = _date_gaps(name, values, source, locate)
        if gaps:
            col["gaps"] = gaps
        stamps = _dates(name, values, source, locate, gaps)
        seen = stamps[train][~stamps[train].isna()]
        if len(seen) == 0:
            raise DataError(f"{source}: column {name!r} has no dates in the training rows; exclude it (data.exclude)")
        col["parts"] = ["days", "month", "weekday"] + (["hour"] if bool((seen.hour + seen.minute > 0).any()) else [])
        col["fill"] = [float(v) for v in np.median(_date_parts(seen, col["parts"]), axis=0)]
        col["indicator"] = settings.missing_indicator and len(seen) < len(train)
    else:
        raise DataError(f"{source}: column {name!r} of kind {kind!r} is not a feature")
    return col


def _output_names(col: Mapping[str, Any]) -> list[str]:
    name = col["name"]
    if col["kind"] == "categorical":
        outputs = [f"{name}={c}" for c in col["categories"]] if col["encoding"] == "one_hot" else []
    elif col["kind"] == "datetime":
        outputs = [f"{name}.{part}" for part in col["parts"]]
    else:
        outputs = [name]
    return outputs + ([f"{name}.missing"] if col["indicator"] else [])


def _scaled_outputs(col: Mapping[str, Any]) -> list[bool]:
    """Which of a column's outputs are standardized: numbers are; 0/1 columns (one-hot, flags) are not."""
    numeric = col["kind"] in ("numeric", "datetime") and "quantiles" not in col  # quantiles: already N(0, 1)
    values = len(_output_names(col)) - int(col["indicator"])
    return [numeric] * values + ([False] if col["indicator"] else [])


# --------------------------------------------------------------------------- applying the record


@dataclass(frozen=True)
class _Expanded:
    dense: np.ndarray
    categories: np.ndarray | None
    unknown: dict[str, int]


def _expand(
    record: Mapping[str, Any], columns: Mapping[str, np.ndarray], source: str, locate: Callable[[int], str]
) -> _Expanded:
    """Imputed, one-hot and indicator columns before standardization, and the embedded ids."""
    blocks: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    unknown: dict[str, int] = {}
    n_rows = None
    for col in record["columns"]:
        name = col["name"]
        if name not in columns:
            raise DataError(
                f"{source}: no column {name!r}; the run was trained with it (columns: {', '.join(columns)})"
            )
        values = np.asarray(columns[name])
        n_rows = len(values)
        block, missing = _encode_column(col, values, source, locate, ids, unknown)
        blocks.append(block)
        if col["indicator"]:
            blocks.append(missing.astype(np.float64)[:, None])
    rows = n_rows or 0
    dense = np.concatenate(blocks, axis=1) if blocks else np.zeros((rows, 0))
    categories = np.stack(ids, axis=1) if ids else None
    return _Expanded(dense, categories, unknown)


def _encode_column(
    col: Mapping[str, Any],
    values: np.ndarray,
    source: str,
    locate: Callable[[int], str],
    ids: list[np.ndarray],
    unknown: dict[str, int],
) -> tuple[np.ndarray, np.ndarray]:
    """One column's dense block (N, k) and its missing mask; embedded ids are appended to ``ids``."""
    name, kind = col["name"], col["kind"]
    if kind == "numeric":
        x = _numeric(name, values, source, locate)
        missing = np.isnan(x)
        filled = np.where(missing, col["fill"], x)
        if "quantiles" in col:
            filled = _to_normal(filled, np.asarray(col["quantiles"], dtype=np.float64))
        return filled[:, None], missing
    if kind == "boolean":
        x = _boolean(name, values, source, locate)
        missing = np.isnan(x)
        return np.where(missing, col["fill"], x)[:, None], missing
    if kind == "datetime":
        stamps = _dates(name, values, source, locate, col.get("gaps", []))
        missing = np.asarray(stamps.isna())
        parts = _date_parts(stamps, col["parts"])
        return np.where(missing[:, None], np.asarray(col["fill"])[None, :], parts), missing
    cells = _category_cells(values)
    missing = np.array([c is None for c in cells], dtype=bool)
    index = {c: i + 1 for i, c in enumerate(col["categories"])}
    fill = index[col["fill"]]
    codes = np.array([fill if c is None else index.get(c, 0) for c in cells], dtype=np.int64)
    unseen = int(np.sum(codes == 0))
    if unseen:
        unknown[name] = unseen
    if col["encoding"] == "embedding":
        ids.append(codes)
        return np.zeros((len(cells), 0)), missing
    one_hot = np.zeros((len(cells), len(index) + 1))
    one_hot[np.arange(len(cells)), codes] = 1.0
    return one_hot[:, 1:], missing  # column 0 is the unknown bucket: all zeros, as handle_unknown="ignore"


def _fit_quantiles(seen: np.ndarray, n_rows: int) -> list[float]:
    """The training values' quantiles at evenly spaced levels, as ``QuantileTransformer`` fits them.

    ``n_rows`` counts the training rows, gaps included: scikit-learn sizes the grid by them and takes
    the percentiles of the values present.
    """
    levels = np.linspace(0.0, 100.0, max(1, min(QUANTILE_COUNT, n_rows)))
    return np.maximum.accumulate(np.percentile(seen, levels)).tolist()  # increasing, as np.interp needs


def _to_normal(x: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Values mapped through the training quantiles onto a standard normal, as scikit-learn's
    ``QuantileTransformer(output_distribution="normal")`` does (its ``_transform_col``).

    A value is placed by interpolating between the quantiles, once forwards and once backwards, and the
    two averaged, so a value repeated over several quantiles lands in the middle of them. Values at or
    beyond the training extremes go to the ends, which the normal's inverse clips at about ±5.2.
    """
    from scipy.special import ndtri  # the inverse normal CDF; scipy comes with scikit-learn

    levels = np.linspace(0.0, 1.0, len(quantiles))
    position = 0.5 * (np.interp(x, quantiles, levels) - np.interp(-x, -quantiles[::-1], -levels[::-1]))
    position[x + _QUANTILE_BOUND > quantiles[-1]] = 1.0
    position[x - _QUANTILE_BOUND < quantiles[0]] = 0.0
    edge = _QUANTILE_BOUND - np.spacing(1)
    return np.clip(ndtri(position), ndtri(edge), ndtri(1 - edge))


def _numeric(name: str, values: np.ndarray, source: str, locate: Callable[[int], str]) -> np.ndarray:
    x = numbers(values)
    shown = texts(values) if values.dtype.kind not in "biuf" else None
    if shown is not None:
        bad = [i for i in np.flatnonzero(np.isnan(x)).tolist() if not is_missing_number_cell(shown[i])]
        if bad:
            raise DataError(f"{source}: column {name!r} {locate(bad[0])}: {shown[bad[0]]!r} is not a number")
    infinite = np.flatnonzero(np.isinf(x))
    if infinite.size:
        i = int(infinite[0])
        cell = repr(shown[i]) if shown is not None else str(x[i])
        raise DataError(f"{source}: column {name!r} {locate(i)}: {cell} is not a finite number")
    return x


def _category_cells(values: np.ndarray) -> list[str | None]:
    """A categorical column's cells as text, None where missing: an empty cell, or a token such as R's ``NA``
    or UCI's ``?`` (a category really named so keeps its information in the missing-indicator column)."""
    return [None if c is None or c.lower() in MISSING_TOKENS else c for c in texts(values)]


def _undated(values: np.ndarray, stamps: pd.DatetimeIndex) -> tuple[list[int], list[str | None]]:
    """The rows whose cell is there but reads as no date, and every cell as text."""
    shown = texts(values)
    return [
        i for i in np.flatnonzero(np.asarray(stamps.isna())).tolist() if not is_missing_number_cell(shown[i])
    ], shown


def _date_gaps(name: str, values: np.ndarray, source: str, locate: Callable[[int], str]) -> list[str]:
    """The few texts a date column uses for a gap ("unknown", "tbd"), found over the whole table; they are
    recorded so that predict reads them as gaps too. Many of them mean the column is not dates at all."""
    if values.dtype.kind == "M":
        return []
    bad, shown = _undated(values, datetimes(values))
    tokens = sorted({str(shown[i]) for i in bad})
    if len(tokens) > _MAX_DATE_GAP_TOKENS or len(bad) > _MAX_DATE_GAP_SHARE * len(values):
        raise DataError(
            f"{source}: column {name!r} {locate(bad[0])}: {shown[bad[0]]!r} is not a date, nor are {len(bad) - 1} "
            f"other cells; set data.columns.{name}: categorical to read it as categories"
        )
    if tokens:
        warnings.warn(
            f"{source}: column {name!r}: {len(bad)} cells read as no date ({', '.join(map(repr, tokens))}); "
            "they are taken as missing",
            GradwiseWarning,
            stacklevel=4,
        )
    return tokens


def _dates(
    name: str, values: np.ndarray, source: str, locate: Callable[[int], str], gaps: list[str]
) -> pd.DatetimeIndex:
    """A datetime column's timestamps (NaT where missing, or one of the column's recorded ``gaps``); any other
    cell that is there but no date is an error naming the row."""
    stamps = datetimes(values)
    if values.dtype.kind != "M":
        bad, shown = _undated(values, stamps)
        bad = [i for i in bad if shown[i] not in gaps]
        if bad:
            raise DataError(f"{source}: column {name!r} {locate(bad[0])}: {shown[bad[0]]!r} is not a date")
    return stamps


def _boolean(name: str, values: np.ndarray, source: str, locate: Callable[[int], str]) -> np.ndarray:
    if values.dtype.kind == "b":
        return values.astype(np.float64)
    out = np.full(len(values), np.nan)
    for i, cell in enumerate(texts(values)):
        if is_missing_number_cell(cell):
            continue
        value = boolean_value(cell)
        if value is None:
            raise DataError(f"{source}: column {name!r} {locate(i)}: {cell!r} is not true/false")
        out[i] = value
    return out


def _date_parts(stamps: Any, parts: list[str]) -> np.ndarray:
    """Timestamps as numbers: days since 1970-01-01 (fractional), month 1-12, weekday 0-6, hour 0-24."""
    days = np.asarray((stamps - pd.Timestamp("1970-01-01")) / pd.Timedelta(days=1), dtype=np.float64)
    table = {
        "days": days,
        "month": np.asarray(stamps.month, dtype=np.float64),
        "weekday": np.asarray(stamps.day_of_week, dtype=np.float64),
        "hour": np.asarray(stamps.hour + stamps.minute / 60.0, dtype=np.float64),
    }
    return np.stack([table[p] for p in parts], axis=1)
