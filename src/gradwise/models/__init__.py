"""Model builders: linear, MLP and a small CNN, sized from the data."""

from __future__ import annotations

from torch import nn

from gradwise.config import ModelConfig
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError
from gradwise.models.cnn import CNN
from gradwise.models.linear import LinearModel
from gradwise.models.mlp import MLP, make_activation

__all__ = ["CNN", "MLP", "LinearModel", "build_model", "count_parameters", "make_activation"]


def build_model(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    """The model ``cfg.name`` with inputs and outputs sized from ``info``; its output is ``(N, info.n_outputs)``.

    Raises:
        ConfigError: ``cnn`` on data without an image shape.
    """
    if cfg.name == "hf_encoder":
        from gradwise.models.hf_encoder import build_hf_encoder  # transformers is slow to import

        return build_hf_encoder(cfg, info)
    if cfg.name == "gpt":
        from gradwise.models.gpt import build_gpt

        return build_gpt(cfg, info)
    if cfg.name == "linear":
        return LinearModel(info.n_features, info.n_outputs)
    if cfg.name == "mlp":
        return MLP(info.n_features, list(cfg.hidden), info.n_outputs, cfg.activation, cfg.norm, cfg.dropout)
    if cfg.name == "cnn":
        if info.image_shape is None:
            label = info.name or info.source
            raise ConfigError(
                f"model.name 'cnn' needs image-shaped data; data {label!r} is tabular (use model.name=mlp)"
            )
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
    raise ConfigError(f"model.name: got {cfg.name!r}; expected one of linear, mlp, cnn")


def count_parameters(model: nn.Module) -> int:
    """Every parameter's element count, trainable or frozen (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
