"""The stdlib corpus: file-level splits, the tokenizer, block packing, the cache and the unigram baseline."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from gradwise.config import DataConfig
from gradwise.data import Split
from gradwise.data.corpus import (
    EOT,
    list_stdlib_files,
    load_corpus_dataset,
    pack_blocks,
    prepare_corpus,
    read_documents,
    split_files,
    stdlib_root,
    train_tokenizer,
    unigram_perplexity,
)
from gradwise.errors import DataError

CFG = DataConfig(name="python_source", corpus_chars=200_000, vocab_size=512, seq_len=64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_candidate_files_exclude_tests_tools_and_generated_tables():
    files = list_stdlib_files(stdlib_root())
    paths = [p for p, _ in files]
    assert paths == sorted(paths) and len(paths) > 300
    assert "argparse.py" in paths and "json/decoder.py" in paths
    for path in paths:
        parts = path.split("/")
        assert parts[0] not in ("site-packages", "idlelib", "lib2to3", "encodings", "pydoc_data")
        assert "test" not in parts[:-1] and "tests" not in parts[:-1]
        assert not parts[-1].startswith("_sysconfigdata")


def test_documents_fill_exactly_corpus_chars_in_a_seed_free_order():
    root = stdlib_root()
    docs = read_documents(root, list_stdlib_files(root), 200_000)
    assert sum(len(t) for _, t in docs) == 200_000
    assert [p for p, _ in docs] != sorted(p for p, _ in docs)  # hashed order mixes packages
    assert docs[0][1] == (root / docs[0][0]).read_text(encoding="utf-8")


def test_split_files_by_character_share_by_hand():
    sizes = [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    members = split_files(sizes, 0.2, 0.1, seed=3)
    assert [len(members[s]) for s in ("train", "val", "test")] == [7, 2, 1]
    assert sorted(i for indices in members.values() for i in indices) == list(range(10))
    assert members == split_files(sizes, 0.2, 0.1, seed=3)
    assert members != split_files(sizes, 0.2, 0.1, seed=4)
    # One huge file never fits a 15% share: it lands in training, and the shares stay near the fractions.
    big = split_files([1000] + [10] * 40, 0.15, 0.15, seed=0)
    assert 0 in big["train"]


def test_split_files_gives_an_empty_share_the_smallest_training_file():
    members = split_files([50, 60, 70], 0.01, 0.0, seed=0)
    assert members == {"train": [1, 2], "val": [0], "test": []}


def test_split_files_rejects_too_few_files():
    with pytest.raises(DataError, match=r"python_source: 2 file\(s\) are too few.*data.corpus_chars"):
        split_files([100, 100], 0.2, 0.2, seed=0)


def test_split_by_file_is_deterministic_disjoint_and_covers_the_corpus(tmp_path: Path, cache: Path):
    first = prepare_corpus(CFG, seed=0, cache_root=cache)
    rebuilt = prepare_corpus(CFG, seed=0, cache_root=tmp_path)  # an empty cache: built again from scratch
    assert rebuilt.files == first.files
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(rebuilt.streams[name], first.streams[name])
    assert (rebuilt.directory / "tokenizer.json").read_bytes() == (first.directory / "tokenizer.json").read_bytes()

    train, val, test = (set(first.files[s]) for s in ("train", "val", "test"))
    assert val and test and not (train & val) and not (train & test) and not (val & test)
    root = stdlib_root()
    corpus = {p for p, _ in read_documents(root, list_stdlib_files(root), CFG.corpus_chars)}
    assert train | val | test == corpus

    other = prepare_corpus(CFG, seed=1, cache_root=cache)
    assert other.files != first.files and other.directory != first.directory


def test_tokenizer_is_trained_on_train_only_and_round_trips_source(cache: Path):
    corpus = prepare_corpus(CFG, seed=0, cache_root=cache)
    tokenizer = Tokenizer.from_file(str(corpus.directory / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 512 == corpus.vocab_size
    assert tokenizer.token_to_id(EOT) == corpus.eot_id
    text = "def f(x: int) -> str:\n    return f'{x!r} µ ∑ 🐍'  # non-ASCII survives byte-level BPE\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # Retraining on the training files alone gives the very same tokenizer: no validation text leaked in.
    root = stdlib_root()
    texts = dict(read_documents(root, list_stdlib_files(root), CFG.corpus_chars))
    retrained = train_tokenizer([texts[p] for p in corpus.files["train"]], CFG.vocab_size)
    assert retrained.to_str() == tokenizer.to_str()
    with_val = train_tokenizer([texts[p] for p in corpus.files["train"] + corpus.files["val"]], CFG.vocab_size)
    assert with_val.to_str() != tokenizer.to_str()
    # The validation stream decodes back to its files' text, each preceded by <|endoftext|>.
    stream = corpus.streams["val"]
    assert stream[0] == corpus.eot_id
    cuts = [*np.flatnonzero(stream == corpus.eot_id).tolist(), len(stream)]
    first_file = (root / corpus.files["val"][0]).read_text(encoding="utf-8")
    decoded = tokenizer.decode(stream[cuts[0] + 1 : cuts[1]].tolist())
    assert first_file.startswith(decoded) and len(decoded) > 0.9 * min(len(first_file), CFG.corpus_chars)
    assert len(cuts) - 1 == len(corpus.files["val"])


def test_blocks_are_shifted_windows_of_the_stream(cache: Path):
    data = load_corpus_dataset(CFG, seed=0, cache_root=cache)
    stream = torch.from_numpy(prepare_corpus(CFG, seed=0, cache_root=cache).streams["train"].astype(np.int64))
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == split.y.dtype == torch.int64
        assert split.x.shape == split.y.shape and split.x.shape[1] == 64 and len(split) > 50
        assert split.lengths is None
        assert torch.equal(split.x[:, 1:], split.y[:, :-1])
    n = len(data.train)
    assert n == len(stream) // 65
    assert torch.equal(data.train.x[0], stream[:64]) and torch.equal(data.train.y[0], stream[1:65])
    assert torch.equal(data.train.x[1], stream[65:129])  # non-overlapping: the next block starts after 65
    assert torch.equal(data.train.y[-1], stream[65 * n - 64 : 65 * n])


def test_pack_blocks_by_hand():
    split = pack_blocks(np.arange(10, dtype=np.uint16), seq_len=2)
    assert split.x.tolist() == [[0, 1], [3, 4], [6, 7]]
    assert split.y.tolist() == [[1, 2], [4, 5], [7, 8]]


def test_info_describes_the_corpus(cache: Path):
    info = load_corpus_dataset(CFG, seed=0, cache_root=cache).info
    corpus = prepare_corpus(CFG, seed=0, cache_root=cache)
    assert info.kind == "language_modeling" and info.name == "python_source"
    assert info.n_features == 64 and info.n_outputs == info.vocab_size == 512
    assert info.pad_token_id == corpus.eot_id and info.tokenizer_dir == str(corpus.directory)
    assert info.class_names is None and info.feature_names == ["tokens"] and info.target_name == "next token"
    n_files = sum(len(f) for f in corpus.files.values())
    assert info.source.startswith("Python 3.") and f"({n_files} files, 200,000 chars)" in info.source


def test_cache_hit_is_fast_identical_and_pickle_free(cache: Path):
    first = load_corpus_dataset(CFG, seed=0, cache_root=cache)
    directory = Path(first.info.tokenizer_dir)
    mtime = (directory / "train.npy").stat().st_mtime_ns
    started = time.perf_counter()
    again = load_corpus_dataset(CFG, seed=0, cache_root=cache)
    assert time.perf_counter() - started < 1.0
    assert (directory / "train.npy").stat().st_mtime_ns == mtime  # read, not rebuilt
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).x, getattr(again, name).x)
        assert torch.equal(getattr(first, name).y, getattr(again, name).y)
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta.json",
        "test.npy",
        "tokenizer.json",
        "train.npy",
        "val.npy",
    ]
    np.load(directory / "train.npy", allow_pickle=False)


def test_a_new_seq_len_or_limit_reuses_the_cache(cache: Path):
    base = load_corpus_dataset(CFG, seed=0, cache_root=cache)
    longer = load_corpus_dataset(CFG.model_copy(update={"seq_len": 128, "limit": 7}), seed=0, cache_root=cache)
    assert longer.info.tokenizer_dir == base.info.tokenizer_dir
    assert longer.train.x.shape == (7, 128)
    assert len(longer.val) == len(prepare_corpus(CFG, seed=0, cache_root=cache).streams["val"]) // 129


def test_limit_keeps_the_first_training_blocks(cache: Path):
    full = load_corpus_dataset(CFG, seed=0, cache_root=cache)
    limited = load_corpus_dataset(CFG.model_copy(update={"limit": 5}), seed=0, cache_root=cache)
    assert torch.equal(limited.train.x, full.train.x[:5]) and torch.equal(limited.val.y, full.val.y)


def test_a_damaged_cache_is_rebuilt(tmp_path: Path):
    first = prepare_corpus(CFG, seed=0, cache_root=tmp_path)
    (first.directory / "val.npy").write_bytes(b"not numpy")
    again = prepare_corpus(CFG, seed=0, cache_root=tmp_path)
    np.testing.assert_array_equal(again.streams["val"], first.streams["val"])


def test_seq_len_longer_than_a_split_is_a_data_error(cache: Path):
    with pytest.raises(DataError, match=r"python_source: the train split has \d+ tokens.*lower data.seq_len"):
        load_corpus_dataset(CFG.model_copy(update={"seq_len": 100_000}), seed=0, cache_root=cache)


def test_cache_root_defaults_to_gradwise_cache(monkeypatch: pytest.MonkeyPatch, cache: Path):
    monkeypatch.setenv("GRADWISE_CACHE", str(cache))
    info = load_corpus_dataset(CFG, seed=0).info
    assert Path(info.tokenizer_dir).parent == cache / "corpus"


def test_unigram_perplexity_by_hand():
    # Train targets 0, 0, 1 with V = 3: add-one counts 3, 2, 1 → p = 1/2, 1/3, 1/6.
    train = Split(x=torch.zeros(1, 3, dtype=torch.long), y=torch.tensor([[0, 0, 1]]))
    val = Split(x=torch.zeros(1, 2, dtype=torch.long), y=torch.tensor([[0, 2]]))
    # exp(-(ln 1/2 + ln 1/6) / 2) = sqrt(12)
    assert unigram_perplexity(train, val, vocab_size=3) == pytest.approx(math.sqrt(12), rel=1e-12)
    # A uniform model over V tokens has perplexity V.
    empty = Split(x=torch.zeros(0, 3, dtype=torch.long), y=torch.zeros(0, 3, dtype=torch.long))
    assert unigram_perplexity(empty, val, vocab_size=7) == pytest.approx(7.0)
    # Untrained positions (-100) count on neither side; nothing left to score is NaN, not an error.
    masked = Split(x=train.x, y=torch.cat([train.y, torch.full_like(train.y, -100)], dim=-1))
    assert unigram_perplexity(masked, val, vocab_size=3) == pytest.approx(math.sqrt(12), rel=1e-12)
    nothing = Split(x=val.x, y=torch.full_like(val.y, -100))
    assert math.isnan(unigram_perplexity(train, nothing, vocab_size=3))
