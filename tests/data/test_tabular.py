"""Tabular preprocessing against scikit-learn fitted on the same training rows, and per-kind behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import OneHotEncoder, QuantileTransformer, StandardScaler

from gradwise.config import DataConfig
from gradwise.data import tabular
from gradwise.data.columns import detect_kind
from gradwise.data.load import load_dataset
from gradwise.data.readers import read_table
from gradwise.data.splits import split_indices
from gradwise.errors import DataError, GradwiseWarning


def messy_frame(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Strings, gaps, an id, a datetime, a boolean, a high-cardinality categorical and free text."""
    rng = np.random.default_rng(seed)
    size = rng.normal(10.0, 3.0, n).round(2)
    size[rng.random(n) < 0.15] = np.nan
    colour = rng.choice(["red", "green", "blue"], n).astype(object)
    colour[rng.random(n) < 0.1] = None
    city = np.array([f"city{int(k)}" for k in rng.integers(0, 40, n)], dtype=object)
    day = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, n), unit="D")
    member = rng.choice(["yes", "no"], n)
    words = ["great", "bad", "fine", "slow", "quick", "red", "awful", "lovely", "soft", "loud"]
    review = [" ".join(rng.choice(words, 5)) + f" {i}" for i in range(n)]
    label = np.where(np.nan_to_num(size, nan=10.0) + (colour == "red") * 3 > 11, "big", "small")
    return pd.DataFrame(
        {
            "customer_id": np.arange(1000, 1000 + n),
            "size": size,
            "colour": colour,
            "city": city,
            "day": day.strftime("%Y-%m-%d"),
            "member": member,
            "review": review,
            "label": label,
        }
    )


def config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(name="file", path=path, target="label", **kwargs)


@pytest.fixture
def messy_csv(tmp_path: Path) -> Path:
    path = tmp_path / "shop.csv"
    messy_frame().to_csv(path, index=False)
    return path


def training_rows(path: Path, data) -> np.ndarray:
    """The training split's row indices, made the way the loader makes them."""
    frame = pd.read_csv(path)
    y = np.searchsorted(np.array(data.info.class_names), frame["label"].to_numpy())
    return split_indices(len(frame), y, 0.15, 0.15, 0, str(path), data.info.class_names)[0]


def columns_of(data, prefix: str) -> list[int]:
    return [j for j, name in enumerate(data.info.feature_names) if name == prefix or name.startswith(prefix + "=")]


def test_kinds_detected_and_ids_and_text_left_out_with_a_warning(messy_csv: Path):
    with pytest.warns(GradwiseWarning) as caught:
        data = load_dataset(config(messy_csv), "auto", seed=0)
    said = " ".join(str(w.message) for w in caught)
    assert "'customer_id' looks like a row id" in said and "'review' looks like free text" in said
    kinds = {c["name"]: c["kind"] for c in data.info.preprocessing["columns"]}
    assert kinds == {
        "size": "numeric",
        "colour": "categorical",
        "city": "categorical",
        "day": "datetime",
        "member": "boolean",
    }
    assert {c["name"]: c["kind"] for c in data.info.left_out} == {"customer_id": "id", "review": "text"}
    city = next(c for c in data.info.preprocessing["columns"] if c["name"] == "city")
    assert city["encoding"] == "embedding" and data.info.embedded_sizes == [len(city["categories"]) + 1]
    assert set(data.train.x) == {"features", "categories"}
    json.dumps(data.info.preprocessing)  # the record is plain JSON


def test_numeric_column_equals_simple_imputer_then_standard_scaler(messy_csv: Path):
    data = load_dataset(config(messy_csv), "auto", seed=0)
    train = training_rows(messy_csv, data)
    size = pd.read_csv(messy_csv)[["size"]].to_numpy()[train]
    imputed = SimpleImputer(strategy="median", add_indicator=True).fit_transform(size)
    expected = np.column_stack([StandardScaler().fit_transform(imputed[:, :1]), imputed[:, 1]])
    at = [data.info.feature_names.index("size"), data.info.feature_names.index("size.missing")]
    np.testing.assert_allclose(data.train.x["features"][:, at].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_quantile_transform_equals_quantile_transformer_on_the_training_values(messy_csv: Path, tmp_path: Path):
    data = load_dataset(config(messy_csv, numeric_transform="quantile"), "auto", seed=0)
    train = training_rows(messy_csv, data)
    frame = pd.read_csv(messy_csv)
    size = frame[["size"]].to_numpy()
    # Fitted on the values present (QuantileTransformer skips NaN), applied to the imputed column.
    reference = QuantileTransformer(n_quantiles=1000, output_distribution="normal", subsample=None)
    reference.fit(size[train])
    imputed = SimpleImputer(strategy="median").fit(size[train]).transform(size)
    expected = reference.transform(imputed)[:, 0]
    at = data.info.feature_names.index("size")
    np.testing.assert_allclose(data.train.x["features"][:, at].numpy(), expected[train], rtol=1e-6, atol=1e-6)
    # Rows beyond the training range, and between its quantiles, as predict sees them.
    new = frame.head(4).copy()
    new["size"] = [-100.0, 100.0, 10.123, None]
    new.to_csv(tmp_path / "new.csv", index=False)
    inputs, _ = tabular.table_inputs(data.info, read_table(tmp_path / "new.csv", "csv"))
    np.testing.assert_allclose(
        inputs["features"][:, at].numpy(),
        reference.transform(SimpleImputer(strategy="median").fit(size[train]).transform(new[["size"]]))[:, 0],
        rtol=1e-6,
        atol=1e-6,
    )
    # The column table a run prints says which map a number took.
    shown = {line.split()[0]: line for line in tabular.describe(data.info).splitlines()}
    assert "quantiles -> normal" in shown["size"]


def test_a_numeric_column_of_few_values_is_standardized_under_the_quantile_transform(tmp_path: Path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"rooms": rng.integers(1, 5, 200), "area": rng.lognormal(3, 1, 200)})
    frame["label"] = np.where(frame["area"] > 20, "big", "small")
    frame.to_csv(tmp_path / "t.csv", index=False)
    data = load_dataset(config(tmp_path / "t.csv", numeric_transform="quantile"), "auto", seed=0)
    record = {col["name"]: col for col in data.info.preprocessing["columns"]}
    assert "quantiles" not in record["rooms"] and "quantiles" in record["area"]
    rooms = data.train.x[:, data.info.feature_names.index("rooms")].numpy()
    assert abs(rooms.mean()) < 1e-5 and abs(rooms.std() - 1) < 1e-2
    area = data.train.x[:, data.info.feature_names.index("area")].numpy()
    assert abs(float(np.median(area))) < 0.05 and area.max() < 5.3  # a normal's median and its clipped tail


def test_mean_imputation_without_indicator(messy_csv: Path):
    data = load_dataset(config(messy_csv, impute="mean", missing_indicator=False, standardize=False), "auto", seed=0)
    train = training_rows(messy_csv, data)
    size = pd.read_csv(messy_csv)[["size"]].to_numpy()[train]
    expected = SimpleImputer(strategy="mean").fit_transform(size)
    assert "size.missing" not in data.info.feature_names
    got = data.train.x["features"][:, data.info.feature_names.index("size")].numpy()
    np.testing.assert_allclose(got, expected[:, 0], rtol=1e-6)


def test_categorical_column_equals_most_frequent_imputer_then_one_hot_encoder(messy_csv: Path):
    data = load_dataset(config(messy_csv), "auto", seed=0)
    train = training_rows(messy_csv, data)
    colour = pd.read_csv(messy_csv)[["colour"]].to_numpy(dtype=object)[train]
    colour = np.where(pd.isna(colour), np.nan, colour)
    imputed = SimpleImputer(strategy="most_frequent", add_indicator=True).fit_transform(colour)
    one_hot = OneHotEncoder(sparse_output=False).fit_transform(imputed[:, :1])
    expected = np.column_stack([one_hot, imputed[:, 1].astype(float)])
    at = [*columns_of(data, "colour"), data.info.feature_names.index("colour.missing")]
    np.testing.assert_array_equal(data.train.x["features"][:, at].numpy(), expected)


def test_unseen_category_is_counted_and_sets_no_column_like_handle_unknown_ignore(messy_csv: Path, tmp_path: Path):
    data = load_dataset(config(messy_csv), "auto", seed=0)
    new = messy_frame(6, seed=1)
    new.loc[[1, 4], "colour"] = "purple"
    new.loc[2, "city"] = "atlantis"
    path = tmp_path / "new.csv"
    new.to_csv(path, index=False)
    inputs, unknown = tabular.table_inputs(data.info, read_table(path, "csv"))
    assert unknown == {"colour": 2, "city": 1}
    colour = inputs["features"][:, columns_of(data, "colour")]
    assert colour[1].sum() == 0 and colour[4].sum() == 0 and colour[0].sum() == 1
    city_col = [c["name"] for c in data.info.preprocessing["columns"] if c.get("encoding") == "embedding"].index("city")
    assert inputs["categories"][2, city_col] == 0  # the unknown bucket


def test_table_inputs_reproduce_the_training_split(messy_csv: Path):
    data = load_dataset(config(messy_csv), "auto", seed=0)
    train = training_rows(messy_csv, data)
    inputs, _ = tabular.table_inputs(data.info, read_table(messy_csv, "csv"))
    assert np.array_equal(inputs["features"][train].numpy(), data.train.x["features"].numpy())
    assert np.array_equal(inputs["categories"][train].numpy(), data.train.x["categories"].numpy())


def test_datetime_parts_and_boolean():
    values = np.array(["2024-03-01 00:00", "2024-03-04 12:30", "", "2023-12-31 06:00"], dtype=object)
    assert detect_kind("when", values) == ("datetime", "dates")
    record = tabular.fit({"when": values}, {"when": "datetime"}, np.arange(4), tabular.Settings(standardize=False), "t")
    assert tabular.feature_names(record) == ["when.days", "when.month", "when.weekday", "when.hour", "when.missing"]
    dense = tabular.encode(record, {"when": values}, "t", str).dense
    assert dense[1].tolist() == [19786.520833333332, 3.0, 0.0, 12.5, 0.0]  # 2024-03-04 is a Monday, day 19786
    assert dense[2].tolist() == [*np.median(dense[[0, 1, 3], :4], axis=0), 1.0]
    flags = np.array(["Yes", "no", None, "yes"], dtype=object)
    assert detect_kind("member", flags)[0] == "boolean"
    record = tabular.fit({"m": flags}, {"m": "boolean"}, np.arange(4), tabular.Settings(), "t")
    assert tabular.encode(record, {"m": flags}, "t", str).dense.tolist() == [[1, 0], [0, 0], [1, 1], [1, 0]]


def test_all_numeric_file_keeps_its_standardization(tmp_path: Path):
    frame = pd.DataFrame({"a": [1.0, 2.0, 4.0, 8.0, 16.0], "b": [3.0, 3.0, 3.0, 3.0, 3.0], "label": list("xyxyx")})
    path = tmp_path / "n.csv"
    frame.to_csv(path, index=False)
    data = load_dataset(config(path, val_fraction=0.0, test_fraction=0.0), "auto", seed=0)
    expected = StandardScaler().fit_transform(frame[["a", "b"]].to_numpy())
    order = np.argsort(data.train.x[:, 0].numpy())
    np.testing.assert_allclose(data.train.x.numpy()[order], expected, rtol=1e-6)
    assert data.info.preprocessing["columns"][1]["kind"] == "numeric"


def test_columns_override_and_errors(messy_csv: Path):
    data = load_dataset(config(messy_csv, columns={"customer_id": "categorical", "day": "id"}), "auto", seed=0)
    kinds = {c["name"]: c["kind"] for c in data.info.preprocessing["columns"]}
    assert kinds["customer_id"] == "categorical" and "day" not in kinds
    with pytest.raises(DataError, match=r"shop.csv: no column 'nope' \(data.columns\)"):
        load_dataset(config(messy_csv, columns={"nope": "numeric"}), "auto", seed=0)
    with pytest.raises(DataError, match=r"column 'colour' row 1 \(line 2\): '(red|green|blue)' is not a number"):
        load_dataset(config(messy_csv, columns={"colour": "numeric"}), "auto", seed=0)


def test_missing_column_at_predict_time_is_named(messy_csv: Path, tmp_path: Path):
    data = load_dataset(config(messy_csv), "auto", seed=0)
    path = tmp_path / "new.csv"
    messy_frame(5).drop(columns=["colour"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"new.csv: no column 'colour'; the run was trained with it"):
        tabular.table_inputs(data.info, read_table(path, "csv"))


def test_regression_target_is_standardized_and_outputs_come_back_in_its_units(tmp_path: Path):
    import torch

    from gradwise.config import validate
    from gradwise.models import build_model
    from gradwise.tasks import build_task

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=100), "label": rng.normal(5000.0, 800.0, 100)})
    path = tmp_path / "r.csv"
    frame.to_csv(path, index=False)
    data = load_dataset(config(path), "auto", seed=0)
    y = data.train.y.numpy().ravel()
    assert data.info.target_mean == pytest.approx(y.mean(), rel=1e-6)
    assert data.info.target_scale == pytest.approx(y.std(), rel=1e-5)
    cfg = validate({"data": {"name": "file", "path": str(path), "target": "label"}, "model": {"name": "linear"}})
    model = build_model(cfg.model, data.info)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(1.0)  # one standard deviation above the mean
    out = model(data.test.x)
    assert torch.allclose(out, torch.full_like(out, data.info.target_mean + data.info.target_scale))
    assert "target_mean" not in model.state_dict()  # the constants live in data_info.json
    task = build_task(cfg.task, data.info)
    loss = task.loss(out, data.test.y)
    standardized = ((out - data.test.y) / data.info.target_scale).pow(2).mean()
    assert loss.item() == pytest.approx(standardized.item(), rel=1e-6)
    meter = task.new_meter()
    meter.update(out, data.test.y)
    assert meter.compute()["mse"] == pytest.approx(((out - data.test.y) ** 2).mean().item(), rel=1e-5)


def test_dates_as_real_files_write_them():
    # One date per row is a daily series, not a row id.
    daily = np.array([str(d.date()) for d in pd.date_range("2024-01-01", periods=300)], dtype=object)
    assert detect_kind("when", daily) == ("datetime", "dates")
    # Local times either side of a daylight-saving change: offsets differ, the instants are read in UTC.
    local = np.array(["2024-03-30T12:00:00+0100", "2024-04-01T12:00:00+0200"], dtype=object)
    record = tabular.fit({"t": local}, {"t": "datetime"}, np.arange(2), tabular.Settings(standardize=False), "t")
    assert tabular.encode(record, {"t": local}, "t", str).dense[:, 3].tolist() == [11.0, 10.0]  # hours, UTC
    # No year, no date: a time of day would be read as today's date, a fraction as a day in year 1.
    assert detect_kind("slot", np.array(["10:30", "11:00", "14:15"] * 10, dtype=object))[0] == "categorical"
    assert detect_kind("share", np.array(["1/2", "3/4", "1/4"] * 10, dtype=object))[0] == "categorical"
    # A cell that is there but is no date is an error naming the row (never silently imputed).
    with pytest.raises(DataError, match=r"column 't' row 2: 'soon' is not a date"):
        tabular.encode(record, {"t": np.array(["2024-03-30", "soon"], dtype=object)}, "t", lambda i: f"row {i + 1}")


def test_missing_tokens_are_gaps_in_categories_and_booleans():
    """R writes NA for a gap, UCI files '?': a category so named keeps its information in the indicator."""
    sex = np.array(["male", "NA", "female", "?", "male"], dtype=object)
    assert detect_kind("sex", sex) == ("categorical", "2 categories")
    record = tabular.fit({"sex": sex}, {"sex": "categorical"}, np.arange(5), tabular.Settings(), "t")
    (col,) = record["columns"]
    assert col["categories"] == ["female", "male"] and col["fill"] == "male" and col["indicator"]
    reference = SimpleImputer(strategy="most_frequent").fit_transform(
        pd.DataFrame({"sex": [v if v not in ("NA", "?") else np.nan for v in sex]})
    )
    assert reference.ravel().tolist() == ["male", "male", "female", "male", "male"]
    flags = np.array(["yes", "NA", "no"], dtype=object)
    assert detect_kind("member", flags)[0] == "boolean"
    record = tabular.fit({"m": flags}, {"m": "boolean"}, np.arange(3), tabular.Settings(standardize=False), "t")
    assert tabular.encode(record, {"m": flags}, "t", str).dense[:, 1].tolist() == [0.0, 1.0, 0.0]


def test_na_in_a_numeric_target_is_a_gap_but_may_name_a_class(tmp_path: Path):
    frame = messy_frame(120)
    frame["price"] = (frame["size"].fillna(10) * 3).round(2).astype(object)
    frame.loc[[3, 50], "price"] = "NA"
    frame.to_csv(tmp_path / "r.csv", index=False)
    with pytest.warns(GradwiseWarning, match="2 rows have no value in the target 'price'"):
        data = load_dataset(DataConfig(name="file", path=tmp_path / "r.csv", target="price"), "auto", seed=0)
    assert data.info.kind == "regression" and len(data.train) + len(data.val) + len(data.test) == 118
    frame["region"] = np.where(np.arange(120) % 3 == 0, "NA", "EU")  # North America, a class
    frame.to_csv(tmp_path / "c.csv", index=False)
    data = load_dataset(DataConfig(name="file", path=tmp_path / "c.csv", target="region"), "auto", seed=0)
    assert data.info.class_names == ["EU", "NA"]


def test_a_few_undated_cells_are_gaps_recorded_for_predict_and_many_are_refused():
    days = [str(d.date()) for d in pd.date_range("2024-01-01", periods=600)]
    values = np.array(days, dtype=object)
    values[[1, 301, 599]] = "unknown"  # outside any sample, inside the training rows or not
    assert detect_kind("when", values) == ("datetime", "dates")
    with pytest.warns(GradwiseWarning, match=r"3 cells read as no date \('unknown'\); they are taken as missing"):
        record = tabular.fit({"when": values}, {"when": "datetime"}, np.arange(400), tabular.Settings(), "t")
    assert record["columns"][0]["gaps"] == ["unknown"]
    new = np.array(["2025-01-01", "unknown", "soon"], dtype=object)
    with pytest.raises(DataError, match=r"row 3: 'soon' is not a date"):  # a gap word never seen: an error
        tabular.encode(record, {"when": new}, "t", lambda i: f"row {i + 1}")
    assert tabular.encode(record, {"when": new[:2]}, "t", str).dense[1, -1] == 1.0  # 'unknown': missing, flagged
    mostly_words = np.array(days[:100] + ["n/k", "later", "tbd", "?", "soon", "x", "y"] * 10, dtype=object)
    with pytest.raises(DataError, match=r"set data.columns.when: categorical"):
        tabular.fit({"when": mostly_words}, {"when": "datetime"}, np.arange(170), tabular.Settings(), "t")


def test_an_all_nan_float_column_is_left_out_like_an_empty_csv_column(tmp_path: Path):
    frame = messy_frame(120)
    frame["empty"] = np.nan
    frame.to_parquet(tmp_path / "t.parquet")
    with pytest.warns(GradwiseWarning, match="column 'empty' has no values; it is left out"):
        data = load_dataset(DataConfig(name="file", path=tmp_path / "t.parquet", target="label"), "auto", seed=0)
    assert "empty" not in tabular.input_columns(data.info.preprocessing)
