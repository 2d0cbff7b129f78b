"""Laying tokenized examples out in rows: padded, packed, or padding-free.

Every example's inputs are its ids but the last and its targets the ids but the first, with
``-100`` where the loss must not look, so a row never predicts across an example's end.

- Padded: one example per row, padded to the split's longest (batches are trimmed to their own
  longest, see :func:`gradwise.data.batches.take`).
- Packed: several examples per row of ``max_length`` tokens, placed best-fit-decreasing (the
  fewest rows first-fit can make for most length mixes); ``position_ids`` restart at 0 at each
  example, and the model turns them into attention that never crosses an example boundary
  (:func:`gradwise.models.causal_lm.packed_attention_bias`).
- Padding-free: padded rows on disk, but each batch is concatenated into a single row with
  restarting ``position_ids`` when it is taken (:func:`flatten_batch`): no padding at all, and the
  batch composition (and so the gradient) is the padded layout's.

Position ids restarting per example is what makes a packed loss equal the unpacked one: each
example sees the positions (and only the tokens) it would see alone.

References:
    Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination"; Ding et al. 2024,
    "Fewer Truncations Improve Language Modeling" (best-fit packing).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from gradwise.data.types import Split

IGNORE_INDEX = -100


class Tokenized(Protocol):
    ids: list[int]
    trained: list[bool]


def shifted(example: Tokenized) -> tuple[list[int], list[int]]:
    """Inputs (ids but the last) and next-token targets (ids but the first; -100 where not trained)."""
    inputs = example.ids[:-1]
    targets = [tok if keep else IGNORE_INDEX for tok, keep in zip(example.ids[1:], example.trained[1:], strict=True)]
    return inputs, targets


def padded_split(examples: Sequence[Tokenized], pad: int, *, padding_free: bool = False) -> Split:
    """One example per row, padded with ``pad`` (targets with -100); ``padding_free`` flattens each batch."""
    pairs = [shifted(e) for e in examples]
    lengths = torch.tensor([len(inputs) for inputs, _ in pairs], dtype=torch.int64)
    width = int(lengths.max()) if len(pairs) else 1
    x = _as_long([inputs for inputs, _ in pairs], width, pad)
    y = _as_long([targets for _, targets in pairs], width, IGNORE_INDEX)
    return Split(x=x, y=y, lengths=lengths, collate=flatten_batch if padding_free else trim_targets)


def pack_split(examples: Sequence[Tokenized], max_length: int, pad: int) -> Split:
    """Examples packed best-fit-decreasing into rows of at most ``max_length`` tokens, with restarting positions."""
    pairs = [shifted(e) for e in examples]
    rows = best_fit_decreasing([len(inputs) for inputs, _ in pairs], max_length)
    ids, targets, positions = [], [], []
    for members in rows:
        ids.append([tok for i in members for tok in pairs[i][0]])
        targets.append([tok for i in members for tok in pairs[i][1]])
        positions.append([p for i in members for p in range(len(pairs[i][0]))])
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.int64)
    width = int(lengths.max()) if len(rows) else 1
    # Padding after the last example: position 0 each, so every pad is an example of its own that
    # only sees itself (no row of the attention mask is empty) and is never a target.
    x = {"input_ids": _as_long(ids, width, pad), "position_ids": _as_long(positions, width, 0)}
    return Split(x=x, y=_as_long(targets, width, IGNORE_INDEX), lengths=lengths, collate=trim_targets)


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped into bins of at most ``capacity``: largest first, each into the fullest bin
    it fits (a new one if none); deterministic. Bins keep their members in placement order."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        size = min(sizes[i], capacity)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, b))
    return bins


def trim_targets(inputs: Any, targets: torch.Tensor, lengths: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Per-token targets cut to the width their inputs were trimmed to (dynamic padding)."""
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    return inputs, targets[..., : ids.shape[-1]]


def flatten_batch(inputs: Any, targets: torch.Tensor, lengths: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """A batch of padded rows as one row: the real tokens of every row, back to back, with restarting positions."""
    assert isinstance(inputs, torch.Tensor), "padding-free batches are made from padded token rows"
    targets = targets[:, : inputs.shape[1]]
    if len(lengths) == 0:
        empty = inputs.new_zeros((0, 1))
        return {"input_ids": empty, "position_ids": empty.clone()}, targets[:, :1]
    keep = torch.arange(inputs.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    flat = {"input_ids": inputs[keep].unsqueeze(0), "position_ids": positions.unsqueeze(0)}
    return flat, targets[keep].unsqueeze(0)


def _as_long(rows: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
    return out
