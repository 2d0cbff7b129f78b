"""A multi-layer perceptron with optional normalization and dropout per hidden layer."""

from __future__ import annotations

from collections import OrderedDict
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
    """``mlp``: hidden blocks of the given widths (Linear → norm → activation → dropout), then the head."""

    name: Literal["mlp"] = "mlp"
    hidden: list[PositiveInt] = [128, 64]
    activation: Activation = "relu"
    dropout: Fraction = 0.0
    norm: Norm = "none"


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

    Args:
        n_features: Input width.
        hidden: Width of each hidden layer; empty gives a linear model.
        n_outputs: Output width (classes, or 1 for regression).
        activation: Nonlinearity after each hidden layer's normalization.
        norm: ``batch`` (BatchNorm1d), ``layer`` (LayerNorm) or ``none``.
        dropout: Dropout probability after each activation (no layer when 0).

    References:
        Ioffe & Szegedy 2015, "Batch Normalization"; Ba et al. 2016, "Layer Normalization";
        Srivastava et al. 2014, "Dropout".
    """

    def __init__(
        self,
        n_features: int,
        hidden: list[int],
        n_outputs: int,
        activation: Activation = "relu",
        norm: Norm = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = n_features
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_mlp(cfg: MLPConfig, info: DataInfo) -> MLP:
    return MLP(info.n_features, list(cfg.hidden), info.n_outputs, cfg.activation, cfg.norm, cfg.dropout)


COMPONENT = Component(MLPConfig, build_mlp, "multi-layer perceptron over feature rows")
