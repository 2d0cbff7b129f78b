"""Reading the ``text_files`` corpus: globs to sources, sources to texts, streamed with bounded memory.

A source is one file or one directory written by ``datasets.Dataset.save_to_disk``. Texts come
out one piece at a time: a line of a ``.jsonl`` file, a row of a Parquet/Arrow table (read in
record batches through pyarrow, never whole), or a piece of a plain text file, cut at a line
break between two non-blank characters. The GPT-2 byte-level pre-tokenizer never joins such a
``"x\\n"`` and the ``"y"`` after it into one pre-token, so a byte-level BPE gives the same ids
for the pieces as for the whole text. Every problem is one :class:`DataError` line naming the
file and the line or row.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradwise.data.readers import dataset_arrow_files, is_saved_dataset, open_arrow
from gradwise.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow")
PIECE_BYTES = 1 << 20  # a plain text file is read this much at a time
ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class Piece:
    """One text read from a source.

    Attributes:
        text: The text.
        where: Where it came from, for messages: ``"notes.jsonl line 7"``, ``"data.parquet row 3"``.
        continues: True when it continues the previous piece's document (the next piece of a long text file).
    """

    text: str
    where: str
    continues: bool = False


def expand_paths(patterns: list[str]) -> list[Path]:
    """The sources the globs match, sorted and without repeats; ``**`` matches any depth.

    A directory counts when it holds a saved dataset (``state.json`` or ``dataset_info.json``);
    other directories, and the files inside a saved dataset, are not sources of their own.

    Raises:
        DataError: a glob matches no file.
    """
    found: dict[Path, None] = {}
    for pattern in patterns:
        matched = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        sources = [p for p in matched if is_saved_dataset(p) or (p.is_file() and not is_saved_dataset(p.parent))]
        if not sources:
            raise DataError(f"data.paths {pattern!r}: matches no file")
        found.update(dict.fromkeys(p.resolve() for p in sources))
    return sorted(found)


def source_files(source: Path) -> list[Path]:
    """The files whose sizes and times say whether a source changed: itself, or a saved dataset's files."""
    if not source.is_dir():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file())


def read_pieces(source: Path, text_field: str, piece_bytes: int = PIECE_BYTES) -> Iterator[Piece]:
    """Every text of ``source`` in order (see the module docstring for what a piece is)."""
    if source.is_dir():
        for file in dataset_arrow_files(source):
            yield from _table_pieces(file, text_field, _arrow_batches(file, text_field))
    elif source.suffix == ".jsonl":
        yield from _jsonl_pieces(source, text_field)
    elif source.suffix == ".parquet":
        yield from _table_pieces(source, text_field, _parquet_batches(source, text_field))
    elif source.suffix == ".arrow":
        yield from _table_pieces(source, text_field, _arrow_batches(source, text_field))
    else:
        yield from _plain_pieces(source, piece_bytes)


# --------------------------------------------------------------------------- plain text


def _plain_pieces(path: Path, piece_bytes: int) -> Iterator[Piece]:
    offset, line, first = 0, 1, True
    with open(path, "rb") as f:
        carry = b""
        while True:
            chunk = f.read(piece_bytes)
            data = carry + chunk
            if not data:
                break
            _no_nul(path, data, offset, line)
            cut = len(data) if not chunk else _safe_cut(data)
            if cut == 0 and len(data) < 4 * piece_bytes:  # no safe place in this much text: read on
                carry = data
                continue
            if cut == 0:  # a text without such a line break (or a binary file): cut at a character boundary
                cut = _char_boundary(data, len(data) - 1)
            piece, carry = data[:cut], data[cut:]
            yield Piece(_decode(path, piece, offset, line), f"{path} line {line}", continues=not first)
            offset, line, first = offset + cut, line + piece.count(b"\n"), False
            if not chunk:
                break


def _safe_cut(data: bytes) -> int:
    """Just after the last ``"\\n"`` with a printable ASCII non-blank byte on each side, or 0 if there is none.

    Non-ASCII neighbours are refused: a multi-byte character may be a Unicode space the
    pre-tokenizer's ``\\s`` matches.
    """
    at = len(data) - 1
    while True:
        at = data.rfind(b"\n", 1, at)
        if at <= 0 or at + 1 >= len(data):
            return 0
        if 0x21 <= data[at - 1] <= 0x7E and 0x21 <= data[at + 1] <= 0x7E:
            return at + 1


def split_text(text: str, size: int) -> Iterator[str]:
    """``text`` in parts of about ``size`` characters, cut where :func:`_safe_cut` would cut (joined, the text).

    Tokenizers get a long text a part at a time: their buffers and encodings then stay small.
    """
    start = 0
    while len(text) - start > size:
        cut = _safe_cut_text(text, start, start + size) or _safe_cut_text(text, start + size, len(text))
        if not cut:
            break
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _safe_cut_text(text: str, start: int, stop: int) -> int:
    at = stop - 1
    while True:
        at = text.rfind("\n", start + 1, at)
        if at <= start or at + 1 >= len(text):
            return 0
        if "!" <= text[at - 1] <= "~" and "!" <= text[at + 1] <= "~":
            return at + 1


def _char_boundary(data: bytes, at: int) -> int:
    """The last position at or before ``at`` that does not split a UTF-8 character (not a continuation byte)."""
    while at > 0 and data[at] & 0xC0 == 0x80:
        at -= 1
    return max(at, 1)


def _no_nul(path: Path, data: bytes, offset: int, line: int) -> None:
    nul = data.find(b"\0")
    if nul >= 0:
        at = line + data.count(b"\n", 0, nul)
        raise DataError(f"{path}: a binary file, not text (NUL byte at offset {offset + nul}, line {at})")


def _decode(path: Path, data: bytes, offset: int, line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = line + data.count(b"\n", 0, exc.start)
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {offset + exc.start}, line {at}); "
            "a binary file, or save it as UTF-8"
        ) from None


# --------------------------------------------------------------------------- JSON lines


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{where}: not a JSON object ({exc})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
                raise DataError(f"{where}: no field {text_field!r} (data.text_field); it has: {fields or 'nothing'}")
            yield Piece(_text(record[text_field], where, text_field), where)


def _text(value: object, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__} {value!r:.40}, not a string")
    return value


# --------------------------------------------------------------------------- Arrow and Parquet tables


def _table_pieces(path: Path, text_field: str, batches: Iterator[pa.Array]) -> Iterator[Piece]:
    row = 0
    for column in batches:
        for value in column.to_pylist():
            row += 1
            yield Piece(_text(value, f"{path} row {row}", text_field), f"{path} row {row}")


def _column(path: Path, schema: pa.Schema, text_field: str) -> None:
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (data.text_field); it has: {', '.join(schema.names)}")


def _parquet_batches(path: Path, text_field: str) -> Iterator[pa.Array]:
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a Parquet file ({exc})") from None
    _column(path, table.schema_arrow, text_field)
    for batch in table.iter_batches(batch_size=ROWS_PER_BATCH, columns=[text_field]):
        yield batch.column(0)


def _arrow_batches(path: Path, text_field: str) -> Iterator[pa.Array]:
    """Record batches of an Arrow IPC file or stream (``save_to_disk`` writes streams), memory-mapped."""
    with pa.memory_map(str(path)) as source:
        reader = open_arrow(source, path)
        _column(path, reader.schema, text_field)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches: Iterator[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            yield batch.column(text_field)
