"""Reading files: formats by suffix, line numbers, and corrupt or unsafe files as one-line DataErrors."""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradwise.data.readers import detect_format, read_table
from gradwise.errors import DataError


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.csv", "csv"), ("a.TSV", "csv"), ("a.csv.gz", "csv"), ("a.parquet", "parquet"), ("a.pq", "parquet"),
     ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.npz", "npz")],
)  # fmt: skip
def test_format_from_suffix(name: str, fmt: str):
    assert detect_format(Path(name), "auto") == fmt
    assert detect_format(Path(name), "jsonl") == "jsonl"  # an explicit format wins


def test_unknown_suffix_asks_for_data_format():
    with pytest.raises(DataError, match=r"data.json: cannot tell the format.*'\.json'.*data.format"):
        detect_format(Path("data.json"), "auto")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "npz"])
def test_missing_and_empty_files(tmp_path: Path, fmt: str):
    path = tmp_path / f"data.{fmt}"
    with pytest.raises(DataError, match=f"data.{fmt}: file not found"):
        read_table(path, fmt)
    path.write_bytes(b"")
    with pytest.raises(DataError, match=f"data.{fmt}: file is empty"):
        read_table(path, fmt)


def test_csv_lines_are_counted_across_blank_lines_and_quoted_newlines(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text('\ufeffa,note\n1,"two\nlines"\n\n2,x\n3,y\n')  # BOM, a quoted newline, a blank line
    table = read_table(path, "csv")
    assert list(table.columns) == ["a", "note"]
    assert table.columns["a"].tolist() == ["1", "2", "3"]
    assert [table.locate(i) for i in range(3)] == ["row 1 (line 2)", "row 2 (line 5)", "row 3 (line 6)"]


def test_csv_with_a_ragged_row_names_its_line(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match=r"data.csv: line 3: 3 fields, but the header has 2"):
        read_table(path, "csv")


def test_csv_header_only_and_repeated_column(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: has a header but no rows"):
        read_table(path, "csv")
    path.write_text("a,a\n1,2\n")
    with pytest.raises(DataError, match=r"data\.csv: column 'a' appears twice"):
        read_table(path, "csv")


def test_gzipped_csv_and_binary_junk(tmp_path: Path):
    path = tmp_path / "data.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("a,b\n1,2\n")
    assert read_table(path, detect_format(path, "auto")).columns["b"].tolist() == ["2"]
    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match=r"junk\.csv: not UTF-8 text"):
        read_table(junk, "csv")


def test_jsonl_errors_name_the_line(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(DataError, match=r"data.jsonl: line 3: not valid JSON"):
        read_table(path, "jsonl")
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"data.jsonl: line 2: expected one JSON object per line, got a list"):
        read_table(path, "jsonl")
    path.write_text('{"a": 1}\n\n{"b": [1, 2]}\n')
    table = read_table(path, "jsonl")
    assert table.columns["a"].tolist() == [1, None]
    assert table.columns["b"][1] == [1, 2]
    assert table.locate(1) == "row 2 (line 3)"


def test_truncated_parquet_is_a_data_error(tmp_path: Path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"a": np.arange(100.0), "b": ["x"] * 100}).to_parquet(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"data.parquet: not a readable Parquet file \(") as err:
        read_table(path, "parquet")
    assert "\n" not in str(err.value)


def test_parquet_keeps_types_and_locates_rows(tmp_path: Path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"a": [1, 2], "b": ["x", None]}).to_parquet(path)
    table = read_table(path, "parquet")
    assert table.columns["a"].dtype.kind == "i"
    assert table.columns["b"].tolist() == ["x", None]
    assert table.locate(1) == "row 2"


class _Exploit:
    """Unpickling this would create a file: proof that a reader unpickled user data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_npz_object_arrays_are_refused_never_unpickled(tmp_path: Path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "data.npz"
    payload = np.empty(2, dtype=object)
    payload[:] = [_Exploit(marker), _Exploit(marker)]
    np.savez(path, x=np.arange(2.0), evil=payload)
    table = read_table(path, "npz")  # refused, but only an error when a run uses it
    assert table.names == ["x", "evil"]
    with pytest.raises(
        DataError, match=r"data\.npz: array 'evil' holds Python objects, which gradwise never unpickles"
    ):
        table.column("evil")
    assert not marker.exists()


def test_npz_that_is_really_a_pickle_or_a_npy_or_truncated(tmp_path: Path):
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(DataError, match=r"pickled\.npz: not a readable NPZ archive"):
        read_table(pickled, "npz")
    assert not marker.exists()
    single = tmp_path / "single.npz"
    with single.open("wb") as handle:
        np.save(handle, np.arange(3))
    with pytest.raises(DataError, match=r"single\.npz: holds a single array"):
        read_table(single, "npz")
    truncated = tmp_path / "truncated.npz"
    np.savez_compressed(truncated, x=np.random.default_rng(0).normal(size=5000))
    truncated.write_bytes(truncated.read_bytes()[:-400])
    with pytest.raises(DataError, match=r"truncated\.npz: "):
        read_table(truncated, "npz")


def test_npz_scalar_is_not_a_column(tmp_path: Path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(3.0), meta=np.float64(1.0))
    with pytest.raises(DataError, match=r"data\.npz: array 'meta' is a single value"):
        read_table(path, "npz")
    assert zipfile.is_zipfile(path)
