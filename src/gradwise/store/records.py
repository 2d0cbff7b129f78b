"""Small records a run directory keeps beside its checkpoints.

``data_info.json`` (what sizes the model, so export and generate never need
the data), ``tokenizer/`` (the tokenizer the run was trained with) and
``compression.json`` (what ``gradwise compress`` did to a variant). All JSON,
never pickle; the storage layer reads and writes them as plain mappings, and
the layers above turn them into their own types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradwise.errors import CheckpointError
from gradwise.store.files import atomic_write_text, read_text, write_bytes_atomic
from gradwise.store.paths import inside

TOKENIZER_DIR = "tokenizer"
DATA_INFO_FILE = "data_info.json"
COMPRESSION_FILE = "compression.json"
# Files of a tokenizer directory worth keeping (Hugging Face tokenizers and gradwise's own BPE).
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")


def write_data_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``data_info.json`` and copy the tokenizer it names into the run directory."""
    atomic_write_text(run_dir / DATA_INFO_FILE, json.dumps(record, indent=1) + "\n")
    copy_tokenizer(record.get("tokenizer_dir"), run_dir)


def read_data_record(run_dir: Path) -> dict[str, Any] | None:
    """The recorded ``data_info.json`` of a run, or None for runs made before it was recorded."""
    file = run_dir / DATA_INFO_FILE
    if not file.exists():
        return None
    return _read_json_object(file)


def copy_tokenizer(source: str | None, run_dir: Path) -> None:
    """Keep the tokenizer a run was trained with inside its run directory (for generate and export)."""
    if source is None:
        return
    target = run_dir / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for file in Path(source).iterdir():
        if file.is_file() and file.name.startswith(_TOKENIZER_FILES):
            copy_file_into(file, target / file.name)


def copy_file_into(source: Path, target: Path) -> None:
    """Copy one file to ``target`` inside a directory gradwise writes: atomic, never through a link there."""
    write_bytes_atomic(target, source.read_bytes())


def copy_tree_into(source: Path, target: Path) -> None:
    """Copy a directory of plain files (a tokenizer), following no link on either side."""
    if not source.is_dir() or source.is_symlink():
        return
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.is_symlink():
            copy_file_into(file, target / file.name)


def read_compression(run_dir: Path) -> dict[str, Any]:
    """The compression record of a variant (empty for an ordinary run); its weight file stays inside the run."""
    file = run_dir / COMPRESSION_FILE
    if not file.exists():
        return {}
    record = _read_json_object(file)
    quantization = record.get("quantization")
    if quantization:
        if not isinstance(quantization, dict):
            raise CheckpointError(f"{file}: 'quantization' is not a mapping")
        inside(run_dir, quantization.get("file"), source=file)
    return record


def write_compression(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(run_dir / COMPRESSION_FILE, json.dumps(record, indent=1) + "\n")


def compressed_weight_file(run_dir: Path, quantization: dict[str, Any]) -> Path:
    """The quantized weight file a compression record names, confined to the run directory."""
    return inside(run_dir, quantization.get("file"), source=run_dir / COMPRESSION_FILE)


def _read_json_object(file: Path) -> dict[str, Any]:
    try:
        raw = json.loads(read_text(file, what="JSON file"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: corrupt ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: corrupt (expected a JSON object, got {type(raw).__name__})")
    return raw
