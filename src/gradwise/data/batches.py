"""Batches of any shape: the rows of a split as the model reads them, moved to the device when used.

A split's inputs are one tensor (dense features, or token ids padded to a common width) or a
mapping of named tensors (``{"user": ids, "item": ids}``: categorical ids; an id bag is an
``ids`` / ``offsets`` pair in the mapping). :func:`take` cuts the rows of one batch on the host —
the split stays where it was loaded (in memory, or memory-mapped from disk, so only the rows a
batch uses are ever read) — and :func:`to_device` moves that batch alone, through pinned memory
on CUDA so the copy overlaps compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch

from gradwise.data.types import Split

# A batch as a model receives it: one tensor or a mapping of named tensors (nested mappings allowed).
Batch = Union[torch.Tensor, Mapping[str, "Batch"]]  # noqa: UP007 - a recursive alias needs the string form


def take(split: Split, rows: torch.Tensor, epoch: int = 0) -> tuple[Batch, torch.Tensor]:
    """The inputs and targets of ``rows`` of ``split``.

    Padded token rows are cut to the batch's longest sequence (dynamic padding; a split whose
    targets are per token cuts them alike in its ``collate``); a split with a
    ``draw`` (BPR's negatives) adds what it draws for these rows in ``epoch``, a pure function of
    the two, so a resumed run or another process count draws the same.
    """
    targets = split.y[rows]
    if isinstance(split.x, torch.Tensor):
        inputs: Batch = gather(split.x, split.lengths, rows)
    else:
        inputs = rows_of(split.x, rows)
        if split.lengths is not None:  # packed token rows: every tensor of the mapping is cut alike
            inputs = _trimmed(inputs, _longest(split.lengths, rows))
    if split.draw is not None:
        assert isinstance(inputs, Mapping), "a split that draws per batch holds a mapping of inputs"
        inputs = {**inputs, **split.draw(inputs, rows, epoch)}
    if split.collate is not None:
        assert split.lengths is not None, "a split that collates its batches records its rows' lengths"
        inputs, targets = split.collate(inputs, targets, split.lengths[rows])
    return inputs, targets


def gather(x: torch.Tensor, lengths: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``x``; padded token rows are cut to the batch's longest (dynamic padding)."""
    rows = x[indices]
    if lengths is None:
        return rows
    if len(indices) == 0:  # a rank's empty share of a short batch: no rows, one column
        return rows[..., :1]
    return rows[..., : int(lengths[indices].max())]  # the last axis is the tokens (pairs are (N, 2, L))


def _longest(lengths: torch.Tensor, rows: torch.Tensor) -> int:
    # A rank's empty share of a short batch keeps one column, as gather does.
    return int(lengths[rows].max()) if len(rows) else 1


def _trimmed(batch: Batch, width: int) -> Batch:
    if isinstance(batch, Mapping):
        return {key: _trimmed(value, width) for key, value in batch.items()}
    return batch[:, :width]


def rows_of(x: Batch, rows: torch.Tensor) -> Batch:
    """``x[rows]`` for a tensor or every tensor of a mapping (a memory-mapped tensor reads only those rows)."""
    if isinstance(x, Mapping):
        return {key: rows_of(value, rows) for key, value in x.items()}
    return x[rows]


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``batch`` (a tensor, a mapping or a tuple of them) on ``device``; floating tensors take the weights' dtype.

    On CUDA a host tensor is pinned first, so the copy is asynchronous (``non_blocking``) and the
    next micro-batch's transfer overlaps this one's compute.
    """
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, dtype) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(part, device, dtype) for part in batch)
    if device.type == "cuda" and batch.device.type == "cpu":
        batch = batch.pin_memory()
    if batch.is_floating_point():
        return batch.to(device, dtype=dtype, non_blocking=True)
    return batch.to(device, non_blocking=True)
