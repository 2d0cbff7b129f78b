"""A small convolutional network over flat features that are really an image."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from pydantic import field_validator
from torch import nn

from gradwise.config.base import Fraction, PositiveInt
from gradwise.config.kinds import ModelSection
from gradwise.config.registry import Component
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError
from gradwise.models.mlp import Activation, Norm, make_activation


class CNNConfig(ModelSection):
    """``cnn``: conv blocks of ``channels`` over image-shaped features, then one hidden layer of ``hidden[0]``
    units (``[]``: none) and the head."""

    name: Literal["cnn"] = "cnn"
    channels: list[PositiveInt] = [16, 32]
    kernel_size: PositiveInt = 3
    hidden: list[PositiveInt] = [128]
    activation: Activation = "relu"
    dropout: Fraction = 0.0
    norm: Norm = "none"

    @field_validator("hidden")
    @classmethod
    def _one_hidden_layer(cls, hidden: list[int]) -> list[int]:
        if len(hidden) > 1:
            raise ValueError(
                f"model.hidden: the CNN has one hidden layer after its convolutions; give one width or [] "
                f"(got {hidden})"
            )
        return hidden


class CNN(nn.Module):
    """Conv blocks, then an optional hidden Linear, then the output Linear ``head``.

    The flat input ``(N, C·H·W)`` is reshaped to ``image_shape``. Each block is
    Conv2d (``kernel_size``, "same" padding) → norm → activation → MaxPool2d(2),
    the pooling only while the image is still at least 2 pixels on each side.
    Then flatten → dropout (if > 0) → Linear(``hidden``) → activation (if
    ``hidden`` is set) → ``head``.

    Args:
        image_shape: ``(C, H, W)`` of one example.
        channels: Output channels of each conv block.
        n_outputs: Output width.
        kernel_size: Conv kernel side.
        hidden: Width of the hidden Linear after the convolutions, or None for none.
        activation: Nonlinearity name.
        norm: ``batch`` (BatchNorm2d), ``layer`` (GroupNorm with one group, i.e. LayerNorm over C, H, W) or ``none``.
        dropout: Dropout probability before the fully connected layers.

    References:
        LeCun et al. 1998, "Gradient-Based Learning Applied to Document Recognition".
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: list[int],
        n_outputs: int,
        kernel_size: int = 3,
        hidden: int | None = None,
        activation: Activation = "relu",
        norm: Norm = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        in_channels, height, width = image_shape
        blocks: list[nn.Module] = []
        for out_channels in channels:
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding="same")
            )
            if norm == "batch":
                layers["norm"] = nn.BatchNorm2d(out_channels)
            elif norm == "layer":
                layers["norm"] = nn.GroupNorm(1, out_channels)
            layers["act"] = make_activation(activation)
            if min(height, width) >= 2:
                layers["pool"] = nn.MaxPool2d(2)
                height, width = height // 2, width // 2
            blocks.append(nn.Sequential(layers))
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.flat_size = in_channels * height * width
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        fc: OrderedDict[str, nn.Module] = OrderedDict()
        width_in = self.flat_size
        if hidden is not None:
            fc["linear"] = nn.Linear(width_in, hidden)
            fc["act"] = make_activation(activation)
            width_in = hidden
        self.hidden = nn.Sequential(fc)
        self.head = nn.Linear(width_in, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(x.shape[0], *self.image_shape)
        z = self.features(images).flatten(1)
        return self.head(self.hidden(self.dropout(z)))


def build_cnn(cfg: CNNConfig, info: DataInfo) -> CNN:
    """A CNN over ``info.image_shape``.

    Raises:
        ConfigError: the data has no image shape.
    """
    if info.image_shape is None:
        label = info.name or info.source
        raise ConfigError(f"model.name 'cnn' needs image-shaped data; data {label!r} is tabular (use model.name=mlp)")
    return CNN(
        info.image_shape,
        list(cfg.channels),
        info.n_outputs,
        kernel_size=cfg.kernel_size,
        hidden=cfg.hidden[0] if cfg.hidden else None,
        activation=cfg.activation,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


COMPONENT = Component(CNNConfig, build_cnn, "small convolutional network over image-shaped features")
