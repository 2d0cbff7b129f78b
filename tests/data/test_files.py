"""User files through load_dataset: every format round-trips, every bad value is named precisely."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradwise.config import DataConfig, validate
from gradwise.data import load_dataset
from gradwise.data.files import clean_target
from gradwise.errors import ConfigError, DataError, GradwiseWarning

FRAME = pd.DataFrame(
    {
        "age": [23.5, 41.0, 37.25, 19.0, 52.0, 33.0],
        "height": [170, 182, 165, 158, 177, 190],
        "species": ["cat", "dog", "cat", "bird", "dog", "cat"],
    }
)


def write(frame: pd.DataFrame, path: Path) -> Path:
    fmt = path.suffix.lstrip(".")
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "npz":
        # Text columns as numpy strings: an object array would be pickled, which gradwise refuses to read.
        arrays = {name: frame[name].to_numpy() for name in frame.columns}
        np.savez(path, **{k: v.astype(str) if v.dtype == object else v for k, v in arrays.items()})
    return path


def whole(path: Path, **kwargs) -> DataConfig:
    """All rows in the training split, unscaled: the file's values must come through untouched."""
    defaults = {"target": "species", "val_fraction": 0.0, "test_fraction": 0.0, "standardize": False}
    return DataConfig(name="file", path=path, **{**defaults, **kwargs})


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl", "npz"])
def test_each_format_round_trips_to_identical_tensors(tmp_path: Path, fmt: str):
    data = load_dataset(whole(write(FRAME, tmp_path / f"pets.{fmt}")), "auto", seed=0)
    expected_x = torch.tensor(FRAME[["age", "height"]].to_numpy(np.float64), dtype=torch.float32)
    assert torch.equal(data.train.x, expected_x)
    assert data.train.y.tolist() == [1, 2, 1, 0, 2, 1]  # bird, cat, dog in sorted order
    assert data.train.y.dtype == torch.int64
    info = data.info
    assert (info.kind, info.class_names, info.feature_names) == (
        "classification",
        ["bird", "cat", "dog"],
        ["age", "height"],
    )
    assert (info.target_name, info.n_outputs, info.name) == ("species", 3, f"pets.{fmt}")
    assert info.source.endswith(f"pets.{fmt}")
    assert data.val.x.shape == (0, 2) and data.test.y.shape == (0,)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl", "npz"])
def test_numeric_target_regresses_with_column_shaped_float_targets(tmp_path: Path, fmt: str):
    path = write(FRAME, tmp_path / f"pets.{fmt}")
    data = load_dataset(whole(path, target="age", features=["height"]), "auto", seed=0)
    assert data.info.kind == "regression" and data.info.class_names is None
    assert data.train.y.dtype == torch.float32 and data.train.y.shape == (6, 1)
    assert torch.equal(data.train.y[:, 0], torch.tensor(FRAME["age"].to_numpy(), dtype=torch.float32))


def test_npz_matrix_contributes_all_its_columns_and_images_keep_their_shape(tmp_path: Path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 3))
    labels = np.array([0, 1] * 6)
    np.savez(tmp_path / "m.npz", x=features, bias=np.ones(12), y=labels)
    data = load_dataset(whole(tmp_path / "m.npz", target="y"), "auto", seed=0)
    assert data.info.feature_names == ["x[0]", "x[1]", "x[2]", "bias"]
    assert torch.equal(data.train.x, torch.tensor(np.column_stack([features, np.ones(12)]), dtype=torch.float32))
    assert data.info.image_shape is None
    pictures = rng.normal(size=(12, 2, 4, 5))
    np.savez(tmp_path / "img.npz", images=pictures, label=labels)
    data = load_dataset(whole(tmp_path / "img.npz", target="label"), "auto", seed=0)
    assert data.info.image_shape == (2, 4, 5) and data.info.n_features == 40
    assert torch.equal(data.train.x, torch.tensor(pictures.reshape(12, 40), dtype=torch.float32))
    with pytest.raises(ConfigError, match=r"data\.numeric_transform=quantile maps a table's numeric columns; .*NPZ"):
        load_dataset(whole(tmp_path / "m.npz", target="y", numeric_transform="quantile"), "auto", seed=0)


def test_limit_keeps_the_first_rows(tmp_path: Path):
    frame = pd.DataFrame({"a": np.arange(40.0), "y": [0, 1] * 20})
    # A counter is an id-like column: named here, it is kept (see the row-id tests below).
    data = load_dataset(whole(write(frame, tmp_path / "d.csv"), target="y", features=["a"], limit=10), "auto", seed=0)
    assert data.train.x[:, 0].tolist() == list(range(10))


def test_row_ids_are_left_out_of_the_default_features_with_a_warning(tmp_path: Path):
    # Sorted by class, the row number alone would predict the label (a test accuracy of 1.0 from the id).
    n = 40
    frame = pd.DataFrame(
        {
            "rownames": np.arange(1, n + 1),
            "counter": np.arange(100, 100 + n),
            "code": [f"r{i:03d}" for i in range(n)],
            "width": np.linspace(0.0, 1.0, n) ** 2,  # unique floats are a measurement, not an id
            "year": [2000 + i % 5 for i in range(n)],
            "y": [0] * (n // 2) + [1] * (n // 2),
        }
    )
    path = write(frame, tmp_path / "d.csv")
    with pytest.warns(GradwiseWarning) as caught:
        data = load_dataset(whole(path, target="y"), "auto", seed=0)
    assert data.info.feature_names == ["width", "year"]
    shown = [str(w.message) for w in caught]
    assert any("column 'rownames' looks like a row id (named like an id)" in m for m in shown)
    assert any("column 'counter' looks like a row id (an integer counting the rows)" in m for m in shown)
    assert any("column 'code' looks like a row id (a different text in every row)" in m for m in shown)
    # data.exclude leaves columns out by name; a name the file lacks is one line naming it.
    kept = load_dataset(whole(path, target="y", exclude=["rownames", "counter", "code", "year"]), "auto", seed=0)
    assert kept.info.feature_names == ["width"]
    with pytest.raises(DataError, match=r"d\.csv: no column 'nope' \(data\.exclude\); available columns: rownames"):
        load_dataset(whole(path, target="y", exclude=["nope"]), "auto", seed=0)
    with pytest.raises(ConfigError, match=r"data\.exclude narrows the default features"):
        validate({"data": {"name": "file", "path": str(path), "target": "y", "features": ["width"], "exclude": ["x"]}})


def test_json_booleans_are_numbers_in_features_and_labels_in_targets(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    rows = [{"smoker": i % 3 == 0, "y": i % 2 == 0} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_dataset(whole(path, target="y"), "auto", seed=0)
    assert data.train.x[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert data.info.class_names == ["false", "true"]
    # The same labels from a CSV are named alike, so a run trained on one format scores rows of the other.
    csv = tmp_path / "d.csv"
    csv.write_text("smoker,y\n" + "".join(f"{str(r['smoker']).lower()},{str(r['y']).lower()}\n" for r in rows))
    assert load_dataset(whole(csv, target="y"), "auto", seed=0).info.class_names == ["false", "true"]


def test_na_like_text_in_the_target_is_a_label_not_a_missing_value():
    y = clean_target(np.array([" None", "mild ", "NA", "mild"], dtype=object), "label", "pets.csv", str)
    assert y.tolist() == ["None", "mild", "NA", "mild"]


# --------------------------------------------------------------------------- bad data


def csv_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "people.csv"
    path.write_text(text)
    return path


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load_dataset(whole(path, **kwargs), kwargs.pop("task_kind", "auto"), seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert path.name in message
    return message


def test_missing_file(tmp_path: Path):
    assert load_error(tmp_path / "people.csv", target="y").endswith("people.csv: file not found")


def test_empty_file(tmp_path: Path):
    assert "file is empty" in load_error(csv_file(tmp_path, ""), target="y")


def test_target_is_required_and_must_exist(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0\n2,1\n")
    assert "data.target is required" in load_error(path, target=None)
    message = load_error(path, target="label")
    assert "no column 'label' (data.target); available columns: age, y" in message


def test_missing_feature_column_lists_the_available_ones(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0\n2,1\n")
    assert "no column 'weight' (data.features); available columns: age, y" in load_error(
        path, target="y", features=["weight"]
    )


def test_non_numeric_value_in_a_numeric_column_names_column_row_line_and_value(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0\n2,1\nabc,0\n4,1\n")
    message = load_error(path, target="y", columns={"age": "numeric"})
    assert "people.csv: column 'age' row 3 (line 4): 'abc' is not a number" in message


def test_a_column_of_numbers_and_a_word_is_categorical(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0\n2,1\nabc,0\n4,1\n")
    data = load_dataset(whole(path, target="y"), "auto", seed=0)
    assert data.info.feature_names == ["age=1", "age=2", "age=4", "age=abc"]


def test_empty_cell_in_a_feature_is_imputed_and_a_row_without_target_is_left_out(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0\n,1\n3,0\n")
    data = load_dataset(whole(path, target="y", standardize=False), "auto", seed=0)
    assert data.info.feature_names == ["age", "age.missing"]
    assert data.train.x.tolist() == [[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]]  # the median of 1 and 3
    path = csv_file(tmp_path, "age,y\n1,0\n2,1\n3,\n4,0\n")
    one_gap = r"1 row has no value in the target 'y' \(row 3 \(line 4\)\); it is left out"
    with pytest.warns(GradwiseWarning, match=one_gap):
        data = load_dataset(whole(path, target="y"), "auto", seed=0)
    assert data.train.x[:, 0].tolist() == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "npz"])
def test_nan_in_a_feature_is_imputed_and_a_row_without_target_is_left_out(tmp_path: Path, fmt: str):
    frame = pd.DataFrame({"age": [1.0, 2.0, np.nan, 4.0], "y": [0.5, 1.5, 2.5, 3.5]})
    data = load_dataset(whole(write(frame, tmp_path / f"d.{fmt}"), target="y", standardize=False), "auto", seed=0)
    assert data.train.x[:, 0].tolist() == [1.0, 2.0, 2.0, 4.0] and data.train.x[:, 1].tolist() == [0, 0, 1, 0]
    frame = pd.DataFrame({"age": [1.0, 2.0, 3.0, 4.0], "y": [0.5, np.nan, 2.5, 3.5]})
    where = {"parquet": "row 2", "jsonl": "row 2 (line 2)", "npz": "index 1"}[fmt]
    one_gap = rf"1 row has no value in the target 'y' \({re.escape(where)}\); it is left out"
    with pytest.warns(GradwiseWarning, match=one_gap):
        data = load_dataset(whole(write(frame, tmp_path / f"d.{fmt}"), target="y"), "auto", seed=0)
    assert data.train.y.ravel().tolist() == [0.5, 2.5, 3.5]


def test_infinite_value_is_not_a_finite_number(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0\ninf,1\n")
    assert "column 'age' row 2 (line 3): 'inf' is not a finite number" in load_error(path, target="y")


def test_classification_target_with_one_class(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,a\n2,a\n3,a\n")
    assert "column 'y' has a single class ('a') in its 3 rows" in load_error(path, target="y")


def test_text_target_with_task_kind_regression_names_the_value(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,2.5\n2,x\n3,1\n")
    with pytest.raises(DataError, match=r"people.csv: column 'y' row 2 \(line 3\): 'x' is not a number"):
        load_dataset(whole(path, target="y"), "regression", seed=0)


def test_too_few_rows_for_the_splits(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0.5\n2,1.5\n")
    message = load_error(path, target="y", val_fraction=0.5, test_fraction=0.4)
    assert "2 rows are too few to split" in message


def test_npz_arrays_of_different_lengths(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    assert "'x' has 5 rows but 'y' has 4" in load_error(tmp_path / "d.npz", target="y")


def test_npz_object_array_is_refused_when_used(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=np.arange(4.0), label=np.array(["a", "b", "a", "b"], dtype=object))
    assert "array 'label' holds Python objects" in load_error(tmp_path / "d.npz", target="label")


def test_features_that_include_the_target_or_repeat_are_config_errors(tmp_path: Path):
    path = csv_file(tmp_path, "age,y\n1,0\n2,1\n")
    with pytest.raises(ConfigError, match=r"data\.features includes the target column 'y'"):
        load_dataset(whole(path, target="y", features=["age", "y"]), "auto", seed=0)
    with pytest.raises(ConfigError, match=r"'age' is listed more than once"):
        load_dataset(whole(path, target="y", features=["age", "age"]), "auto", seed=0)
