"""``gradwise predict`` and ``Run.predict``: given a run's test rows, the metrics are ``eval``'s exactly.

Each run kind predicts from a file that a user would write: a messy CSV (strings, gaps, an id, a
date, a category read through an embedding) for a classifier and a regressor, an NPZ of 8x8 images
for a CNN and its ONNX Runtime int8 variant, a CSV text column for a MiniLM text classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, r2_score

import gradwise
from gradwise.cli import main
from gradwise.data.load import table_split_rows
from gradwise.errors import DataError

QUICK = ["log.progress=false", "log.plots=false"]


def messy_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Strings, gaps, an id, a date, a boolean and a 40-category column (an embedding at one_hot_max 10)."""
    rng = np.random.default_rng(seed)
    size = rng.normal(10.0, 3.0, n).round(2)
    size[rng.random(n) < 0.1] = np.nan
    colour = rng.choice(["red", "green", "blue"], n).astype(object)
    colour[rng.random(n) < 0.1] = None
    city = rng.integers(0, 40, n)
    day = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, n), unit="D")
    member = rng.choice(["yes", "no"], n)
    label = np.where(np.nan_to_num(size, nan=10.0) + (colour == "red") * 3 + (city % 2) > 11.5, "big", "small")
    price = 3.0 * np.nan_to_num(size, nan=10.0) + 5.0 * (colour == "red") + 0.1 * city + rng.normal(0, 1, n)
    return pd.DataFrame(
        {
            "order_id": np.arange(5000, 5000 + n),
            "size": size,
            "colour": colour,
            "city": [f"city{k}" for k in city],
            "day": day.strftime("%Y-%m-%d"),
            "member": member,
            "label": label,
            "price": price.round(3),
        }
    )


def train(tmp: Path, name: str, *argv: str) -> Path:
    assert main(["train", *argv, f"name={name}", f"out_dir={tmp}", *QUICK]) == 0
    return tmp / name


def write_test_rows(run: Path, path: Path, source: pd.DataFrame) -> pd.DataFrame:
    """The run's test rows of ``source``, in the split's order, written to ``path``."""
    cfg = gradwise.load(run).config
    _, _, test = table_split_rows(cfg.data, cfg.task.kind, cfg.seed)
    rows = source.iloc[test].reset_index(drop=True)
    rows.to_csv(path, index=False)
    return rows


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The shop table, a classifier on 'label' and a regressor on 'price' (each 6 epochs)."""
    tmp = tmp_path_factory.mktemp("shop")
    table = tmp / "shop.csv"
    messy_frame().to_csv(table, index=False)
    common = ["tabular", "data.name=file", f"data.path={table}", "data.one_hot_max=10", "data.exclude=[price]"]
    classifier = train(tmp, "label", *common, "data.target=label", "stop.epochs=6")
    common[-1] = "data.exclude=[label]"
    regressor = train(tmp, "price", *common, "data.target=price", "stop.epochs=6")
    return table, classifier, regressor


@pytest.mark.filterwarnings("ignore:.*looks like a row id")
def test_classifier_predicts_the_test_rows_as_eval_scores_them(shop, tmp_path: Path, capsys):
    table, run, _ = shop
    rows = write_test_rows(run, tmp_path / "test.csv", pd.read_csv(table))
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), str(tmp_path / "test.csv"), "-o", str(out), "--proba"]) == 0
    err = capsys.readouterr().err
    predicted = pd.read_csv(out)
    # The input's order and its id column, one prediction per row, probabilities that sum to one.
    assert predicted["order_id"].tolist() == rows["order_id"].tolist()
    assert predicted["price"].tolist() == rows["price"].tolist()  # named in data.exclude: copied through too
    assert set(predicted["prediction"]) <= {"big", "small"}
    np.testing.assert_allclose(predicted["probability_big"] + predicted["probability_small"], 1.0, atol=1e-12)
    assert ((predicted["probability_big"] > 0.5) == (predicted["prediction"] == "big")).all()
    # Scored against the target column: eval's test metrics to the last digit.
    shown = gradwise.load(run).predict(tmp_path / "test.csv").attrs["metrics"]
    assert {k.replace("input_", "test_"): v for k, v in shown.items()} == evaluated
    assert accuracy_score(rows["label"], predicted["prediction"]) == evaluated["test_accuracy"]
    assert f"input_accuracy {evaluated['test_accuracy']:.6g}" in err


@pytest.mark.filterwarnings("ignore:.*looks like a row id")
def test_regressor_predicts_in_the_targets_units(shop, tmp_path: Path):
    table, _, run = shop
    rows = write_test_rows(run, tmp_path / "test.csv", pd.read_csv(table))
    evaluated = gradwise.load(run).evaluate("test")
    predicted = gradwise.load(run).predict(rows)  # a DataFrame in, a DataFrame out
    assert {k.replace("input_", "test_"): v for k, v in predicted.attrs["metrics"].items()} == evaluated
    # The predictions are prices, not standardized values: scikit-learn's R² on them is eval's.
    assert r2_score(rows["price"], predicted["prediction"]) == pytest.approx(evaluated["test_r2"], abs=1e-5)
    assert evaluated["test_r2"] > 0.5
    # A DataFrame's index comes back, so predictions can be assigned to a filtered frame's rows.
    some = rows[rows["colour"] == "red"]
    assert gradwise.load(run).predict(some).index.equals(some.index)
    # An export keeps the encoding and the target's scale beside the weights.
    assert main(["export", str(run), "-o", str(tmp_path / "exported")]) == 0
    record = json.loads((tmp_path / "exported" / "data_info.json").read_text())
    assert record["target_scale"] > 1 and record["preprocessing"]["columns"]


@pytest.mark.filterwarnings("ignore:.*looks like a row id")
def test_new_rows_unseen_categories_and_bad_cells(shop, tmp_path: Path, capsys):
    _, run, _ = shop
    new = messy_frame(5, seed=3).drop(columns=["label", "price"])  # no target: predictions, no metrics
    new.loc[1, "city"] = "atlantis"
    new.loc[2, "colour"] = "purple"
    new.loc[3, "size"] = None
    new.to_json(tmp_path / "new.jsonl", orient="records", lines=True)
    assert main(["predict", str(run), str(tmp_path / "new.jsonl")]) == 0
    out, err = capsys.readouterr()
    predicted = pd.read_csv(pd.io.common.StringIO(out))
    assert predicted["order_id"].tolist() == new["order_id"].tolist() and len(predicted) == 5
    assert "column 'city': 1 row(s) with a category never seen in training" in err
    # The unknown bucket of an embedding is zeros after training, as an unknown's one-hot columns are.
    assert not gradwise.load(run).model.embeddings[0].weight[0].any()
    assert "column 'colour': 1 row(s)" in err and "scored" not in err
    # A cell that is not a number: one line naming the file, the column and the row; exit 2.
    new["size"] = new["size"].astype(object)
    new.loc[4, "size"] = "large"
    new.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["predict", str(run), str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.csv" in err and "'size'" in err and "row 5" in err, err
    # A column the run reads is missing.
    new.drop(columns=["city"]).to_csv(tmp_path / "short.csv", index=False)
    assert main(["predict", str(run), str(tmp_path / "short.csv")]) == 2
    assert "'city'" in capsys.readouterr().err
    with pytest.raises(DataError, match="'city'"):
        gradwise.load(run).predict(new.drop(columns=["city"]))
    assert main(["predict", str(run), str(tmp_path / "new.jsonl"), "-o", str(tmp_path / "p.txt")]) == 2
    assert "cannot tell the output format" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(tmp_path / "new.jsonl")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "new.jsonl"), "--proba"]) == 0  # a classifier: fine
    capsys.readouterr()


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits

    tmp = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    np.savez(tmp / "digits.npz", x=digits.images.astype(np.float32), y=digits.target)
    run = train(tmp, "cnn", "digits-cnn", "data.name=file", f"data.path={tmp / 'digits.npz'}", "data.target=y",
                "stop.epochs=2")  # fmt: skip
    return tmp / "digits.npz", run


def test_images_from_an_npz_and_their_onnx_int8_variant(digits_npz, tmp_path: Path, capsys):
    path, run = digits_npz
    cfg = gradwise.load(run).config
    _, _, test = table_split_rows(cfg.data, cfg.task.kind, cfg.seed)
    arrays = np.load(path)
    np.savez(tmp_path / "test.npz", x=arrays["x"][test], y=arrays["y"][test])
    predicted = gradwise.load(run).predict(tmp_path / "test.npz")
    evaluated = gradwise.load(run).evaluate("test")
    assert {k.replace("input_", "test_"): v for k, v in predicted.attrs["metrics"].items()} == evaluated
    assert accuracy_score(arrays["y"][test].astype(str), predicted["prediction"].astype(str)) == pytest.approx(
        evaluated["test_accuracy"], abs=0
    )
    # A bare array of images predicts too (no target: no metrics).
    bare = gradwise.load(run).predict(arrays["x"][test][:7])
    assert bare["prediction"].tolist() == predicted["prediction"].tolist()[:7] and bare.attrs["metrics"] is None
    # The ONNX Runtime int8 variant: its own recorded test metrics, within the budget of the source's.
    recipe = tmp_path / "c.yaml"
    recipe.write_text(
        "budget: {max_drop: 0.02}\nmeasure: {batch_sizes: [1], repeats: 2, warmup: 1, threads: 1}\n"
        "variants:\n  int8:\n    - quantize: {method: dynamic, backend: onnxruntime}\n"
    )
    assert main(["compress", str(run), str(recipe)]) == 0
    variant = run / "compressed" / "int8"
    assert (variant / "model.onnx").exists()
    capsys.readouterr()
    assert main(["predict", str(variant), str(tmp_path / "test.npz"), "-o", str(tmp_path / "int8.parquet")]) == 0
    recorded = gradwise.load(variant).summary["final"]
    onnx = gradwise.load(variant).predict(tmp_path / "test.npz").attrs["metrics"]
    assert onnx["input_accuracy"] == pytest.approx(recorded["test_accuracy"], abs=1e-9)
    assert onnx["input_loss"] == pytest.approx(recorded["test_loss"], rel=1e-6)
    assert onnx["input_accuracy"] >= evaluated["test_accuracy"] - 0.02
    assert len(pd.read_parquet(tmp_path / "int8.parquet")) == len(test)
    # Its summary counts the graph's weights (it has no torch parameters): about the source's, biases aside.
    assert 0.9 < gradwise.load(variant).summary["parameters"] / gradwise.load(run).summary["parameters"] <= 1


def test_an_npz_without_an_array_of_the_runs_width_is_refused(digits_npz, tmp_path: Path, capsys):
    _, run = digits_npz
    np.savez(tmp_path / "wrong.npz", x=np.zeros((3, 7, 7), dtype=np.float32))
    assert main(["predict", str(run), str(tmp_path / "wrong.npz")]) == 2
    err = capsys.readouterr().err
    assert "no array with 64 values per row" in err and "(3, 7, 7)" in err


@pytest.mark.slow
def test_a_text_classifier_reads_its_text_column(tmp_path: Path):
    from gradwise.data.text import read_topics

    frame = pd.DataFrame([(text, topic) for topic, texts in read_topics().items() for text in texts[:40]],
                         columns=["utterance", "topic"])  # fmt: skip
    frame.to_csv(tmp_path / "topics.csv", index=False)
    run = train(tmp_path, "txt", "minilm-topics-probe", "data.name=file", f"data.path={tmp_path / 'topics.csv'}",
                "data.text=utterance", "data.target=topic", "stop.epochs=2")  # fmt: skip
    rows = write_test_rows(run, tmp_path / "test.csv", frame)
    predicted = gradwise.load(run).predict(tmp_path / "test.csv", proba=True)
    evaluated = gradwise.load(run).evaluate("test")
    assert {k.replace("input_", "test_"): v for k, v in predicted.attrs["metrics"].items()} == evaluated
    assert accuracy_score(rows["topic"], predicted["prediction"]) == evaluated["test_accuracy"]
    assert len([c for c in predicted.columns if c.startswith("probability_")]) == frame["topic"].nunique()


@pytest.mark.filterwarnings("ignore:.*looks like a row id")
def test_variants_of_a_model_with_category_embeddings(shop, tmp_path: Path, capsys):
    """Pruning (unstructured and structured) and torchao int8 take the features-and-ids batches; ONNX refuses."""
    table, run, _ = shop
    write_test_rows(run, tmp_path / "test.csv", pd.read_csv(table))
    recipe = tmp_path / "c.yaml"
    recipe.write_text(
        "budget: {max_drop: 0.2}\nmeasure: {batch_sizes: [1, 8], repeats: 2, warmup: 1, threads: 1}\nvariants:\n"
        "  int8: [{quantize: {method: dynamic, backend: torchao}}]\n"
        "  half: [{prune: {sparsity: 0.5}}]\n"
        "  narrow: [{prune: {structured: 0.5}}]\n"
    )
    assert main(["compress", str(run), str(recipe), "--force"]) == 0
    capsys.readouterr()
    for name in ("int8", "half", "narrow"):
        variant = gradwise.load(run / "compressed" / name)
        metrics = variant.predict(tmp_path / "test.csv").attrs["metrics"]
        assert metrics["input_accuracy"] == variant.summary["final"]["test_accuracy"], name
    assert gradwise.load(run / "compressed" / "half").summary["sparsity"] == pytest.approx(0.5, abs=0.01)
    narrow = gradwise.load(run / "compressed" / "narrow").summary["parameters"]
    assert narrow < gradwise.load(run).summary["parameters"] / 2
    onnx = tmp_path / "onnx.yaml"
    onnx.write_text("budget: {max_drop: 0.2}\nvariants:\n  int8: [{quantize: {method: dynamic}}]\n")
    assert main(["compress", str(run), str(onnx)]) == 2
    assert "reads features, categories (a table with categorical embeddings)" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*looks like a row id")
@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda p: p["columns"][0].pop("fill"), "column 'size': fill"),
        (lambda p: p["mean"].pop(), "mean does not hold"),
        (lambda p: p["columns"][1].update(kind="colour"), "column entry"),
        (lambda p: p["columns"][1].update(fill="purple"), "fill 'purple' is not one of its categories"),
        (lambda p: p["columns"][3]["parts"].append("hour2"), "column 'day': parts"),
        (lambda p: p["columns"][0].update(quantiles=[2.0, 1.0]), "column 'size': quantiles are not increasing"),
        (lambda p: p["columns"][0].update(quantiles="x"), "column 'size': quantiles are not increasing"),
    ],
)
def test_a_damaged_preprocessing_record_is_one_line(shop, tmp_path: Path, capsys, damage, said):
    import shutil

    _, run, _ = shop
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("compressed"))
    info = json.loads((copy / "data_info.json").read_text())
    damage(info["preprocessing"])
    (copy / "data_info.json").write_text(json.dumps(info))
    messy_frame(3).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(copy), str(tmp_path / "new.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "preprocessing record is damaged" in err and said in err, err


def test_an_empty_column_is_left_out(tmp_path: Path):
    frame = messy_frame(120)
    frame["notes"] = None
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.warns(Warning, match="column 'notes' has no values; it is left out"):
        run = train(tmp_path, "t", "tabular", "data.name=file", f"data.path={tmp_path / 't.csv'}",
                    "data.target=label", "data.exclude=[price]", "stop.epochs=2")  # fmt: skip
    assert {"name": "notes", "kind": "empty", "reason": "no values"} in json.loads(
        (run / "data_info.json").read_text()
    )["left_out"]
