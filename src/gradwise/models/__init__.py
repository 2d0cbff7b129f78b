"""Models: each one a registered component that owns its config section (see gradwise.config.registry).

The built-in ones (``linear``, ``mlp``, ``cnn``, ``hf_encoder``, ``gpt``, the recommenders) are listed
under the entry-point group ``gradwise.models`` in pyproject.toml; a new model is one module with a
section, a builder and a :class:`~gradwise.config.registry.Component`.
"""

from __future__ import annotations

from torch import nn

from gradwise.config.kinds import MODELS, ModelSection
from gradwise.data.types import DataInfo
from gradwise.models.cnn import CNN
from gradwise.models.linear import LinearModel
from gradwise.models.mlp import MLP, make_activation

__all__ = ["CNN", "MLP", "LinearModel", "build_model", "count_parameters", "make_activation"]


def build_model(cfg: ModelSection, info: DataInfo) -> nn.Module:
    """The model ``cfg.name`` with inputs and outputs sized from ``info`` (its component's builder).

    Raises:
        ConfigError: the model cannot be built for this data (e.g. ``cnn`` on data without an image shape).
    """
    return MODELS.get(cfg.name).builder()(cfg, info)


def count_parameters(model: nn.Module) -> int:
    """Every parameter's element count, trainable or frozen (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
