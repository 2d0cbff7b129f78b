"""A multi-layer perceptron with optional normalization and dropout per hidden layer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from gradwise.config.base import Fraction, PositiveInt
from gradwise.config.kinds import ModelSection
from gradwise.config.registry import Component
from gradwise.data.types import DataInfo

Activation = Literal["relu", "gelu", "tanh", "silu", "leaky_relu"]
Norm = Literal["none", "batch", "layer"]


class MLPConfig(ModelSection):
    """``mlp``: hidden blocks of the given widths (Linear → norm → activation → dropout), then the head.

    A table's high-cardinality categorical columns come in as ids; each gets a learned embedding of
    ``embedding_dim`` (default: fastai's rule ``min(embedding_max, round(1.6 · n^0.56))`` for n ids),
    concatenated with the dense features."""

    name: Literal["mlp"] = "mlp"
    hidden: list[PositiveInt] = [128, 64]
    activation: Activation = "relu"
    dropout: Fraction = 0.0
    norm: Norm = "none"
    embedding_dim: PositiveInt | None = None
    embedding_max: PositiveInt = 50


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: Activation) -> nn.Module:
    """The activation module for a ``model.activation`` name (torch's defaults, e.g. LeakyReLU slope 0.01)."""
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """``body`` of hidden blocks (Linear → norm → activation → dropout), then the output Linear ``head``.

    Parameter names read as ``body.0.linear.weight``, ``body.0.norm.weight``, ``head.bias``.

    With ``embeddings`` (one ``(ids, dim)`` pair per categorical column) the input is the mapping
    ``{"features": (N, n_features) floats, "categories": (N, E) ids}``; each column's embedding
    (``embeddings.j.weight``) is concatenated to the features before the first block.

    Args:
        n_features: Input width.
        hidden: Width of each hidden layer; empty gives a linear model.
        n_outputs: Output width (classes, or 1 for regression).
        activation: Nonlinearity after each hidden layer's normalization.
        norm: ``batch`` (BatchNorm1d), ``layer`` (LayerNorm) or ``none``.
        dropout: Dropout probability after each activation (no layer when 0).
        embeddings: ``(number of ids, embedding width)`` per categorical input column.

    References:
        Ioffe & Szegedy 2015, "Batch Normalization"; Ba et al. 2016, "Layer Normalization";
        Srivastava et al. 2014, "Dropout"; Guo & Berkhahn 2016, "Entity Embeddings of Categorical
        Variables" (embeddings for categorical columns).
    """

    def __init__(
        self,
        n_features: int,
        hidden: list[int],
        n_outputs: int,
        activation: Activation = "relu",
        norm: Norm = "none",
        dropout: float = 0.0,
        embeddings: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        # Id 0 is the unknown bucket (a category never seen in training): no training row reaches it, so it is
        # held at zeros (padding_idx) — the embedding's "all zeros", as a one-hot column's unknown is.
        self.embeddings = nn.ModuleList([nn.Embedding(n, dim, padding_idx=0) for n, dim in embeddings or []])
        width = n_features + sum(dim for _, dim in embeddings or [])
        for size in hidden:
            layers: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(width, size))
            if norm == "batch":
                layers["norm"] = nn.BatchNorm1d(size)
            elif norm == "layer":
                layers["norm"] = nn.LayerNorm(size)
            layers["act"] = make_activation(activation)
            if dropout > 0:
                layers["dropout"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(layers))
            width = size
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, Mapping):
            ids = x["categories"]
            looked_up = [table(ids[:, j]) for j, table in enumerate(self.embeddings)]
            x = torch.cat([x["features"], *looked_up], dim=1)
        return self.head(self.body(x))


def embedding_width(n_ids: int, cfg: MLPConfig) -> int:
    """The embedding width for a column of ``n_ids`` ids: ``cfg.embedding_dim``, or fastai's rule of thumb."""
    if cfg.embedding_dim is not None:
        return cfg.embedding_dim
    return max(1, min(cfg.embedding_max, round(1.6 * n_ids**0.56)))


def build_mlp(cfg: MLPConfig, info: DataInfo) -> MLP:
    embeddings = [(n, embedding_width(n, cfg)) for n in info.embedded_sizes]
    return MLP(info.n_features, list(cfg.hidden), info.n_outputs, cfg.activation, cfg.norm, cfg.dropout, embeddings)


COMPONENT = Component(MLPConfig, build_mlp, "multi-layer perceptron over feature rows")
