"""What kind of values a table's column holds: numeric, categorical, boolean, datetime, text or id.

The kind decides how :mod:`gradwise.data.tabular` turns the column into model inputs. It is read
from the values (all rows: a kind is the column's type, not a statistic, so it uses no labels),
and ``data.columns`` overrides it per column. The rules, in order:

- **id**: named like one (``id``, ``rownames``, ``*_id``), integers counting the rows, or short
  texts all different (see :func:`gradwise.data.files.row_id_reason`); left out of the features.
- **boolean**: booleans, or only ``true``/``false`` (``yes``/``no``, ``t``/``f``, ``y``/``n``) texts.
- **numeric**: every cell that is not missing is a number.
- **datetime**: a Parquet timestamp, or texts that all read as dates or times (``2024-01-31``,
  ``2024-01-31 12:00``, ``01/31/2024``).
- **text**: texts mostly different from row to row and of several words (a review, a title);
  left out of a table's features (a text model reads one text column, ``data.text``).
- **categorical**: any other texts (``Torgersen``, ``Very Good``).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd

from gradwise.data.files import row_id_reason

ColumnKind = Literal["numeric", "categorical", "boolean", "datetime", "text", "id"]
COLUMN_KINDS: tuple[str, ...] = ("numeric", "categorical", "boolean", "datetime", "text", "id")

# Cells that mean "no value" in a numeric column (R writes NA, pandas NaN, UCI files "?").
MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "null", "none", "#n/a", "?"})
_TRUE = frozenset({"true", "yes", "t", "y"})
_FALSE = frozenset({"false", "no", "f", "n"})
# A text column reads as free text when most rows differ and a typical value has this many words.
_TEXT_WORDS = 3
_TEXT_UNIQUE = 0.5


def cell_text(value: Any) -> str | None:
    """A cell as stripped text, or None when it is missing (None, NaN, an empty string)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return None
        return format(float(value), "g")  # 2.0 → "2", as the same cell reads from a CSV
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    text = str(value).strip()
    return text or None


def texts(values: np.ndarray) -> list[str | None]:
    """Every cell of a 1-D column as :func:`cell_text`."""
    return [cell_text(v) for v in values.tolist()]


def numbers(values: np.ndarray) -> np.ndarray:
    """A column as float64 with NaN where a cell is missing or not a number."""
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    if values.dtype.kind == "M":
        return np.full(len(values), np.nan)
    cells = texts(values)
    series = pd.Series([np.nan if c is None or c.lower() in MISSING_TOKENS else c for c in cells], dtype=object)
    return pd.to_numeric(series, errors="coerce").to_numpy(np.float64)


def is_missing_number_cell(text: str | None) -> bool:
    """Whether a numeric column's cell counts as missing (not a parse error)."""
    return text is None or text.lower() in MISSING_TOKENS


def boolean_value(text: str) -> float | None:
    """1.0 for a true-like text, 0.0 for a false-like one, None otherwise."""
    key = text.lower()
    if key in _TRUE or key == "1":
        return 1.0
    if key in _FALSE or key == "0":
        return 0.0
    return None


def datetimes(values: np.ndarray) -> pd.DatetimeIndex:
    """A column as timestamps (NaT where a cell is missing or not a date)."""
    if values.dtype.kind == "M":
        return pd.DatetimeIndex(values)
    cells = pd.Series([c if c is not None else None for c in texts(values)], dtype=object)
    return pd.DatetimeIndex(_parse_dates(cells).dt.tz_localize(None))


def _parse_dates(cells: pd.Series) -> pd.Series:
    """Texts as UTC timestamps (NaT where not a date). Cells with offsets become UTC, so local times either
    side of a daylight-saving change (+0100 and +0200 in one column) compare; cells without are taken as UTC."""
    with warnings.catch_warnings():  # "could not infer format": mixed formats are tried element by element
        warnings.simplefilter("ignore")
        return pd.to_datetime(cells, errors="coerce", format="mixed", utc=True)


def detect_kind(name: str, values: np.ndarray, *, allow_id: bool = True) -> tuple[ColumnKind, str]:
    """The kind of a 1-D column and why, in a few words (shown in the run's column table).

    With ``allow_id`` False (the caller has already left ids out, or the user named the column) a
    column is never called an id."""
    reason = row_id_reason(name, values) if allow_id else None
    kind = values.dtype.kind
    if kind == "b":
        return "boolean", "true/false values"
    if kind == "M":
        return "datetime", "timestamps"
    if reason is not None and reason != "a different text in every row":
        return "id", reason
    if kind in "iuf":
        if kind == "f" and len(values) and bool(np.isnan(values).all()):
            return "numeric", "no values"  # an empty column from Parquet, Arrow or a DataFrame: left out
        return "numeric", "numbers"
    cells = [c for c in texts(values) if c is not None and c.lower() not in MISSING_TOKENS]
    if not cells:
        return "numeric", "no values"  # all missing: refused later with the column's name
    if all(c.lower() in _TRUE or c.lower() in _FALSE for c in cells):
        return "boolean", "true/false texts"
    if all(_is_number(c) for c in cells):
        return "numeric", "numbers"
    if looks_like_dates(cells):
        return "datetime", "dates"
    distinct = len(set(cells))
    words = float(np.median([len(c.split()) for c in cells]))
    if distinct > _TEXT_UNIQUE * len(cells) and words >= _TEXT_WORDS:
        return "text", f"free text (~{words:.0f} words, {distinct} different)"
    if reason is not None:
        return "id", reason
    return "categorical", f"{distinct} categories"


_DATE_WITH_YEAR = re.compile(r"\d{4}|\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2}\b")


def _is_number(text: str) -> bool:
    """A number, infinities included (a numeric column with an ``inf`` cell is refused by name, not re-kinded)."""
    try:
        return not np.isnan(float(text))
    except ValueError:
        return False


def looks_like_dates(cells: list[str], sample: int = 200) -> bool:
    """Texts with digits and a date separator that pandas reads as timestamps (a sample decides)."""
    picked = cells[:: max(1, len(cells) // sample)][:sample]
    # A date names its year: a time alone ("10:30") would be read as today's date, a fraction or a range
    # ("1/2", "5-6") as a day of year 1; those are categories.
    if not all(_DATE_WITH_YEAR.search(c) for c in picked):
        return False
    return bool(_parse_dates(pd.Series(picked, dtype=object)).notna().all())
