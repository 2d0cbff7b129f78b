"""Split sizes, determinism, stratification, and standardization from training statistics."""

from __future__ import annotations

import numpy as np
import pytest

from gradwise.data.splits import Standardizer, split_indices, split_sizes
from gradwise.errors import DataError


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [
        (1797, 0.15, 0.15, (1257, 270, 270)),  # ceil(269.55) = 270
        (30, 0.1, 0.1, (24, 3, 3)),  # 0.1 · 30 is 3.0000000000000004 in floating point
        (10, 0.0, 0.25, (7, 0, 3)),
        (10, 0.0, 0.0, (10, 0, 0)),
    ],
)
def test_split_sizes(n: int, val: float, test: float, expected: tuple[int, int, int]):
    sizes = split_sizes(n, val, test)
    assert (sizes.train, sizes.val, sizes.test) == expected


def labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_splits_partition_the_rows_and_depend_only_on_the_seed():
    y = labels([50, 30, 20])
    a = split_indices(100, y, 0.2, 0.1, seed=7, source="d")
    b = split_indices(100, y, 0.2, 0.1, seed=7, source="d")
    c = split_indices(100, y, 0.2, 0.1, seed=8, source="d")
    assert [len(part) for part in a] == [70, 20, 10]
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_classification_splits_keep_the_class_proportions():
    y = labels([500, 300, 200])
    for part, size in zip(split_indices(1000, y, 0.2, 0.1, seed=0, source="d"), [700, 200, 100], strict=True):
        counts = np.bincount(y[part], minlength=3)
        np.testing.assert_allclose(counts / size, [0.5, 0.3, 0.2], atol=1.5 / size)


def test_regression_splits_are_not_stratified_but_still_seeded():
    a = split_indices(50, None, 0.2, 0.2, seed=3, source="d")
    assert [len(part) for part in a] == [30, 10, 10]
    assert np.array_equal(a[2], split_indices(50, None, 0.2, 0.2, seed=3, source="d")[2])


def test_huge_seeds_are_accepted():
    split_indices(20, None, 0.2, 0.2, seed=2**40 + 5, source="d")


def test_too_few_rows():
    with pytest.raises(DataError, match=r"d\.csv: 3 rows are too few to split"):
        split_indices(3, None, 0.5, 0.4, seed=0, source="d.csv")


def test_split_smaller_than_the_class_count():
    with pytest.raises(DataError, match=r"d\.csv: the validation split would get 2 rows, fewer than the 3 classes"):
        split_indices(20, labels([8, 6, 6]), 0.1, 0.0, seed=0, source="d.csv")


def test_class_too_rare_to_stratify_is_named():
    with pytest.raises(DataError, match=r"d.csv: class 'rare' has only 2 row\(s\)"):
        split_indices(60, labels([29, 29, 2]), 0.2, 0.2, seed=0, source="d.csv", class_names=["a", "b", "rare"])
    # With one split only there is nothing to stratify.
    train, val, test = split_indices(60, labels([29, 29, 2]), 0.0, 0.0, seed=0, source="d.csv")
    assert len(train) == 60 and len(val) == len(test) == 0


def test_standardizer_uses_the_given_statistics_and_centres_constant_features():
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.normal(5.0, 2.0, 200), np.full(200, 0.1), np.zeros(200)])
    scaler = Standardizer.fit(train)
    z = scaler.transform(train)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, 0].std(), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(scaler.scale[1:], [1.0, 1.0])  # constant columns: centred, not divided
    np.testing.assert_allclose(z[:, 1:], 0.0, atol=1e-15)
    other = np.array([[9.0, 0.3, 1.0]])
    expected = [(9.0 - train[:, 0].mean()) / train[:, 0].std(), 0.3 - 0.1, 1.0]
    np.testing.assert_allclose(scaler.transform(other)[0], expected, rtol=1e-12)
