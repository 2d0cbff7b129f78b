"""Text classification/regression data: utterances or a text column, tokenized once into padded id rows.

Two sources:

- ``topics``: the English files of the installed chatterbot-corpus package.
  Every string of every conversation is one example, labelled by its file's
  topic (the file stem, e.g. ``trivia``). Identical (text, topic) pairs are
  kept once and empty texts dropped; a text that appears under two topics
  (a few short ones such as "Yes." in ai and emotion) keeps both labels, as the
  corpus has it. ``data.topics`` names the topics to use (every utterance of each);
  unset, the default is every topic with at least :data:`MIN_TOPIC_UTTERANCES`
  distinct utterances, each capped at :data:`MAX_TOPIC_UTTERANCES` drawn by
  the seed. With chatterbot-corpus 1.3.3 that gives 12 classes, 1,146
  examples: ai 150 (of 163), coding 150 (of 194), computers 45,
  conversations 121, emotion 150 (of 247), literature 73, money 46, movies 46,
  psychology 119, science 48, sports 48, trivia 150 (of 536). Left out:
  tech_support (its 2,100 lines hold only 20 distinct ones), botprofile,
  food, gossip, greetings, health, history, humor, politics (all under 40).
- ``file`` with ``data.text``: the text column of a CSV, JSONL or Parquet
  file and ``data.target`` as the label (coded as for tabular files; a numeric
  target may be regressed, see :mod:`gradwise.data.targets`).

Examples are ordered as a stratified prefix (each class shuffled by the seed,
then interleaved in proportion to class size), so ``data.limit`` keeps every
class in its share; for files ``data.limit`` keeps the first rows. Each text is
tokenized once with the model's tokenizer (special tokens added, truncated to
``data.max_length``, no padding); ``Split.x`` holds the ids padded with the
tokenizer's pad id to the longest text and ``Split.lengths`` the true lengths,
so the loop can trim every batch to its own longest sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import yaml

from gradwise.data.files import available, clean_target
from gradwise.data.readers import detect_format, first_line, read_table
from gradwise.data.sources import FileData, TopicsData
from gradwise.data.splits import split_indices
from gradwise.data.targets import encode_target
from gradwise.data.types import DataInfo, Dataset, RawData, Split, TaskKind
from gradwise.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MIN_TOPIC_UTTERANCES = 40
MAX_TOPIC_UTTERANCES = 150
CORPUS_PACKAGE = "chatterbot-corpus"
# libyaml's safe loader parses the corpus 13× faster than the pure-Python one, with the same result.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class _Texts:
    """Texts and their raw labels before tokenization, with where each came from."""

    texts: list[str]
    raw: RawData  # x is an empty (N, 0) block; y holds the labels as read


def build_text_dataset(cfg: TopicsData | FileData, task_kind: str, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """The data component's builder: checks that a tokenizer and a text-classification task are at hand."""
    if tokenizer_dir is None:
        raise ConfigError(f"data {cfg.name!r} is text: it needs a pretrained model's tokenizer (model.name=hf_encoder)")
    if task_kind not in ("auto", "classification", "regression"):
        raise ConfigError(f"task.kind {task_kind!r} does not apply to text classification data {cfg.name!r}")
    return load_text_dataset(cfg, task_kind, seed, tokenizer_dir)  # type: ignore[arg-type]


def load_text_dataset(
    cfg: TopicsData | FileData,
    task_kind: Literal["auto", "classification", "regression"],
    seed: int,
    tokenizer_dir: Path,
) -> Dataset:
    """Load, tokenize and split a text dataset.

    Args:
        cfg: The ``data`` section (``name`` ``topics``, or ``file`` with ``text`` set).
        task_kind: ``task.kind``; ``auto`` lets the target decide (topics are always classification).
        seed: The run's seed: it fixes which utterances a capped topic keeps, the order and the splits.
        tokenizer_dir: A local directory with the Hugging Face tokenizer files (the model's directory).

    Raises:
        DataError: an empty text, a missing column or a single class; the message names file and row.
        ConfigError: unknown topics, a missing package or an unusable tokenizer directory.
    """
    if isinstance(cfg, TopicsData):
        loaded = _topics(cfg, seed)
    elif cfg.text is not None:
        loaded = _file_texts(cfg)
    else:
        raise ConfigError(f"data.name {cfg.name!r} is not text; use 'topics' or 'file' with data.text set")
    raw = loaded.raw
    y, kind, class_names = encode_target(raw, task_kind)
    tokenizer = load_tokenizer(tokenizer_dir)
    x, lengths = tokenize_texts(tokenizer, loaded.texts, cfg.max_length)
    train, val, test = split_indices(
        len(y),
        y if kind == "classification" else None,
        cfg.val_fraction,
        cfg.test_fraction,
        seed,
        raw.source,
        class_names,
    )
    info = DataInfo(
        kind=kind,
        n_features=int(x.shape[1]),
        image_shape=None,
        n_outputs=len(class_names) if class_names is not None else 1,
        class_names=class_names,
        feature_names=["text"],
        target_name=raw.target_name,
        source=raw.source,
        name=raw.name,
        vocab_size=len(tokenizer),
        pad_token_id=int(tokenizer.pad_token_id),
        tokenizer_dir=str(tokenizer_dir),
    )
    return Dataset(
        train=_split(x, lengths, y, train, kind),
        val=_split(x, lengths, y, val, kind),
        test=_split(x, lengths, y, test, kind),
        info=info,
    )


def load_tokenizer(tokenizer_dir: Path, *, need_pad: bool = True) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer saved in ``tokenizer_dir`` (local files only; ``need_pad``: it must have a pad token).

    Raises:
        ConfigError: the directory holds no loadable tokenizer, or the tokenizer has no pad token.
    """
    from transformers import AutoTokenizer  # heavy import, only for text runs

    if not Path(tokenizer_dir).is_dir():
        raise ConfigError(f"model.path: tokenizer directory {tokenizer_dir} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model.path: no usable tokenizer in {tokenizer_dir} ({first_line(exc)})") from None
    if need_pad and tokenizer.pad_token_id is None:
        raise ConfigError(f"model.path: the tokenizer in {tokenizer_dir} has no pad token, so texts cannot be batched")
    return tokenizer


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``texts``, truncated to ``max_length``, as a padded int64 ``(N, Lmax)`` and lengths ``(N,)``.

    ``Lmax`` is the longest tokenized text; shorter rows are filled with the tokenizer's pad id.
    """
    ids: list[list[int]] = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.int64)
    width = int(lengths.max()) if len(ids) else 0
    x = torch.full((len(ids), width), int(tokenizer.pad_token_id), dtype=torch.int64)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return x, lengths


def corpus_dir() -> Path:
    """The English YAML files of the installed chatterbot-corpus package."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise ConfigError(
            f"data.name 'topics' needs the {CORPUS_PACKAGE} package (pip install {CORPUS_PACKAGE})"
        ) from None
    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def read_topics() -> dict[str, list[str]]:
    """Every English topic's distinct non-empty utterances, in file order (stripped of surrounding spaces)."""
    topics: dict[str, list[str]] = {}
    for file in sorted(corpus_dir().glob("*.yml")):
        with file.open(encoding="utf-8") as handle:
            document = yaml.load(handle, Loader=_SAFE_LOADER) or {}
        seen: dict[str, None] = {}
        for conversation in document.get("conversations") or []:
            for utterance in conversation or []:
                # YAML turns an unquoted 1963 into a number; the corpus quotes such lines, so a
                # non-string is markup we do not understand, not a text.
                if isinstance(utterance, str) and utterance.strip():
                    seen.setdefault(utterance.strip(), None)
        topics[file.stem] = list(seen)
    return topics


# --------------------------------------------------------------------------- sources


def _topics(cfg: TopicsData, seed: int) -> _Texts:
    every = read_topics()
    source = f"{CORPUS_PACKAGE} english topics"
    if cfg.topics is None:
        chosen = [name for name, texts in every.items() if len(texts) >= MIN_TOPIC_UTTERANCES]
        cap: int | None = MAX_TOPIC_UTTERANCES
    else:
        chosen = _check_topics(cfg.topics, every)
        cap = None
    chosen = sorted(chosen)  # class i is the i-th topic in sorted order, like every other label coding
    rng = np.random.default_rng(seed)
    per_topic: list[list[str]] = []
    for name in chosen:
        texts = every[name]
        order = rng.permutation(len(texts))
        per_topic.append([texts[i] for i in order[:cap]])
    texts, labels = _stratified_order(per_topic)
    if cfg.limit is not None:
        texts, labels = texts[: cfg.limit], labels[: cfg.limit]
    raw = RawData(
        x=np.zeros((len(texts), 0)),
        y=np.array(labels, dtype=np.int64),
        feature_names=["text"],
        target_name="topic",
        source=source,
        name="topics",
        kind="classification",
        class_names=chosen,
    )
    return _Texts(texts, raw)


def _check_topics(topics: list[str], every: dict[str, list[str]]) -> list[str]:
    for name in topics:
        if name not in every:
            raise ConfigError(f"data.topics: no topic {name!r}; available: {', '.join(every)}")
    if len(set(topics)) != len(topics):
        raise ConfigError(f"data.topics lists a topic more than once: {topics}")
    if len(topics) < 2:
        raise ConfigError(f"data.topics: classification needs at least two topics, got {topics}")
    return list(topics)


def _stratified_order(per_topic: list[list[str]]) -> tuple[list[str], list[int]]:
    """Interleave classes so that every prefix keeps each class's share (the k-th of n sits at (k + ½)/n)."""
    keyed = [((k + 0.5) / len(texts), c, text) for c, texts in enumerate(per_topic) for k, text in enumerate(texts)]
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [text for _, _, text in keyed], [c for _, c, _ in keyed]


def _file_texts(cfg: FileData) -> _Texts:
    if cfg.path is None or cfg.text is None:  # the config validator demands both; this keeps the type checker honest
        raise ConfigError("data.path and data.text are required for a text file")
    fmt = detect_format(cfg.path, cfg.format)
    if fmt == "npz":
        raise DataError(f"{cfg.path}: data.text needs a CSV, JSONL or Parquet file, not NPZ")
    table = read_table(cfg.path, fmt)
    for role, name in (("data.text", cfg.text), ("data.target", cfg.target)):
        if name is None:
            raise DataError(f"{table.source}: {role} is required for a text file; columns: {available(table.names)}")
        if name not in table.names:
            raise DataError(f"{table.source}: no column {name!r} ({role}); available columns: {available(table.names)}")
    assert cfg.target is not None
    column = table.column(cfg.text)
    keep = len(column) if cfg.limit is None else min(cfg.limit, len(column))
    texts = [_text_cell(column[i], cfg.text, table.source, table.locate(i)) for i in range(keep)]
    y = clean_target(table.column(cfg.target)[:keep], cfg.target, table.source, table.locate)
    raw = RawData(
        x=np.zeros((keep, 0)),
        y=y,
        feature_names=["text"],
        target_name=cfg.target,
        source=table.source,
        name=cfg.path.name,
        locate=table.locate,
    )
    return _Texts(texts, raw)


def _text_cell(value: Any, column: str, source: str, where: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)  # a JSON number in a text column is still text
    if not isinstance(value, str):
        shown = "missing value" if value is None or isinstance(value, float) else f"{type(value).__name__} value"
        raise DataError(f"{source}: column {column!r} {where}: {shown}, expected text")
    if not value.strip():
        raise DataError(f"{source}: column {column!r} {where}: empty text")
    return value


def _split(x: torch.Tensor, lengths: torch.Tensor, y: np.ndarray, rows: np.ndarray, kind: TaskKind) -> Split:
    index = torch.from_numpy(rows.astype(np.int64))
    if kind == "classification":
        target = torch.from_numpy(y[rows].astype(np.int64))
    else:
        target = torch.from_numpy(y[rows].astype(np.float32).reshape(-1, 1))
    return Split(x=x[index].contiguous(), y=target, lengths=lengths[index].contiguous())
