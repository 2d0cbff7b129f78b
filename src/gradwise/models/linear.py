"""A linear model: one affine map from features to outputs (logistic/linear regression)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gradwise.config.kinds import ModelSection
from gradwise.config.registry import Component
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError


class LinearConfig(ModelSection):
    """``linear``: one affine map from the features to the outputs (logistic or linear regression)."""

    name: Literal["linear"] = "linear"


class LinearModel(nn.Module):
    """``head(x)``: a single ``Linear(n_features, n_outputs)``, its parameters ``head.weight`` / ``head.bias``."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.head = nn.Linear(n_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def build_linear(cfg: LinearConfig, info: DataInfo) -> LinearModel:
    if info.embedded_sizes:
        raise ConfigError(
            f"model.name 'linear' reads dense features; {info.name or info.source} has categorical columns with more "
            "than data.one_hot_max categories (learned embeddings): use model.name=mlp or raise data.one_hot_max"
        )
    return LinearModel(info.n_features, info.n_outputs)


COMPONENT = Component(LinearConfig, build_linear, "one affine map (logistic / linear regression)")
