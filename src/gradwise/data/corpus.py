"""``python_source``: the Python standard library's own source as a language-modeling corpus.

The corpus ships with every Python, so a GPT can be trained and measured with
no download. The ``*.py`` files under the stdlib are taken in a fixed
pseudo-random order (by a hash of their path, so any prefix of the corpus
mixes packages instead of being the alphabetically first ones) until
``data.corpus_chars`` characters are read. Files, not positions, are split
into train/validation/test by the seed, so no validation text is ever seen in
training. A byte-level BPE tokenizer is trained on the training files only.

Tokenizer and token streams are cached under
``$GRADWISE_CACHE/corpus/<key>/`` (default ``~/.cache/gradwise/corpus/<key>/``),
keyed by everything that changes them; ``data.seq_len`` and ``data.limit``
only change the packing, which is redone on every load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gradwise.data.sources import PythonSourceData
from gradwise.data.token_files import TokenBlocks
from gradwise.data.types import DataInfo, Dataset, Split
from gradwise.errors import ConfigError, DataError

EOT = "<|endoftext|>"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# Test suites, IDLE and lib2to3 are not representative library code; encodings/ and pydoc_data/
# are generated tables (codec charmaps, the help topics) that would dominate a small corpus.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "encodings", "pydoc_data"}
)
MAX_FILE_BYTES = 300_000  # guard against other generated files; the largest hand-written module is ~230 kB


@dataclass(frozen=True)
class Corpus:
    """The tokenized corpus as cached: token streams per split and where they came from.

    Attributes:
        directory: The cache directory; holds ``tokenizer.json``, ``<split>.npy`` and ``meta.json``.
        files: Stdlib-relative paths of the files in each split, in stream order.
        streams: Per split, the token ids of its files, each file preceded by ``<|endoftext|>``.
        n_chars: Characters read in all (the last file may be cut short to fit ``corpus_chars``).
        vocab_size: Size of the trained vocabulary.
        eot_id: Id of ``<|endoftext|>``.
        python_version: The Python whose standard library was read.
    """

    directory: Path
    files: dict[str, list[str]]
    streams: dict[str, np.ndarray]
    n_chars: int
    vocab_size: int
    eot_id: int
    python_version: str


def build_corpus_dataset(cfg: PythonSourceData, task_kind: str, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """The data component's builder: the corpus is language modeling whatever ``task.kind`` says, or an error."""
    if task_kind not in ("auto", "language_modeling"):
        raise ConfigError(f"task.kind {task_kind!r} does not apply to data.name 'python_source' (language modeling)")
    return load_corpus_dataset(cfg, seed)


def load_corpus_dataset(cfg: PythonSourceData, seed: int, *, cache_root: Path | None = None) -> Dataset:
    """The stdlib corpus packed into next-token blocks of ``cfg.seq_len``.

    Each split's stream is cut into non-overlapping blocks of ``seq_len + 1``
    tokens (the tail that does not fill a block is dropped); ``x`` is a block
    without its last token and ``y`` without its first, both int64
    ``(N, seq_len)``. ``cfg.limit`` keeps the first ``limit`` training blocks.

    Args:
        cfg: The ``data`` section (``corpus_chars``, ``vocab_size``, ``seq_len``, fractions, ``limit``).
        seed: The run's seed; it fixes which files go to which split.
        cache_root: Where caches live; default ``$GRADWISE_CACHE`` or ``~/.cache/gradwise``.

    Raises:
        DataError: too few files to split, or a split too short for one block of ``seq_len``.
    """
    corpus = prepare_corpus(cfg, seed, cache_root=cache_root)
    splits = {name: pack_blocks(corpus.streams[name], cfg.seq_len) for name in SPLITS}
    fractions = {"train": 1.0, "val": cfg.val_fraction, "test": cfg.test_fraction}
    for name, split in splits.items():
        if fractions[name] > 0 and len(split) == 0:
            raise DataError(
                f"python_source: the {name} split has {len(corpus.streams[name])} tokens, fewer than one block of "
                f"data.seq_len + 1 = {cfg.seq_len + 1}; lower data.seq_len or raise data.corpus_chars"
            )
    if cfg.limit is not None:
        train = splits["train"]
        splits["train"] = Split(x=train.x[: cfg.limit], y=train.y[: cfg.limit])
    n_files = sum(len(f) for f in corpus.files.values())
    source = f"Python {corpus.python_version} standard library source ({n_files} files, {corpus.n_chars:,} chars)"
    info = token_blocks_info(cfg.seq_len, corpus.vocab_size, corpus.eot_id, corpus.directory, source, "python_source")
    return Dataset(train=splits["train"], val=splits["val"], test=splits["test"], info=info)


def token_blocks_info(
    seq_len: int, vocab_size: int, eot_id: int, tokenizer_dir: Path, source: str, name: str
) -> DataInfo:
    """What a model and the language-modeling task know of a corpus cut into ``seq_len`` next-token blocks
    (the end-of-text id doubles as the pad id)."""
    return DataInfo(
        kind="language_modeling",
        n_features=seq_len,
        image_shape=None,
        n_outputs=vocab_size,
        class_names=None,
        feature_names=["tokens"],
        target_name="next token",
        source=source,
        name=name,
        vocab_size=vocab_size,
        pad_token_id=eot_id,
        tokenizer_dir=str(tokenizer_dir),
    )


def pack_blocks(stream: np.ndarray, seq_len: int) -> Split:
    """Cut a token stream into non-overlapping ``seq_len + 1`` blocks: ``x = block[:-1]``, ``y = block[1:]``."""
    width = seq_len + 1
    n = len(stream) // width
    blocks = torch.from_numpy(stream[: n * width].astype(np.int64).reshape(n, width))
    return Split(x=blocks[:, :-1].contiguous(), y=blocks[:, 1:].contiguous())


def unigram_perplexity(train: Split, val: Split, vocab_size: int) -> float:
    """Perplexity on ``val``'s targets of a unigram model of ``train``'s targets with add-one smoothing.

    ``p(t) = (count(t) + 1) / (N + V)``; the perplexity is ``exp(-mean log p(t))``
    over validation targets. A language model that uses any context must beat it. Targets
    outside ``[0, vocab_size)`` (the ignore index -100 of untrained positions) count on neither
    side; NaN when ``val`` has no target left. Memory-mapped targets are counted a chunk at a time.
    """
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for seen in _target_chunks(train, vocab_size):
        counts += torch.bincount(seen, minlength=vocab_size).double()
    log_p = torch.log(counts / counts.sum())
    total, n = torch.zeros((), dtype=torch.float64), 0
    for scored in _target_chunks(val, vocab_size):
        total += log_p[scored].sum()
        n += len(scored)
    return math.nan if n == 0 else math.exp(-float(total) / n)


def _target_chunks(split: Split, vocab_size: int) -> Iterator[torch.Tensor]:
    """The split's targets in ``[0, vocab_size)``, flat: at once, or in chunks when they are read lazily from disk."""
    chunks = split.y.chunks() if isinstance(split.y, TokenBlocks) else [split.y]
    for chunk in chunks:
        flat = chunk.reshape(-1)
        yield flat[(flat >= 0) & (flat < vocab_size)]


# --------------------------------------------------------------------------- building or loading the cache


def prepare_corpus(cfg: PythonSourceData, seed: int, *, cache_root: Path | None = None) -> Corpus:
    """Read, split, tokenize and cache the corpus, or load it from the cache when the key matches."""
    root = stdlib_root()
    candidates = list_stdlib_files(root)
    if not candidates:
        raise DataError(f"python_source: no readable .py files under the standard library at {root}")
    key = _cache_key(root, candidates, cfg, seed)
    directory = (cache_root or default_cache_root()) / "corpus" / key
    if directory.is_dir():
        try:
            return _load(directory)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(directory, ignore_errors=True)  # a damaged cache is rebuilt, never trusted
    _build(directory, root, candidates, cfg, seed)
    return _load(directory)


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: Path) -> list[tuple[str, int]]:
    """``(relative path, size in bytes)`` of every eligible ``*.py`` file under ``root``, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-"))
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            if 0 < size <= MAX_FILE_BYTES:
                found.append((path.relative_to(root).as_posix(), size))
    return sorted(found)


def read_documents(root: Path, candidates: list[tuple[str, int]], corpus_chars: int) -> list[tuple[str, str]]:
    """``(relative path, text)`` in corpus order until ``corpus_chars`` characters (the last one cut to fit).

    The order is by a hash of each path: fixed, independent of the seed, and mixing packages.
    Files that are not valid UTF-8 are skipped.
    """
    ordered = sorted(candidates, key=lambda c: hashlib.sha256(c[0].encode()).hexdigest())
    documents, total = [], 0
    for relative, _ in ordered:
        try:
            text = (root / relative).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text[: corpus_chars - total]
        if text.strip():
            documents.append((relative, text))
            total += len(text)
        if total >= corpus_chars:
            break
    return documents


def split_files(sizes: list[int], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Document indices per split, sharing out characters rather than files.

    Files are visited in a seeded random order; each goes to validation if it
    still fits in ``val_fraction`` of all characters, else to test if it fits in
    ``test_fraction``, else to training. A split with a positive fraction that
    nothing fitted into takes the smallest training file. Sizes vary from a few
    hundred characters to 200 k, so counting files would give shares far from
    the fractions asked for.

    Args:
        sizes: Characters per document.
        val_fraction: Share of characters for validation.
        test_fraction: Share of characters for test.
        seed: The same seed gives the same split.

    Raises:
        DataError: the documents are too few to leave at least one for training.
    """
    total = sum(sizes)
    budget = {"val": val_fraction * total, "test": test_fraction * total}
    members: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    used = {"val": 0, "test": 0}
    for i in np.random.default_rng(seed).permutation(len(sizes)).tolist():
        name = next((s for s in ("val", "test") if used[s] + sizes[i] <= budget[s]), "train")
        members[name].append(i)
        if name != "train":
            used[name] += sizes[i]
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not members[name] and len(members["train"]) > 1:
            smallest = min(members["train"], key=lambda i: sizes[i])
            members["train"].remove(smallest)
            members[name].append(smallest)
    needed = 1 + (val_fraction > 0) + (test_fraction > 0)
    if len(sizes) < needed or not members["train"]:
        raise DataError(
            f"python_source: {len(sizes)} file(s) are too few to split into train/validation/test by file; "
            "raise data.corpus_chars or set data.val_fraction / data.test_fraction to 0"
        )
    # Sorted so each split keeps the corpus order, whatever the permutation.
    return {name: sorted(indices) for name, indices in members.items()}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2's scheme) with ``<|endoftext|>`` as its only special token.

    Training has no randomness: the same texts give the same ``tokenizer.json`` in any process. ``texts``
    may be a generator: they are streamed to the trainer, which keeps word counts, not the texts.

    References:
        Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units";
        Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (byte-level BPE).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _build(directory: Path, root: Path, candidates: list[tuple[str, int]], cfg: PythonSourceData, seed: int) -> None:
    documents = read_documents(root, candidates, cfg.corpus_chars)
    members = split_files([len(text) for _, text in documents], cfg.val_fraction, cfg.test_fraction, seed)
    tokenizer = train_tokenizer([documents[i][1] for i in members["train"]], cfg.vocab_size)
    eot_id = tokenizer.token_to_id(EOT)
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Written in a sibling temporary directory and renamed: a reader never sees a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        for name in SPLITS:
            encodings = tokenizer.encode_batch([documents[i][1] for i in members[name]])
            stream = [eot_id]
            for encoding in encodings:
                stream.extend(encoding.ids)
                stream.append(eot_id)
            with open(staging / f"{name}.npy", "wb") as f:
                np.save(f, np.asarray(stream[:-1] if encodings else [], dtype=dtype))
                f.flush()
                os.fsync(f.fileno())
        meta = {
            "format": FORMAT_VERSION,
            "python": platform.python_version(),
            "stdlib": str(root),
            "n_chars": sum(len(text) for _, text in documents),
            "vocab_size": vocab_size,
            "eot_id": eot_id,
            "files": {name: [documents[i][0] for i in members[name]] for name in SPLITS},
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            staging.rename(directory)
        except OSError:
            if not directory.is_dir():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load(directory: Path) -> Corpus:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    if meta["format"] != FORMAT_VERSION or not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{directory}: not a corpus cache of format {FORMAT_VERSION}")
    streams = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in SPLITS}
    return Corpus(
        directory=directory,
        files=meta["files"],
        streams=streams,
        n_chars=int(meta["n_chars"]),
        vocab_size=int(meta["vocab_size"]),
        eot_id=int(meta["eot_id"]),
        python_version=meta["python"],
    )


def default_cache_root() -> Path:
    env = os.environ.get("GRADWISE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gradwise"


def _cache_key(root: Path, candidates: list[tuple[str, int]], cfg: PythonSourceData, seed: int) -> str:
    facts = {
        "format": FORMAT_VERSION,
        "stdlib": str(root),
        "python": platform.python_version(),
        "files": candidates,
        "corpus_chars": cfg.corpus_chars,
        "vocab_size": cfg.vocab_size,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": seed,
        "tokenizers": tokenizers.__version__,  # a new trainer may merge differently
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
