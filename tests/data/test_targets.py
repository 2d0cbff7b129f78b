"""The auto rule for the task kind and the coding of class labels."""

from __future__ import annotations

import numpy as np
import pytest

from gradwise.data.targets import MAX_AUTO_CLASSES, code_labels, encode_target, infer_kind
from gradwise.data.types import RawData
from gradwise.errors import ConfigError, DataError


def raw(y, kind=None, class_names=None) -> RawData:
    y = np.asarray(y, dtype=object) if isinstance(y, list) else y
    return RawData(
        x=np.zeros((len(y), 1)),
        y=y,
        feature_names=["x"],
        target_name="label",
        source="pets.csv",
        name="pets.csv",
        kind=kind,
        class_names=class_names,
    )


def test_text_labels_are_classes_in_sorted_order():
    y, kind, names = encode_target(raw(["dog", "cat", "bird", "cat"]), "auto")
    assert kind == "classification"
    assert names == ["bird", "cat", "dog"]
    assert y.tolist() == [2, 1, 0, 1] and y.dtype == np.int64


def test_numeric_labels_sort_as_numbers_and_print_as_integers():
    y, kind, names = encode_target(raw(["10", "9", "2", "9", "10", "2"]), "auto")
    assert kind == "classification"
    assert names == ["2", "9", "10"]  # numerically, not as text ("10" < "2")
    assert y.tolist() == [2, 1, 0, 1, 2, 0]


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (np.array([0, 1, 2, 1, 0, 2]), "classification"),  # whole numbers, few distinct values
        (np.array([0.0, 1.0, 0.0, 1.0]), "classification"),  # whole-valued floats count as integers
        (np.array([0.5, 1.5, 0.5, 1.5]), "regression"),  # not whole numbers
        (np.arange(10), "regression"),  # as many distinct values as rows
        (np.arange(2 * (MAX_AUTO_CLASSES + 1)) % (MAX_AUTO_CLASSES + 1), "regression"),  # too many classes
        (np.arange(2 * MAX_AUTO_CLASSES) % MAX_AUTO_CLASSES, "classification"),  # exactly the limit
        (np.array([True, False, True]), "classification"),  # booleans are labels
    ],
)
def test_auto_rule(values: np.ndarray, kind: str):
    assert encode_target(raw(values), "auto")[1] == kind


def test_infer_kind_without_numbers_is_classification():
    assert infer_kind(None) == "classification"


def test_requested_kind_overrides_the_rule():
    y, kind, names = encode_target(raw(np.array([0.5, 1.5, 0.5, 1.5])), "classification")
    assert (kind, names, y.tolist()) == ("classification", ["0.5", "1.5"], [0, 1, 0, 1])
    y, kind, names = encode_target(raw(np.array([0, 1, 0, 1])), "regression")
    assert (kind, names) == ("regression", None) and y.dtype == np.float64


def test_regression_on_text_names_the_first_non_number():
    with pytest.raises(
        DataError, match=r"pets.csv: column 'label' row 3: 'x' is not a number \(task.kind is regression\)"
    ):
        encode_target(raw(["1.5", "2", "x", "y"]), "regression")


def test_single_class_is_a_data_error():
    with pytest.raises(DataError, match=r"pets.csv: column 'label' has a single class \('cat'\) in its 3 rows"):
        encode_target(raw(["cat", "cat", "cat"]), "auto")


def test_bundled_kind_is_fixed():
    bundled = raw(np.array([0, 1, 1, 0]), kind="classification", class_names=["no", "yes"])
    y, kind, names = encode_target(bundled, "auto")
    assert (y.tolist(), kind, names) == ([0, 1, 1, 0], "classification", ["no", "yes"])
    with pytest.raises(ConfigError, match=r"task\.kind 'regression' does not fit data\.name 'pets\.csv'"):
        encode_target(bundled, "regression")


def test_code_labels_of_booleans():
    codes, names = code_labels(np.array([True, False, True]), None)
    assert (codes.tolist(), names) == ([1, 0, 1], ["false", "true"])  # as a CSV spells them
