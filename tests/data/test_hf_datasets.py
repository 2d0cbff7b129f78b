"""Hugging Face datasets on disk, written by the real ``datasets`` library, as tables and as a text corpus.

gradwise reads them with pyarrow alone (``datasets`` is a test dependency, not a runtime one): a
``save_to_disk`` directory or an ``.arrow`` file is a table for ``data.name=file`` and a source for
``data.name=text_files``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradwise.cli import main
from gradwise.config import DataConfig
from gradwise.data.load import load_dataset
from gradwise.data.readers import detect_format, read_table
from gradwise.errors import DataError

datasets = pytest.importorskip("datasets")


def shop_rows(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    size = rng.normal(10, 3, n).round(2)
    colour = rng.choice(["red", "green", "blue"], n)
    return pd.DataFrame(
        {"size": size, "colour": colour, "label": np.where(size + 3 * (colour == "red") > 11, "big", "small")}
    )


def test_a_saved_dataset_is_a_table_as_pandas_reads_it(tmp_path: Path):
    frame = shop_rows()
    frame.loc[5, "size"] = None
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "shop"), num_shards=3)
    assert detect_format(tmp_path / "shop", "auto") == "arrow"
    table = read_table(tmp_path / "shop", "arrow")
    assert table.names == ["size", "colour", "label"]
    np.testing.assert_array_equal(table.column("colour"), frame["colour"].to_numpy(dtype=object))
    np.testing.assert_array_equal(table.column("size"), frame["size"].to_numpy())  # NaN where it was missing
    data = load_dataset(DataConfig(name="file", path=tmp_path / "shop", target="label"), "auto", seed=0)
    assert data.info.class_names == ["big", "small"] and len(data.train) + len(data.val) + len(data.test) == 200
    assert [c["kind"] for c in data.info.preprocessing["columns"]] == ["numeric", "categorical"]


def test_train_and_predict_from_saved_datasets(tmp_path: Path, capsys):
    datasets.Dataset.from_pandas(shop_rows(400)).save_to_disk(str(tmp_path / "shop"))
    args = ["train", "tabular", "data.name=file", f"data.path={tmp_path / 'shop'}", "data.target=label"]
    assert main([*args, "stop.epochs=40", "log.progress=false", f"out_dir={tmp_path}", "name=run"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] >= 0.85
    datasets.Dataset.from_pandas(shop_rows(7, seed=1)).save_to_disk(str(tmp_path / "new"))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new")]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 8 and "input_accuracy" in err


def test_a_saved_text_dataset_is_a_language_modeling_corpus(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GRADWISE_CACHE", str(tmp_path / "cache"))
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 40)) + "." for _ in range(300)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(300))}).save_to_disk(str(tmp_path / "docs"))
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(
        json.dumps(
            {
                "data": {"name": "text_files", "paths": str(tmp_path / "docs"), "vocab_size": 300, "seq_len": 32},
                "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32},
                "task": {"kind": "language_modeling"},
                "optim": {"name": "adamw", "lr": 0.01},
                "batch": {"size": 16},
                "stop": {"epochs": None, "max_steps": 60},
                "eval": {"every_steps": 60},
                "log": {"progress": False, "plots": False},
                "out_dir": str(tmp_path / "runs"),
                "name": "lm",
            }
        )
    )
    assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "runs" / "lm" / "summary.json").read_text())
    # 15 words in random order: a model that learned the words beats the unigram baseline's perplexity.
    assert summary["final"]["test_perplexity"] < summary["unigram_perplexity"]["value"]


def test_a_saved_dataset_dict_names_its_splits(tmp_path: Path):
    split = datasets.Dataset.from_pandas(shop_rows(20))
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a saved DatasetDict; point at one of its splits \(test, train\)"):
        detect_format(tmp_path / "dd", "auto")
    assert read_table(tmp_path / "dd" / "train", detect_format(tmp_path / "dd" / "train", "auto")).names[0] == "size"


def test_class_label_ids_are_read_as_their_names(tmp_path: Path):
    frame = shop_rows(120)
    features = datasets.Features(
        {"size": datasets.Value("float64"), "colour": datasets.Value("string"),
         "label": datasets.ClassLabel(names=["big", "small"])}
    )  # fmt: skip
    saved = datasets.Dataset.from_pandas(frame, features=features)
    assert saved["label"][:3] == [int(v == "small") for v in frame["label"][:3]]  # stored as ids
    saved.save_to_disk(str(tmp_path / "shop"))
    assert read_table(tmp_path / "shop", "arrow").column("label").tolist() == frame["label"].tolist()
    data = load_dataset(DataConfig(name="file", path=tmp_path / "shop", target="label"), "auto", seed=0)
    assert data.info.class_names == ["big", "small"]
