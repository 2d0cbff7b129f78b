"""Train/validation/test splits and feature standardization.

Splits are a pure function of the seed. Split sizes round up:
``n_test = ceil(test_fraction · N)`` and ``n_val = ceil(val_fraction · N)`` (a
fraction of 0 gives an empty split), and training keeps the rest. For
classification the splits are stratified by class (scikit-learn's
``train_test_split``), so every split keeps the class proportions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwise.errors import DataError


@dataclass(frozen=True)
class SplitSizes:
    """Rows in each split."""

    train: int
    val: int
    test: int


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> SplitSizes:
    """Rows per split for ``n`` rows: validation and test round up, training keeps the rest."""
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, which must not become 4.
    n_val = math.ceil(round(val_fraction * n, 9)) if val_fraction > 0 else 0
    n_test = math.ceil(round(test_fraction * n, 9)) if test_fraction > 0 else 0
    return SplitSizes(train=n - n_val - n_test, val=n_val, test=n_test)


def split_indices(
    n: int,
    labels: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source: str,
    class_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, validation and test splits, each sorted.

    Args:
        n: Number of rows.
        labels: Class index per row to stratify by, or None (regression).
        val_fraction: Share of rows for validation (0 → empty).
        test_fraction: Share of rows for test (0 → empty).
        seed: The run's seed; the same seed gives the same splits.
        source: Where the data came from, for error messages.
        class_names: Names of the class indices, for error messages.

    Raises:
        DataError: there are too few rows (or too few of some class) to make the splits.
    """
    sizes = split_sizes(n, val_fraction, test_fraction)
    if sizes.train < 1:
        raise DataError(
            f"{source}: {n} rows are too few to split: validation takes {sizes.val} and test {sizes.test}, "
            "leaving none for training (use more rows or lower data.val_fraction / data.test_fraction)"
        )
    if labels is not None:
        _check_stratifiable(labels, sizes, source, class_names)
    state = seed % 2**32  # sklearn's random_state must fit in 32 bits
    rows = np.arange(n)
    try:
        rest, test = _take(rows, sizes.test, labels, state)
        train, val = _take(rest, sizes.val, labels, state)
    except ValueError as exc:  # a stratification corner case the checks above do not foresee
        raise DataError(f"{source}: cannot split {n} rows by class ({exc})") from None
    return np.sort(train), np.sort(val), np.sort(test)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature ``(x - mean) / scale`` with statistics from the training split only.

    ``scale`` is the training standard deviation (population, ddof=0), or 1 where a
    feature is constant in training: such a feature is centred, never divided by 0.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Statistics of ``x`` (rows are examples)."""
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        # A constant column's computed std can be a rounding speck (1e-17), not 0; dividing by it would
        # blow the speck up to ±1, so a std this small relative to the mean counts as constant.
        constant = std <= 1e-12 * np.abs(mean)
        return cls(mean=mean, scale=np.where(constant, 1.0, std))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``x`` standardized with the fitted statistics."""
        return (x - self.mean) / self.scale


def _take(rows: np.ndarray, k: int, labels: np.ndarray | None, state: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (the rest, ``k`` drawn rows), stratified when labels are given."""
    if k == 0:
        return rows, rows[:0]
    stratify = labels[rows] if labels is not None else None
    from sklearn.model_selection import train_test_split  # here: importing scikit-learn takes ~1.7 s

    rest, drawn = train_test_split(rows, test_size=k, random_state=state, shuffle=True, stratify=stratify)
    return rest, drawn


def _check_stratifiable(labels: np.ndarray, sizes: SplitSizes, source: str, class_names: list[str] | None) -> None:
    parts = {"training": sizes.train, "validation": sizes.val, "test": sizes.test}
    made = {name: size for name, size in parts.items() if size > 0}
    if len(made) < 2:
        return
    classes, counts = np.unique(labels, return_counts=True)
    for name, size in made.items():
        if size < len(classes):
            fix = {
                "training": "lower data.val_fraction / data.test_fraction",
                "validation": "raise data.val_fraction",
                "test": "raise data.test_fraction",
            }[name]
            raise DataError(
                f"{source}: the {name} split would get {size} rows, fewer than the {len(classes)} classes; "
                f"a stratified split needs a row of every class (use more rows or {fix})"
            )
    rare = np.flatnonzero(counts < len(made))
    if rare.size:
        label = int(classes[rare[0]])
        name = class_names[label] if class_names is not None else str(label)
        raise DataError(
            f"{source}: class {name!r} has only {int(counts[rare[0]])} row(s); stratified "
            f"{'/'.join(made)} splits need at least {len(made)} rows of every class "
            "(use more rows, drop the class, or set data.val_fraction / data.test_fraction to 0)"
        )
