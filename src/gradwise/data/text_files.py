"""``text_files``: language modeling on the user's own texts, tokenized once into memory-mapped token files.

The approach is nanoGPT's ``data/openwebtext/prepare.py``: every text is tokenized once, each
split's ids are written into one flat ``uint16`` (``uint32`` past 65,536 ids) file, and training
reads blocks of ``seq_len + 1`` tokens from it through ``np.memmap``
(:mod:`gradwise.data.token_files`). Texts are streamed source by source and ids written in
chunks, so neither tokenizing nor training holds the corpus in memory.

Whole sources (files, saved datasets) are shared out to train/validation/test by the seed as
:func:`gradwise.data.corpus.split_files` does for the stdlib corpus (by size, so the shares
match the fractions); when there are fewer sources than splits, each document (a JSONL line, a
table row, a piece of a long text) is sent to a split by a seeded hash of its position instead.
Each document is preceded by ``<|endoftext|>`` (or the tokenizer's end-of-sequence token).

The token files live under ``$GRADWISE_CACHE/text_files/<key>/`` (default
``~/.cache/gradwise``), keyed by the sources' paths, sizes and modification times and the
tokenizer settings: a changed file is tokenized anew, an unchanged corpus never twice.
``data.seq_len`` and ``data.limit`` only change the blocks, cut on every load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import tokenizers

from gradwise.data.corpus import EOT, default_cache_root, split_files, token_blocks_info, train_tokenizer
from gradwise.data.sources import TextFilesData
from gradwise.data.text_sources import PIECE_BYTES, Piece, expand_paths, read_pieces, source_files, split_text
from gradwise.data.token_files import TokenWriter, block_split, token_dtype
from gradwise.data.types import Dataset, Split
from gradwise.errors import ConfigError, DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DOCUMENT_PIECE_BYTES = 64 << 10  # split by document: a long plain text goes to the splits in pieces this size
DEFAULT_VOCAB_SIZE = 4096
ENCODE_CHARS = 1 << 16  # characters encoded in one batch (a tokenizer's encodings take ~100 bytes a token)
PART_CHARS = 1 << 14  # a tokenizer gets texts at most about this long (the BPE trainer buffers 256 of them)


@dataclass(frozen=True)
class TextTokenizer:
    """What tokenizing needs of either tokenizer: ``encode`` (texts → ids each), the separator id, the size."""

    encode: Callable[[list[str]], list[list[int]]]
    eot_id: int
    vocab_size: int


@dataclass(frozen=True)
class TokenCorpus:
    """The token files as cached.

    Attributes:
        directory: The cache directory: ``<split>.bin``, ``meta.json`` and, for a BPE, ``tokenizer.json``.
        tokenizer_dir: Where the tokenizer files are (the cache directory, or ``data.tokenizer``).
        stored: The numpy dtype of the ids on disk.
        tokens: Ids per split file.
        documents: Documents per split.
        sources: The sources read, in order.
        by: ``"file"`` when whole sources were split, ``"document"`` when documents were.
        vocab_size: Size of the vocabulary.
        eot_id: The id between documents.
    """

    directory: Path
    tokenizer_dir: Path
    stored: str
    tokens: dict[str, int]
    documents: dict[str, int]
    sources: list[str]
    by: str
    vocab_size: int
    eot_id: int


def build_text_files_dataset(cfg: TextFilesData, task_kind: str, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """The data component's builder: language modeling whatever ``task.kind`` says, or an error."""
    if task_kind not in ("auto", "language_modeling"):
        raise ConfigError(f"task.kind {task_kind!r} does not apply to data.name 'text_files' (language modeling)")
    if tokenizer_dir is not None and cfg.tokenizer == "bpe":
        raise ConfigError(
            f"data.tokenizer 'bpe' trains a new vocabulary, but the model brings its own tokenizer; "
            f"set data.tokenizer={tokenizer_dir}"
        )
    return load_text_files_dataset(cfg, seed)


def load_text_files_dataset(cfg: TextFilesData, seed: int, *, cache_root: Path | None = None) -> Dataset:
    """The token files cut into next-token blocks of ``cfg.seq_len``, read lazily (:class:`TokenBlocks`).

    Raises:
        DataError: a glob matches nothing, a file is unreadable, the corpus is empty, or a split
            with a positive fraction is shorter than one block of ``seq_len + 1``.
    """
    corpus = prepare_token_files(cfg, seed, cache_root=cache_root)
    splits: dict[str, Split] = {}
    fractions = {"train": 1.0, "val": cfg.val_fraction, "test": cfg.test_fraction}
    for name in SPLITS:
        x, y = block_split(corpus.directory / f"{name}.bin", corpus.stored, cfg.seq_len, corpus.tokens[name])
        if fractions[name] > 0 and len(x) == 0:
            raise DataError(
                f"text_files: the {name} split has {corpus.tokens[name]} tokens, fewer than one block of "
                f"data.seq_len + 1 = {cfg.seq_len + 1}; lower data.seq_len or add text"
            )
        if name == "train" and cfg.limit is not None:
            x, y = replace(x, n_blocks=min(cfg.limit, len(x))), replace(y, n_blocks=min(cfg.limit, len(y)))
        splits[name] = Split(x=x, y=y)  # type: ignore[arg-type]  # a lazy tensor: indexing reads rows
    n_tokens = sum(corpus.tokens.values())
    source = f"text_files: {len(corpus.sources)} source(s), {n_tokens:,} tokens, split by {corpus.by}"
    info = token_blocks_info(cfg.seq_len, corpus.vocab_size, corpus.eot_id, corpus.tokenizer_dir, source, "text_files")
    return Dataset(train=splits["train"], val=splits["val"], test=splits["test"], info=info)


def prepare_token_files(cfg: TextFilesData, seed: int, *, cache_root: Path | None = None) -> TokenCorpus:
    """Tokenize the corpus into its cache directory, or find it there when nothing it depends on changed."""
    sources = expand_paths(cfg.paths)
    key = cache_key(cfg, seed, sources)
    directory = (cache_root or default_cache_root()) / "text_files" / key
    if directory.is_dir():
        try:
            return _load(directory)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(directory, ignore_errors=True)  # a damaged cache is rebuilt, never trusted
    build_token_files(directory, cfg, seed, sources)
    return _load(directory)


def cache_key(cfg: TextFilesData, seed: int, sources: list[Path]) -> str:
    """A hash of everything the token files depend on: sources (paths, sizes, times) and tokenizer settings."""
    stats = [[str(file), *_stamp(file)] for source in sources for file in source_files(source)]
    if cfg.tokenizer == "bpe":
        tokenizer: object = ["bpe", cfg.vocab_size or DEFAULT_VOCAB_SIZE, tokenizers.__version__]
    else:
        directory = Path(cfg.tokenizer)
        files = sorted(directory.iterdir()) if directory.is_dir() else []
        tokenizer = [str(directory.resolve()), [[f.name, *_stamp(f)] for f in files if f.is_file()]]
    facts = {
        "format": FORMAT_VERSION,
        "sources": [str(s) for s in sources],
        "files": stats,
        "text_field": cfg.text_field,
        "tokenizer": tokenizer,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": seed,
        "pieces": [PIECE_BYTES, DOCUMENT_PIECE_BYTES],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


# --------------------------------------------------------------------------- routing documents to splits


@dataclass(frozen=True)
class Routing:
    """Which split each piece goes to: by source (``by_source`` given) or by a seeded hash of its position."""

    seed: int
    val_fraction: float
    test_fraction: float
    by_source: list[str] | None

    def split_of(self, source: int, position: int) -> str:
        if self.by_source is not None:
            return self.by_source[source]
        digest = hashlib.blake2b(f"{self.seed}:{position}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2**64
        return "val" if u < self.val_fraction else "test" if u < self.val_fraction + self.test_fraction else "train"


def plan_routing(cfg: TextFilesData, seed: int, sources: list[Path]) -> Routing:
    """Whole sources split by size when there are enough of them for every split asked for, else documents."""
    needed = 1 + (cfg.val_fraction > 0) + (cfg.test_fraction > 0)
    if len(sources) < needed:
        return Routing(seed, cfg.val_fraction, cfg.test_fraction, by_source=None)
    sizes = [sum(f.stat().st_size for f in source_files(s)) for s in sources]
    try:
        members = split_files(sizes, cfg.val_fraction, cfg.test_fraction, seed)
    except DataError:  # too few to leave training data; split documents instead
        return Routing(seed, cfg.val_fraction, cfg.test_fraction, by_source=None)
    by_source = [""] * len(sources)
    for name, indices in members.items():
        for i in indices:
            by_source[i] = name
    return Routing(seed, cfg.val_fraction, cfg.test_fraction, by_source=by_source)


def routed_pieces(cfg: TextFilesData, sources: list[Path], routing: Routing) -> Iterator[tuple[str, Piece, bool]]:
    """``(split, piece, starts a document)`` for every piece, streamed; empty documents are left out.

    A piece that continues its document starts none when the piece before it went to the same split.
    """
    piece_bytes = PIECE_BYTES if routing.by_source is not None else DOCUMENT_PIECE_BYTES
    position = 0
    last: dict[str, int] = {}
    for index, source in enumerate(sources):
        for piece in read_pieces(source, cfg.text_field, piece_bytes):
            position += 1
            if not piece.continues and not piece.text.strip():
                continue
            split = routing.split_of(index, position)
            starts = not (piece.continues and last.get(split) == position - 1)
            last[split] = position
            yield split, piece, starts


# --------------------------------------------------------------------------- tokenizing into the cache


def build_token_files(directory: Path, cfg: TextFilesData, seed: int, sources: list[Path]) -> None:
    """Tokenize every source into ``directory/<split>.bin`` (written in a staging directory, then renamed)."""
    routing = plan_routing(cfg, seed, sources)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer, tokenizer_dir = _tokenizer(cfg, sources, routing, staging)
        dtype = token_dtype(tokenizer.vocab_size)
        documents = dict.fromkeys(SPLITS, 0)
        with ExitStack() as stack:
            writers = {name: stack.enter_context(TokenWriter(staging / f"{name}.bin", dtype)) for name in SPLITS}
            batch: list[tuple[str, str, bool]] = []
            chars = 0
            for split, piece, starts in routed_pieces(cfg, sources, routing):
                for i, part in enumerate(split_text(piece.text, PART_CHARS)):
                    batch.append((split, part, starts and i == 0))
                    chars += len(part)
                    if chars >= ENCODE_CHARS:
                        _write(batch, tokenizer, writers, documents)
                        batch, chars = [], 0
            _write(batch, tokenizer, writers, documents)
        if documents["train"] == 0:
            raise _no_training_text(cfg)
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir is not None else None,
            "stored": dtype.name,
            "tokens": {name: writers[name].n_tokens for name in SPLITS},
            "documents": documents,
            "sources": [str(s) for s in sources],
            "by": "file" if routing.by_source is not None else "document",
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            staging.rename(directory)
        except OSError:
            if not directory.is_dir():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(
    batch: list[tuple[str, str, bool]],
    tokenizer: TextTokenizer,
    writers: dict[str, TokenWriter],
    documents: dict[str, int],
) -> None:
    """Encode ``(split, text, starts a document)`` parts and append their ids to their splits' files."""
    if not batch:
        return
    for (split, _, starts), ids in zip(batch, tokenizer.encode([text for _, text, _ in batch]), strict=True):
        if starts:
            writers[split].extend([tokenizer.eot_id])
            documents[split] += 1
        writers[split].extend(ids)


def _tokenizer(
    cfg: TextFilesData, sources: list[Path], routing: Routing, staging: Path
) -> tuple[TextTokenizer, Path | None]:
    """A BPE trained on the training pieces (saved into ``staging``), or the one in ``data.tokenizer``."""
    if cfg.tokenizer != "bpe":
        return load_pretrained_tokenizer(Path(cfg.tokenizer)), Path(cfg.tokenizer)
    seen = {"chars": 0}

    def training_texts() -> Iterator[str]:
        for split, piece, _ in routed_pieces(cfg, sources, routing):
            if split == "train":
                seen["chars"] += len(piece.text)
                yield from split_text(piece.text, PART_CHARS)

    bpe = train_tokenizer(training_texts(), cfg.vocab_size or DEFAULT_VOCAB_SIZE)
    if seen["chars"] == 0:
        raise _no_training_text(cfg)
    bpe.save(str(staging / "tokenizer.json"))
    encode = lambda texts: [e.ids for e in bpe.encode_batch(texts)]  # noqa: E731
    return TextTokenizer(encode=encode, eot_id=bpe.token_to_id(EOT), vocab_size=bpe.get_vocab_size()), None


def _no_training_text(cfg: TextFilesData) -> DataError:
    return DataError(
        f"data.paths {', '.join(cfg.paths)}: no text for the training split (an empty corpus, or too little "
        "to split by data.val_fraction / data.test_fraction)"
    )


def load_pretrained_tokenizer(directory: Path) -> TextTokenizer:
    """A saved Hugging Face tokenizer (``AutoTokenizer``, local files only); documents end with its EOS token."""
    from transformers import AutoTokenizer

    if not directory.is_dir():
        raise ConfigError(f"data.tokenizer {str(directory)!r}: not a directory of tokenizer files (or 'bpe')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"data.tokenizer {str(directory)!r}: cannot load a tokenizer there ({exc})") from None
    eot = tokenizer.eos_token_id
    if eot is None:
        raise ConfigError(f"data.tokenizer {str(directory)!r}: has no end-of-sequence token to separate documents")

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    return TextTokenizer(encode=encode, eot_id=int(eot), vocab_size=len(tokenizer))


def _load(directory: Path) -> TokenCorpus:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    if meta["format"] != FORMAT_VERSION:
        raise ValueError(f"{directory}: not a text_files cache of format {FORMAT_VERSION}")
    tokens = {name: int(meta["tokens"][name]) for name in SPLITS}
    itemsize = token_dtype(int(meta["vocab_size"])).itemsize
    for name in SPLITS:
        if (directory / f"{name}.bin").stat().st_size != tokens[name] * itemsize:
            raise ValueError(f"{directory / name}.bin: truncated")
    tokenizer_dir = Path(meta["tokenizer_dir"]) if meta["tokenizer_dir"] is not None else directory
    return TokenCorpus(
        directory=directory,
        tokenizer_dir=tokenizer_dir,
        stored=meta["stored"],
        tokens=tokens,
        documents={name: int(meta["documents"][name]) for name in SPLITS},
        sources=meta["sources"],
        by=meta["by"],
        vocab_size=int(meta["vocab_size"]),
        eot_id=int(meta["eot_id"]),
    )
