"""What kind of task a target column poses, and its labels as class indices.

The rule for ``task.kind: auto`` on a file: a target that is not all numbers
(strings, booleans) is a class label; a numeric target is a class label when
every value is a whole number, there are at most :data:`MAX_AUTO_CLASSES`
distinct values, and at most half as many distinct values as rows (so each
class has two examples on average); any other numeric target is regressed.
Set ``task.kind`` to override the rule.

Class labels, strings or numbers, map to 0..K-1 in sorted order (numbers
numerically, anything else as text); ``class_names`` records them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from gradwise.data.files import parse_number
from gradwise.data.types import RawData, TaskKind
from gradwise.errors import ConfigError, DataError

MAX_AUTO_CLASSES = 20


def encode_target(
    raw: RawData, requested: Literal["auto", "classification", "regression"]
) -> tuple[np.ndarray, TaskKind, list[str] | None]:
    """The coded target, the task kind and the class names.

    Args:
        raw: The data as read; ``raw.kind`` set means the dataset fixes the kind (bundled sets).
        requested: ``task.kind`` from the config.

    Returns:
        ``(y, kind, class_names)``: int64 class indices and names for classification,
        float64 values and None for regression.

    Raises:
        ConfigError: ``requested`` contradicts a bundled dataset's kind.
        DataError: a regression target is not numeric, or a classification target has one class.
    """
    if raw.kind is not None:
        if requested not in ("auto", raw.kind):
            raise ConfigError(
                f"task.kind {requested!r} does not fit data.name {raw.name!r}, a {raw.kind} dataset "
                f"(use task.kind=auto or {raw.kind})"
            )
        if raw.kind == "regression":
            return raw.y.astype(np.float64), "regression", None
        codes = raw.y.astype(np.int64)
        names = raw.class_names or [str(k) for k in range(int(codes.max()) + 1)]
        _require_two_classes(codes, names, raw)
        return codes, "classification", names

    numbers = as_numbers(raw.y)
    kind: TaskKind = infer_kind(numbers) if requested == "auto" else requested
    if kind == "regression":
        if numbers is None:
            i = _first_non_number(raw.y)
            raise DataError(
                f"{raw.source}: column {raw.target_name!r} {raw.locate(i)}: {raw.y[i]!r} is not a number "
                "(task.kind is regression)"
            )
        return numbers, "regression", None
    codes, names = code_labels(raw.y, numbers)
    _require_two_classes(codes, names, raw)
    return codes, "classification", names


def as_numbers(y: np.ndarray) -> np.ndarray | None:
    """The target as float64 if every value is a number (booleans are labels, not numbers), else None."""
    if y.dtype.kind in "iuf":
        return y.astype(np.float64)
    if y.dtype.kind != "O" and y.dtype.kind not in "US":
        return None
    values = y.tolist()
    if any(isinstance(v, bool) for v in values):
        return None
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)
    return numbers if np.isfinite(numbers).all() else None


def infer_kind(numbers: np.ndarray | None) -> TaskKind:
    """Classification or regression by the rule in this module's docstring."""
    if numbers is None:
        return "classification"
    whole = bool(np.all(numbers == np.round(numbers)))
    distinct = len(np.unique(numbers))
    few = distinct <= MAX_AUTO_CLASSES and 2 * distinct <= len(numbers)
    return "classification" if whole and few else "regression"


def code_labels(y: np.ndarray, numbers: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """Class indices 0..K-1 in sorted label order, and the label of each index."""
    if numbers is not None:
        classes, codes = np.unique(numbers, return_inverse=True)
        return codes.astype(np.int64), [_number_name(v) for v in classes]
    labels = np.array([_label(v) for v in y.tolist()], dtype=object)
    classes, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), [str(c) for c in classes]


def _label(value: object) -> str:
    # A JSON or Parquet boolean is named as a CSV spells it, so a run trained on one format scores the other.
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)


def _number_name(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(float(value))


def _first_non_number(y: np.ndarray) -> int:
    for i, value in enumerate(y.tolist()):
        if isinstance(value, bool) or not np.isfinite(parse_number(value)):
            return i
    return 0


def _require_two_classes(codes: np.ndarray, names: list[str], raw: RawData) -> None:
    present = np.unique(codes)
    if len(present) < 2:
        only = names[int(present[0])] if len(present) else "?"
        raise DataError(
            f"{raw.source}: column {raw.target_name!r} has a single class ({only!r}) in its {len(codes)} rows; "
            "classification needs at least two"
        )
