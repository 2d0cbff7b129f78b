"""The shapes data takes on its way to the loop: raw columns, then tensors in splits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

TaskKind = Literal["classification", "regression", "language_modeling", "ranking", "preference"]


@dataclass(frozen=True)
class DataInfo:
    """What a model and a task need to know about a dataset.

    Attributes:
        kind: Whether the target is a class or a number.
        n_features: Width of ``Split.x``.
        image_shape: ``(C, H, W)`` when the flat features are an image (digits: ``(1, 8, 8)``), else None.
        n_outputs: Number of classes, or 1 for regression.
        class_names: Class ``i`` is ``class_names[i]`` (the labels in sorted order); None for regression.
        feature_names: One name per column of ``Split.x``.
        target_name: The predicted column.
        source: Where the data came from, e.g. ``"scikit-learn digits"`` or the file path.
        name: Short name for messages: the bundled set's name or the file's name.
        feature_mean: Per-feature mean subtracted before training (fitted on train), None if not standardized.
        feature_std: Per-feature divisor (train std; 1 where that std is 0), None if not standardized.
        vocab_size: Token vocabulary size for text data, else None.
        pad_token_id: The id that pads token sequences (never inside a text), else None.
        tokenizer_dir: Directory holding the tokenizer files (``tokenizer.json`` …) for text data, else None.
        interactions: For interactions data, the sizes a recommender is built with (``n_users``,
            ``n_items``, ``global_mean``, the item genre bags ``genre_ids``/``genre_offsets``, ``n_genres``).
        chat_template: For chat data, the Jinja chat template the examples were rendered with (the
            tokenizer's own, or gradwise's default for a tokenizer without one), so generation and
            export use the same one.
        text_stats: For chat and preference data, what tokenizing did (examples kept, truncated, dropped)
            and how the training split is laid out (rows, tokens, padding).
        preprocessing: For a table read from a file, the fitted column encoding (the record of
            :mod:`gradwise.data.tabular`: each column's kind, fill value, categories, standardization),
            applied alike by eval, predict, export and compress; None for numeric arrays (bundled sets, NPZ).
        left_out: Columns of the file that are not features, each ``{"name", "kind", "reason"}`` (ids, text).
        target_mean: For a standardized regression target, the training mean; the model is trained on
            ``(y - target_mean) / target_scale`` and its outputs are mapped back, so it predicts in the
            target's units. None when the target is not standardized.
        target_scale: The training standard deviation of the target (1 where it is 0), or None.
    """

    kind: TaskKind
    n_features: int
    image_shape: tuple[int, int, int] | None
    n_outputs: int
    class_names: list[str] | None
    feature_names: list[str]
    target_name: str
    source: str
    name: str = ""
    feature_mean: list[float] | None = None
    feature_std: list[float] | None = None
    vocab_size: int | None = None
    pad_token_id: int | None = None
    tokenizer_dir: str | None = None
    interactions: dict[str, Any] | None = None
    chat_template: str | None = None
    text_stats: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = None
    left_out: list[dict[str, str]] | None = None
    target_mean: float | None = None
    target_scale: float | None = None

    @property
    def embedded_sizes(self) -> list[int]:
        """Per categorical column read through an embedding, its number of ids (0 is the unknown bucket)."""
        if self.preprocessing is None:
            return []
        return [len(c["categories"]) + 1 for c in self.preprocessing["columns"] if c.get("encoding") == "embedding"]

    @classmethod
    def from_record(cls, raw: dict, source: str) -> DataInfo:
        """Rebuild from the JSON mapping a run directory records (``data_info.json``), naming ``source`` on error."""
        from gradwise.errors import CheckpointError

        try:
            if raw.get("image_shape") is not None:
                raw = {**raw, "image_shape": tuple(raw["image_shape"])}
            return cls(**raw)
        except TypeError as exc:
            raise CheckpointError(f"{source}: corrupt ({exc})") from None


@dataclass(frozen=True)
class Split:
    """One split as tensors.

    Attributes:
        x: The inputs, one row per example: float32 ``(N, n_features)`` features (images are flattened;
            the CNN reshapes them with ``image_shape``), int64 ``(N, T)`` token ids, or a mapping of
            named tensors of N rows each (``{"user": ..., "item": ...}``; see :mod:`gradwise.data.batches`).
            A tensor may be memory-mapped: batches read only their rows.
        y: int64 ``(N,)`` class indices for classification, float32 ``(N, 1)`` for regression,
            int64 ``(N, T)`` next-token targets for language modeling, int64 ``(N, 2)`` (user, held-out
            item) for ranking evaluation.
        lengths: For token sequences padded to a common width, int64 ``(N,)`` true lengths; the loop
            trims each batch to its longest sequence (dynamic padding). None for fixed-width inputs.
        draw: ``(inputs, rows, epoch) -> more inputs`` added to each training batch, a pure function of
            its arguments (BPR's sampled negatives), so resuming and any process count draw the same.
        collate: ``(inputs, targets, lengths) -> (inputs, targets)`` applied to every batch taken (all
            splits): a new layout of the same rows, e.g. padding-free batches (one concatenated row).
    """

    x: Any
    y: torch.Tensor
    lengths: torch.Tensor | None = None
    draw: Callable[[Mapping[str, torch.Tensor], torch.Tensor, int], dict[str, torch.Tensor]] | None = None
    collate: Callable[[Any, torch.Tensor, torch.Tensor], tuple[Any, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits with the facts about them."""

    train: Split
    val: Split
    test: Split
    info: DataInfo
    extras: Mapping[str, Any] = field(default_factory=dict)  # what a task needs of the whole data (ranking: seen items)


@dataclass(frozen=True)
class RawData:
    """Numeric features and the target as read, before labels are coded and rows are split.

    Attributes:
        x: float64 ``(N, F)``, every value finite.
        y: The target column ``(N,)`` as read (numbers, strings or booleans; no missing values).
        feature_names: One name per column of ``x``.
        target_name: Name of the target column.
        source: Where the data came from (used in every error message).
        name: Short name for messages.
        kind: The task kind when the dataset fixes it (bundled sets), None to infer it from ``y``.
        class_names: Names of the classes 0..K-1 when ``y`` is already coded (bundled sets).
        image_shape: ``(C, H, W)`` if the features are a flattened image.
        locate: Row index (0-based) → where a user finds that row, e.g. ``"row 17 (line 18)"``.
    """

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    target_name: str
    source: str
    name: str
    kind: TaskKind | None = None
    class_names: list[str] | None = None
    image_shape: tuple[int, int, int] | None = None
    locate: Callable[[int], str] = lambda i: f"row {i + 1}"

    def head(self, n: int) -> RawData:
        """The first ``n`` rows (all of them if there are fewer)."""
        return replace(self, x=self.x[:n], y=self.y[:n])
