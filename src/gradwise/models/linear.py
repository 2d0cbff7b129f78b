"""A linear model: one affine map from features to outputs (logistic/linear regression)."""

from __future__ import annotations

import torch
from torch import nn


class LinearModel(nn.Module):
    """``head(x)``: a single ``Linear(n_features, n_outputs)``, its parameters ``head.weight`` / ``head.bias``."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.head = nn.Linear(n_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
