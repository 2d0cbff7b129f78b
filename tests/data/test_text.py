"""Text data: the chatterbot topics and text files, tokenized once into padded id rows with their lengths."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from gradwise.config import DataConfig
from gradwise.data.text import load_text_dataset, load_tokenizer, read_topics, tokenize_texts
from gradwise.errors import ConfigError, DataError
from gradwise.models.hf_encoder import bundled_minilm_dir

os.environ["HF_HUB_OFFLINE"] = "1"

TOKENIZER = bundled_minilm_dir()
CLS, SEP, PAD = 101, 102, 0

# The default rule (topics with ≥ 40 distinct utterances, capped at 150) on chatterbot-corpus 1.3.3.
DEFAULT_COUNTS = {
    "ai": 150,
    "coding": 150,
    "computers": 45,
    "conversations": 121,
    "emotion": 150,
    "literature": 73,
    "money": 46,
    "movies": 46,
    "psychology": 119,
    "science": 48,
    "sports": 48,
    "trivia": 150,
}


def all_rows(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = data.info.n_features
    xs = [s.x for s in (data.train, data.val, data.test)]
    assert all(x.shape[1] == width for x in xs)
    return (
        torch.cat(xs),
        torch.cat([s.y for s in (data.train, data.val, data.test)]),
        torch.cat([s.lengths for s in (data.train, data.val, data.test)]),
    )


def class_counts(data) -> dict[str, int]:
    _, y, _ = all_rows(data)
    return dict(zip(data.info.class_names, torch.bincount(y).tolist(), strict=True))


@pytest.fixture(scope="module")
def topics():
    return load_text_dataset(DataConfig(name="topics"), "auto", seed=0, tokenizer_dir=TOKENIZER)


def test_distinct_utterances_per_topic_as_read_from_the_yaml():
    counts = {name: len(texts) for name, texts in read_topics().items()}
    assert len(counts) == 21
    assert counts["tech_support"] == 20  # 2,100 lines, 20 distinct
    assert counts["trivia"] == 536 and counts["health"] == 9
    assert all(text == text.strip() and text for texts in read_topics().values() for text in texts)


def test_default_topics_classes_and_info(topics):
    assert class_counts(topics) == DEFAULT_COUNTS
    info = topics.info
    assert info.kind == "classification" and info.n_outputs == 12
    assert info.class_names == sorted(DEFAULT_COUNTS)
    assert (info.feature_names, info.target_name, info.name) == (["text"], "topic", "topics")
    assert (info.vocab_size, info.pad_token_id, info.tokenizer_dir) == (30522, PAD, str(TOKENIZER))
    assert info.image_shape is None
    assert [len(topics.train), len(topics.val), len(topics.test)] == [802, 172, 172]  # val/test = ceil(0.15·1146)


def test_rows_are_cls_tokens_sep_then_padding(topics):
    x, _, lengths = all_rows(topics)
    assert x.dtype == torch.int64 and lengths.dtype == torch.int64
    assert topics.info.n_features == x.shape[1] == int(lengths.max()) == 128  # some utterances are truncated
    rows = torch.arange(len(x))
    assert (x[:, 0] == CLS).all() and (x[rows, lengths - 1] == SEP).all()
    positions = torch.arange(x.shape[1])
    assert ((x == PAD) == (positions >= lengths[:, None])).all()  # pad exactly after each text, never inside


def test_tokenize_texts_matches_the_tokenizer():
    tokenizer = load_tokenizer(TOKENIZER)
    texts = ["What is a dog?", "Hi", "one two three four five six seven eight nine ten"]
    x, lengths = tokenize_texts(tokenizer, texts, max_length=8)
    assert lengths.tolist() == [7, 3, 8]
    assert x[0, :7].tolist() == tokenizer("What is a dog?")["input_ids"]
    assert x[1].tolist() == [CLS, 7632, SEP, PAD, PAD, PAD, PAD, PAD]
    assert x[2, -1] == SEP  # truncated, still closed by [SEP]


def test_splits_are_stratified_and_seeded(topics):
    overall = np.array(list(DEFAULT_COUNTS.values())) / 1146
    for split in (topics.train, topics.val, topics.test):
        share = np.bincount(split.y.numpy(), minlength=12) / len(split)
        np.testing.assert_allclose(share, overall, atol=2.0 / len(split))
    again = load_text_dataset(DataConfig(name="topics"), "auto", seed=0, tokenizer_dir=TOKENIZER)
    assert torch.equal(again.test.x, topics.test.x) and torch.equal(again.train.y, topics.train.y)


def test_the_seed_picks_which_utterances_a_capped_topic_keeps(topics):
    other = load_text_dataset(DataConfig(name="topics"), "auto", seed=1, tokenizer_dir=TOKENIZER)
    assert class_counts(other) == DEFAULT_COUNTS

    def rows_of(data, topic: str) -> set[tuple[int, ...]]:
        x, y, _ = all_rows(data)
        k = data.info.class_names.index(topic)
        return {tuple(r.tolist()) for r in x[y == k]}

    assert rows_of(topics, "trivia") != rows_of(other, "trivia")
    assert rows_of(topics, "computers") == rows_of(other, "computers")  # uncapped: all 45 either way


def test_limit_keeps_every_class_in_proportion():
    data = load_text_dataset(DataConfig(name="topics", limit=100), "auto", seed=0, tokenizer_dir=TOKENIZER)
    counts = class_counts(data)
    assert sum(counts.values()) == 100
    for topic, n in DEFAULT_COUNTS.items():
        assert abs(counts[topic] - 100 * n / 1146) <= 1, topic


def test_named_topics_keep_every_utterance():
    cfg = DataConfig(name="topics", topics=["trivia", "tech_support"], val_fraction=0.1, test_fraction=0.1)
    data = load_text_dataset(cfg, "auto", seed=0, tokenizer_dir=TOKENIZER)
    assert class_counts(data) == {"tech_support": 20, "trivia": 536}


@pytest.mark.parametrize(
    ("topics", "message"),
    [
        (["trivia", "cooking"], r"data\.topics: no topic 'cooking'; available: ai, botprofile"),
        (["trivia"], "at least two topics"),
        (["trivia", "ai", "trivia"], "more than once"),
    ],
)
def test_bad_topic_lists_are_config_errors(topics, message):
    with pytest.raises(ConfigError, match=message):
        load_text_dataset(DataConfig(name="topics", topics=topics), "auto", seed=0, tokenizer_dir=TOKENIZER)


# --------------------------------------------------------------------------- files


def write_csv(path, rows: list[tuple[str, str]]) -> None:
    lines = ["text,label", *(f'"{text}",{label}' for text, label in rows)]
    path.write_text("\n".join(lines) + "\n")


def reviews(n: int = 20) -> list[tuple[str, str]]:
    return [(f"review number {i} was {'great' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(n)]


def test_csv_text_classification(tmp_path):
    file = tmp_path / "reviews.csv"
    write_csv(file, reviews())
    data = load_text_dataset(
        DataConfig(name="file", path=file, text="text", target="label"), "auto", 0, tokenizer_dir=TOKENIZER
    )
    info = data.info
    assert (info.kind, info.class_names, info.target_name, info.name) == (
        "classification",
        ["neg", "pos"],
        "label",
        "reviews.csv",
    )
    assert info.source == str(file)
    x, y, lengths = all_rows(data)
    assert len(y) == 20 and Counter(y.tolist()) == {0: 10, 1: 10}
    tokenizer = load_tokenizer(TOKENIZER)
    first = tokenizer("review number 0 was bad")["input_ids"]
    assert first in [row[:n].tolist() for row, n in zip(x, lengths, strict=True)]


def test_jsonl_numeric_target_is_regressed_and_limit_keeps_the_first_rows(tmp_path):
    file = tmp_path / "scores.jsonl"
    rows = [{"review": f"text {i}", "score": i * 0.37} for i in range(30)]
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(name="file", path=file, text="review", target="score", limit=25)
    data = load_text_dataset(cfg, "auto", 0, tokenizer_dir=TOKENIZER)
    assert data.info.kind == "regression" and data.info.n_outputs == 1 and data.info.class_names is None
    _, y, _ = all_rows(data)
    assert y.dtype == torch.float32 and y.shape == (25, 1)
    np.testing.assert_allclose(sorted(y[:, 0].tolist()), [i * 0.37 for i in range(25)], rtol=1e-6)


def test_file_errors_name_the_file_column_and_row(tmp_path):
    file = tmp_path / "r.csv"
    rows = reviews()
    rows[2] = ("  ", "pos")
    write_csv(file, rows)
    cfg = DataConfig(name="file", path=file, text="text", target="label")
    with pytest.raises(DataError, match=r"r\.csv: column 'text' row 3 \(line 4\): empty text"):
        load_text_dataset(cfg, "auto", 0, tokenizer_dir=TOKENIZER)
    write_csv(file, reviews())
    with pytest.raises(DataError, match=r"no column 'body' \(data\.text\); available columns: text, label"):
        load_text_dataset(cfg.model_copy(update={"text": "body"}), "auto", 0, tokenizer_dir=TOKENIZER)
    with pytest.raises(DataError, match=r"no column 'y' \(data\.target\); available columns: text, label"):
        load_text_dataset(cfg.model_copy(update={"target": "y"}), "auto", 0, tokenizer_dir=TOKENIZER)
    write_csv(file, [(text, "pos") for text, _ in reviews()])
    with pytest.raises(DataError, match="single class"):
        load_text_dataset(cfg, "auto", 0, tokenizer_dir=TOKENIZER)


def test_missing_text_in_jsonl_and_bad_tokenizer_dir(tmp_path):
    file = tmp_path / "t.jsonl"
    file.write_text('{"t": "fine", "y": 1}\n{"y": 0}\n')
    with pytest.raises(DataError, match=r"column 't' row 2 \(line 2\): missing value, expected text"):
        load_text_dataset(DataConfig(name="file", path=file, text="t", target="y"), "auto", 0, TOKENIZER)
    with pytest.raises(ConfigError, match="no usable tokenizer"):
        load_text_dataset(DataConfig(name="topics"), "auto", 0, tokenizer_dir=tmp_path)
