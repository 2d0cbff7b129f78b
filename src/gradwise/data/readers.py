"""Reading a user's file (CSV, JSONL, Parquet, NPZ) into named columns, safely.

Every failure is one :class:`~gradwise.errors.DataError` line that names the
file; nothing from a user's file is ever unpickled (NPZ is read with
``allow_pickle=False``). Rows are reported the way a user finds them in each
format: ``row R (line L)`` for CSV and JSONL (R counts data rows from 1, L is
the line in the file), ``row R`` for Parquet, ``index i`` (0-based, as numpy
counts) for NPZ. Blank lines in CSV and JSONL (and CSV rows whose every cell
is blank, as spreadsheets leave at the end) are skipped.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from gradwise.errors import DataError

FORMATS: tuple[str, ...] = ("csv", "parquet", "jsonl", "npz", "arrow")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".npz": "npz",
    ".arrow": "arrow",
}
DATASET_MARKERS = ("state.json", "dataset_info.json")  # what save_to_disk writes beside its *.arrow files
_OPENERS: dict[str, Callable[..., IO[str]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass(frozen=True)
class Table:
    """A file's columns by name, each an array whose first axis is the row.

    Attributes:
        source: The file path as the user wrote it (starts every error message).
        columns: Column name → array; CSV and JSONL give object arrays of strings/JSON values,
            Parquet and NPZ keep their dtypes (an NPZ array may be 2-D or more).
        locate: Row index (0-based) → where the user finds that row in this file.
        refused: Columns that exist but cannot be read safely (NPZ object arrays), with the reason;
            they are an error only when a run uses them.
    """

    source: str
    columns: dict[str, np.ndarray]
    locate: Callable[[int], str]
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every column name, usable or not."""
        return [*self.columns, *self.refused]

    def column(self, name: str) -> np.ndarray:
        """The column ``name``; a DataError if it was refused."""
        if name in self.refused:
            raise DataError(self.refused[name])
        return self.columns[name]


def detect_format(path: Path, fmt: str) -> str:
    """The file format: ``fmt`` itself, or guessed from the suffix when ``fmt`` is ``auto``.

    A compression suffix (``.gz``, ``.bz2``, ``.xz``) is looked through: ``x.csv.gz`` is CSV.
    """
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if is_saved_dataset(path):
            return "arrow"  # a Hugging Face dataset written by save_to_disk: Arrow files and their state
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if is_saved_dataset(p))
            raise DataError(f"{path}: a saved DatasetDict; point at one of its splits ({', '.join(splits)}), e.g. "
                            f"{path / (splits[0] if splits else 'train')}")  # fmt: skip
        raise DataError(f"{path}: is a directory, not a data file")
    suffix = _base_suffix(path)
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            f"set data.format to one of {', '.join(FORMATS)}"
        )
    return _SUFFIX_FORMATS[suffix]


def read_table(path: Path, fmt: str) -> Table:
    """Read ``path`` as ``fmt`` (see :data:`FORMATS`) into a :class:`Table`."""
    source = str(path)
    if not path.exists():
        raise DataError(f"{source}: file not found")
    if path.is_dir() and not (fmt == "arrow" and is_saved_dataset(path)):
        raise DataError(f"{source}: is a directory, not a data file")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{source}: file is empty")
    readers = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet, "npz": _read_npz, "arrow": _read_arrow}
    if fmt not in readers:
        raise DataError(f"{source}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        table = readers[fmt](path, source)
    except UnicodeDecodeError:
        raise DataError(f"{source}: not UTF-8 text (is data.format {fmt!r} right?)") from None
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"{source}: cannot read as {fmt} ({first_line(exc)})") from None
    if not table.names:
        raise DataError(f"{source}: no columns")
    return table


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened: enough to see what a library disliked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- formats


def _read_csv(path: Path, source: str) -> Table:
    delimiter = "\t" if _base_suffix(path) == ".tsv" else ","
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        last_line = 0  # csv counts lines itself, which stays right across quoted newlines
        try:
            for record in reader:
                start, last_line = last_line + 1, reader.line_num
                if not record or all(not field.strip() for field in record):
                    continue
                if header is None:
                    header = _column_names(record, source)
                    continue
                if len(record) != len(header):
                    raise DataError(f"{source}: line {start}: {len(record)} fields, but the header has {len(header)}")
                rows.append(record)
                lines.append(start)
        except csv.Error as exc:
            raise DataError(f"{source}: line {reader.line_num}: cannot parse as CSV ({exc})") from None
    if header is None:
        raise DataError(f"{source}: file is empty")
    if not rows:
        raise DataError(f"{source}: has a header but no rows")
    columns = {name: np.array([row[j] for row in rows], dtype=object) for j, name in enumerate(header)}
    return Table(source, columns, lambda i: f"row {i + 1} (line {lines[i]})")


def _read_jsonl(path: Path, source: str) -> Table:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    with _open_text(path) as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise DataError(f"{source}: line {number}: expected one JSON object per line, got a {kind}")
            records.append(record)
            lines.append(number)
    if not records:
        raise DataError(f"{source}: file is empty")
    names = list(dict.fromkeys(key for record in records for key in record))
    columns = {name: _object_array([record.get(name) for record in records]) for name in names}
    return Table(source, columns, lambda i: f"row {i + 1} (line {lines[i]})")


def _read_parquet(path: Path, source: str) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        columns = {name: table.column(i).to_numpy(zero_copy_only=False) for i, name in enumerate(table.column_names)}
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(f"{source}: not a readable Parquet file ({first_line(exc)})") from None
    if table.num_rows == 0:
        raise DataError(f"{source}: has columns but no rows")
    if len(columns) != table.num_columns:
        raise DataError(f"{source}: column names repeat; each column needs its own name")
    return Table(source, columns, lambda i: f"row {i + 1}")


def _read_arrow(path: Path, source: str) -> Table:
    """An Arrow IPC file or stream, or every ``*.arrow`` file of a ``datasets`` ``save_to_disk`` directory
    (in its ``state.json`` order), as one table. Read with pyarrow alone: ``datasets`` is not needed."""
    import pyarrow as pa

    files = dataset_arrow_files(path) if path.is_dir() else [path]
    tables = []
    for file in files:
        with pa.memory_map(str(file)) as stream:
            tables.append(open_arrow(stream, file).read_all())
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{source}: its Arrow files do not share one schema ({first_line(exc)})") from None
    if table.num_rows == 0:
        raise DataError(f"{source}: has columns but no rows")
    columns = {name: table.column(i).to_numpy(zero_copy_only=False) for i, name in enumerate(table.column_names)}
    if len(columns) != table.num_columns:
        raise DataError(f"{source}: column names repeat; each column needs its own name")
    for name, labels in _class_labels(path).items():  # ClassLabel ids as the dataset names them
        if name in columns and columns[name].dtype.kind in "iu":
            ids = columns[name]
            if ids.size and (ids.min() < 0 or ids.max() >= len(labels)):  # -1: datasets' "no label"
                raise DataError(f"{source}: column {name!r} holds label id {int(ids.min())}, not one of its "
                                f"{len(labels)} class names; drop those rows or the column")  # fmt: skip
            columns[name] = np.asarray(labels, dtype=object)[ids]
    return Table(source, columns, lambda i: f"row {i + 1}")


def _class_labels(path: Path) -> dict[str, list[str]]:
    """A saved dataset's ``ClassLabel`` columns and their names, from its ``dataset_info.json`` (else none)."""
    info = path / "dataset_info.json"
    if not path.is_dir() or not info.is_file():
        return {}
    try:
        features = json.loads(info.read_text(encoding="utf-8")).get("features") or {}
        return {
            str(name): [str(label) for label in feature["names"]]
            for name, feature in features.items()
            if isinstance(feature, dict)
            and feature.get("_type") == "ClassLabel"
            and isinstance(feature.get("names"), list)
        }
    except (ValueError, AttributeError, TypeError):
        return {}  # a damaged info file: the ids are read as they are


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets.Dataset.save_to_disk``."""
    return path.is_dir() and any((path / marker).is_file() for marker in DATASET_MARKERS)


def open_arrow(stream: Any, path: Path) -> Any:
    """A reader of the Arrow IPC *stream* (what ``save_to_disk`` writes) or *file* open in ``stream``."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(stream)
    except pa.ArrowInvalid:
        stream.seek(0)
        try:
            return pa.ipc.open_file(stream)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: not an Arrow file or stream ({first_line(exc)})") from None


def dataset_arrow_files(directory: Path) -> list[Path]:
    """A saved dataset's ``*.arrow`` files in the order its ``state.json`` lists them (else by name)."""
    state = directory / "state.json"
    if state.is_file():
        try:
            files = [directory / entry["filename"] for entry in json.loads(state.read_text("utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{state}: not a saved dataset's state ({exc!r})") from None
    else:
        files = sorted(directory.glob("*.arrow"))
    if not files:
        raise DataError(f"{directory}: a saved dataset without *.arrow files")
    for file in files:
        if not file.is_file() or file.parent != directory:
            raise DataError(f"{state}: lists {file.name!r}, which is not a file of {directory}")
    return files


def _read_npz(path: Path, source: str) -> Table:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{source}: not a readable NPZ archive ({first_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{source}: holds a single array, not an NPZ archive of named arrays (use np.savez)")
    columns: dict[str, np.ndarray] = {}
    refused: dict[str, str] = {}
    with archive:
        for key in archive.files:
            try:
                array = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    refused[key] = (
                        f"{source}: array {key!r} holds Python objects, which gradwise never unpickles; "
                        "save it as a numeric or string array (e.g. .astype(str))"
                    )
                    continue
                raise DataError(f"{source}: array {key!r} is unreadable ({first_line(exc)})") from None
            except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
                raise DataError(f"{source}: array {key!r} is unreadable ({first_line(exc)})") from None
            if array.ndim == 0:
                raise DataError(f"{source}: array {key!r} is a single value, not a column (one entry per row)")
            columns[key] = array
    if not columns and not refused:
        raise DataError(f"{source}: the NPZ archive holds no arrays")
    return Table(source, columns, lambda i: f"index {i}", refused)


# --------------------------------------------------------------------------- helpers


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig drops the byte-order mark spreadsheet programs put in front of CSV exports.
    opener = _OPENERS.get(path.suffix.lower())
    if opener is not None:
        return opener(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def _column_names(header: list[str], source: str) -> list[str]:
    # An unnamed column is usually a pandas index written by to_csv(); give it pandas' own name.
    names = [name.strip() or f"Unnamed: {j}" for j, name in enumerate(header)]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{source}: column {name!r} appears twice in the header")
        seen.add(name)
    return names


def _object_array(values: list[Any]) -> np.ndarray:
    # np.array would turn a list of equal-length lists into a 2-D array; keep one object per row.
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
