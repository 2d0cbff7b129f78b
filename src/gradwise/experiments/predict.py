"""Running a trained run (or a compressed variant) on new rows: ``gradwise predict`` and ``Run.predict``.

The run directory alone says how to read new rows: a table's fitted column
encoding (``data_info.json``'s ``preprocessing``: kinds, fill values,
categories, standardization) is applied as it was to the training rows, a
text run tokenizes its text column with the run's tokenizer, an image or
array run reads an NPZ array of the training width. The model is loaded as
``gradwise eval`` loads it, and batches go through the same forward as
evaluation (the run's ``eval.batch_size``, device and precision), so when the
input holds the target column the metrics computed here on a run's test rows
are ``eval``'s test metrics, to the last digit.

Outputs keep the input's row order; a run's id columns (left out of the
features as ids) are copied through so each prediction can be joined back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradwise.compress.runs import load_run_model, read_data_info
from gradwise.data.batches import gather
from gradwise.data.readers import Table, detect_format, read_table
from gradwise.data.tabular import table_inputs
from gradwise.data.targets import as_numbers, code_labels
from gradwise.data.types import DataInfo
from gradwise.errors import CheckpointError, ConfigError, DataError, GradwiseWarning
from gradwise.store.records import TOKENIZER_DIR
from gradwise.store.rundir import CONFIG_FILE
from gradwise.train.device import autocast, to_device

PREDICTION = "prediction"  # the output column of the predicted class or value
PROBABILITY_PREFIX = "probability_"  # --proba: one column per class, this prefix and the class name
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass
class Predictions:
    """What a run predicts for a table's rows, in the input's order.

    Attributes:
        columns: Output column name → one value per input row: the copied id columns, ``prediction``
            (a class name or a number) and, when asked for, one probability column per class.
        rows: Number of input rows.
        unknown: Per categorical column, rows whose category the run never saw in training (they are
            read as the column's unknown bucket).
        metrics: When the input holds the run's target column: the task's metrics on those rows, keyed
            like ``gradwise eval``'s (``input_accuracy`` …), else None.
        outputs: The model's raw outputs, ``(rows, n_outputs)`` float32 (logits, or values in target units).
    """

    columns: dict[str, list[Any]]
    rows: int
    unknown: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] | None = None
    outputs: torch.Tensor | None = None


def predict_file(run_dir: Path, path: Path, checkpoint: str = "best", *, proba: bool = False) -> Predictions:
    """Predict every row of the file ``path`` (CSV, JSONL, Parquet or NPZ) with the run in ``run_dir``."""
    return predict_table(run_dir, read_table(path, detect_format(path, "auto")), checkpoint, proba=proba)


def predict_table(run_dir: Path, table: Table, checkpoint: str = "best", *, proba: bool = False) -> Predictions:
    """Predict every row of ``table`` with the run in ``run_dir`` (its ``checkpoint``: best or last).

    Raises:
        CheckpointError: ``run_dir`` is not a run directory, or predates the recorded data description.
        ConfigError: the run is not one that predicts per row (a language model generates instead).
        DataError: a column the run reads is missing, or a cell cannot be read (the message names the row).
    """
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    info = read_data_info(run_dir)
    if info is None:
        raise CheckpointError(f"{run_dir}: the run predates data_info.json, so new rows cannot be encoded as it was")
    _check_predictable(info, run_dir)
    if proba and info.kind == "regression":
        raise ConfigError("--proba applies to classification runs; this run predicts a number")
    cfg, _, model, task, device = load_run_model(run_dir, checkpoint, with_data=False)
    inputs, lengths, unknown = _inputs(info, cfg, table, run_dir)
    targets = _targets(info, table)
    meter = task.new_meter() if targets is not None else None
    n = _row_count(inputs)
    dtype = next(iter(model.parameters()), torch.zeros(())).dtype
    outputs = []
    with torch.no_grad():
        for start in range(0, n, cfg.eval.batch_size):
            rows = torch.arange(start, min(start + cfg.eval.batch_size, n))
            batch = _rows(inputs, lengths, rows)
            x = to_device(batch, device, dtype)
            with autocast(device, cfg.precision):
                out = model(x)
            out = out.to(dtype)
            if meter is not None and targets is not None:
                meter.update(out, targets[rows].to(out.device))
            outputs.append(out.float().cpu())
    everything = torch.cat(outputs) if outputs else torch.zeros((0, info.n_outputs))
    predicted = _prediction_columns(info, everything, proba)
    copied = [n for n in _id_columns(info, table, getattr(cfg.data, "exclude", [])) if n not in predicted]
    columns = {name: _plain(table.column(name)) for name in copied}  # an input column named 'prediction' yields
    columns.update(predicted)
    metrics = None if meter is None else {f"input_{k}": float(v) for k, v in meter.compute().items()}
    return Predictions(columns, n, unknown, metrics, everything)


def write_predictions(predictions: Predictions, out: Path) -> Path:
    """Write the prediction columns to ``out``; its suffix picks the format (.csv, .jsonl, .parquet)."""
    import pandas as pd

    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{out}: cannot tell the output format from the suffix; use one of {', '.join(OUTPUT_FORMATS)}"
        )
    frame = pd.DataFrame(predictions.columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")  # a full disk never leaves half a file under the real name
    if fmt == "csv":
        frame.to_csv(partial, index=False)
    elif fmt == "jsonl":
        frame.to_json(partial, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(partial, index=False)
    partial.replace(out)
    return out


def csv_text(predictions: Predictions) -> str:
    """The prediction columns as CSV text (what ``gradwise predict`` prints without ``-o``)."""
    import pandas as pd

    return pd.DataFrame(predictions.columns).to_csv(index=False)


# --------------------------------------------------------------------------- reading the rows


def _check_predictable(info: DataInfo, run_dir: Path) -> None:
    if info.kind == "language_modeling":
        raise ConfigError(f"{run_dir}: a language model is not scored per row; use gradwise generate {run_dir}")
    if info.kind in ("preference", "ranking") or info.interactions is not None:
        raise ConfigError(
            f"{run_dir}: predict reads tables, texts and images; a {info.kind} run on "
            f"{info.name or info.source} is scored with gradwise eval"
        )
    if info.chat_template is not None:
        raise ConfigError(f"{run_dir}: a chat model generates replies; use gradwise generate {run_dir}")


def _inputs(info: DataInfo, cfg: Any, table: Table, run_dir: Path) -> tuple[Any, torch.Tensor | None, dict[str, int]]:
    """The model's inputs for every row of ``table``, the token lengths for a text run, and unseen categories."""
    if info.tokenizer_dir is not None and info.feature_names == ["text"]:
        x, lengths = _text_inputs(cfg, table, run_dir)
        return x, lengths, {}
    if info.preprocessing is None and not any(name in table.names for name in info.feature_names):
        return _array_inputs(info, table), None, {}
    inputs, unknown = table_inputs(info, table)
    return inputs, None, unknown


def _text_inputs(cfg: Any, table: Table, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the text column, by the run's own copy of its tokenizer (``RUN/tokenizer``), never a path
    a run file names: what a run directory says is read only inside it."""
    from gradwise.data.text import _text_cell, load_tokenizer, tokenize_texts

    column = getattr(cfg.data, "text", None) or "text"
    if column not in table.names:
        raise DataError(f"{table.source}: no column {column!r}; the run reads its text from it")
    values = table.column(column)
    texts = [_text_cell(values[i], column, table.source, table.locate(i)) for i in range(len(values))]
    tokenizer_dir = run_dir / TOKENIZER_DIR
    if not (tokenizer_dir / "tokenizer_config.json").is_file() and not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir}: no {TOKENIZER_DIR}/ with the run's tokenizer, so texts cannot be encoded")
    return tokenize_texts(load_tokenizer(tokenizer_dir), texts, cfg.data.max_length)


def _array_inputs(info: DataInfo, table: Table) -> torch.Tensor:
    """An NPZ's one array whose rows hold the run's ``n_features`` values (images of its shape, flattened)."""
    fitting = [
        name
        for name, array in table.columns.items()
        if array.ndim >= 2 and int(np.prod(array.shape[1:])) == info.n_features and array.dtype.kind in "iufb"
    ]
    if len(fitting) != 1:
        shape = f"{info.image_shape} images" if info.image_shape else f"{info.n_features} features"
        found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in table.columns.items()) or "no arrays"
        what = "several" if fitting else "no"
        raise DataError(
            f"{table.source}: {what} array with {info.n_features} values per row (the run reads {shape}); found {found}"
        )
    array = table.columns[fitting[0]]
    x = array.reshape(array.shape[0], -1).astype(np.float64)
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise DataError(f"{table.source}: array {fitting[0]!r} {table.locate(row)}: a value is NaN or infinite")
    if info.feature_mean is not None and info.feature_std is not None:
        x = (x - np.asarray(info.feature_mean)) / np.asarray(info.feature_std)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _targets(info: DataInfo, table: Table) -> torch.Tensor | None:
    """The target column as the task scores it, when the input has one for every row; else None (a warning
    says why when the column is there but cannot be scored: a row without a target, a label never trained on)."""
    name = info.target_name
    if name not in table.names or name in info.feature_names or name in {c["name"] for c in info.left_out or []}:
        return None
    from gradwise.data.files import clean_target

    try:
        y = clean_target(table.column(name), name, table.source, table.locate)
    except DataError as exc:
        warnings.warn(f"{exc}; predictions are not scored", GradwiseWarning, stacklevel=3)
        return None
    if info.kind == "regression":
        numbers = as_numbers(y)
        if numbers is None:
            warnings.warn(f"{table.source}: target {name!r} is not all numbers; predictions are not scored",
                          GradwiseWarning, stacklevel=3)  # fmt: skip
            return None
        return torch.from_numpy(numbers.astype(np.float32).reshape(-1, 1))
    assert info.class_names is not None
    codes, names = code_labels(y, as_numbers(y))  # the labels named as training named them
    index = {label: i for i, label in enumerate(info.class_names)}
    unseen = [label for label in names if label not in index]
    if unseen:
        warnings.warn(
            f"{table.source}: target {name!r} holds label {unseen[0]!r}, not one of the run's classes; "
            "predictions are not scored",
            GradwiseWarning,
            stacklevel=3,
        )
        return None
    return torch.tensor([index[names[c]] for c in codes], dtype=torch.int64)


def _rows(inputs: Any, lengths: torch.Tensor | None, rows: torch.Tensor) -> Any:
    if isinstance(inputs, dict):
        return {key: value[rows] for key, value in inputs.items()}
    return gather(inputs, lengths, rows)


def _row_count(inputs: Any) -> int:
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


# --------------------------------------------------------------------------- the output columns


def _id_columns(info: DataInfo, table: Table, excluded: list[str]) -> list[str]:
    """The input's id columns, copied into the output in front: those the run left out as ids, and those
    it was told to leave out (``data.exclude``: where a user names an order number the detector missed)."""
    ids = [c["name"] for c in info.left_out or [] if c.get("kind") == "id"]
    ids += [name for name in excluded if name not in ids and name != info.target_name]
    return [name for name in ids if name in table.columns and table.columns[name].ndim == 1]


def _prediction_columns(info: DataInfo, outputs: torch.Tensor, proba: bool) -> dict[str, list[Any]]:
    if info.kind == "regression":
        if proba:
            raise ConfigError("--proba applies to classification runs; this run predicts a number")
        return {PREDICTION: outputs[:, 0].double().tolist()}
    names = info.class_names or [str(k) for k in range(outputs.shape[1])]
    columns: dict[str, list[Any]] = {PREDICTION: [names[int(k)] for k in outputs.argmax(dim=1)]}
    if proba:
        probabilities = torch.softmax(outputs.double(), dim=1)
        for k, name in enumerate(names):
            columns[f"{PROBABILITY_PREFIX}{name}"] = probabilities[:, k].tolist()
    return columns


def _plain(values: np.ndarray) -> list[Any]:
    """A column as Python values (numpy scalars to int/float/str) for any output format."""
    return [v.item() if isinstance(v, np.generic) else v for v in values.tolist()]
